"""Identical losses on 1 device and on simulated 8-device meshes (fsdp-only, data-only, fsdp×tensor), and two
processes × 4 devices through launch/local.py matching one process × 8 devices."""

from __future__ import annotations

import json
import sys

import pytest
import train_helpers as h


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return h.build_data(tmp_path_factory.mktemp("meshdata"))


@pytest.fixture(scope="module")
def layouts(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    result = h.run([sys.executable, str(h.REPO / "tests" / "train_layouts.py"), str(data), str(out)],
                   h.env(out / "cache", devices=8), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: {int(k): v for k, v in curve.items()} for name, curve in json.loads(
        result.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize("layout", ["fsdp", "data", "fsdp_tensor"])
def test_layout_matches_single_device(layouts, layout):
    single, other = layouts["single"], layouts[layout]
    assert sorted(single) == sorted(other) == [0, 1, 2]
    for step in single:
        assert other[step] == pytest.approx(single[step], rel=2e-5, abs=1e-6), (layout, step)
    assert single[2] != single[0]  # the curve moves: equal numbers are not constants


def test_two_processes_match_one_process(data, layouts, tmp_path):
    from train_layouts import overrides

    workdir = tmp_path / "mp"
    cmd = [sys.executable, str(h.REPO / "launch" / "local.py"), "--processes", "2", "--devices-per-process", "4",
           "--log-dir", str(tmp_path / "logs"), "--", "--config", "configs/stage1_gau.py:tiny", "--workdir",
           str(workdir), *overrides(str(data)), "--config.mesh.fsdp=8"]
    result = h.run(cmd, h.env(tmp_path / "cache"), timeout=600)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert result.returncode == 0, logs
    got = h.losses(workdir)
    assert sorted(got) == [0, 1, 2]
    for step, loss in layouts["fsdp"].items():
        assert got[step] == pytest.approx(loss, rel=2e-5, abs=1e-6), step
