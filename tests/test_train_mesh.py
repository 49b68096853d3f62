"""Identical losses on 1 device and on simulated 8-device meshes (fsdp-only, data-only, fsdp×tensor); two
processes × 4 devices through launch/local.py matching one process × 8 devices; SIGTERM to the two-process run
saves one checkpoint from both processes, and the resumed run continues the uninterrupted curve and ends in its
state (params, EMA, Adam moments)."""

from __future__ import annotations

import json
import signal
import subprocess
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


MP_STEPS = 10  # the uninterrupted two-process run; its first 3 steps are compared with the layouts


def _launch(data, workdir, logs, steps: int) -> list[str]:
    from train_layouts import overrides

    return [sys.executable, str(h.REPO / "launch" / "local.py"), "--processes", "2", "--devices-per-process", "4",
            "--log-dir", str(logs), "--", "--config", "configs/stage1_gau.py:tiny", "--workdir", str(workdir),
            *overrides(str(data)), "--config.mesh.fsdp=8", f"--config.train.steps={steps}"]


def _logs(folder) -> str:
    return "\n".join(p.read_text()[-2000:] for p in sorted(folder.glob("*.log")))


@pytest.fixture(scope="module")
def two_process(data, tmp_path_factory):
    """``(workdir, compilation cache)`` of an uninterrupted two-process run of MP_STEPS steps."""
    root = tmp_path_factory.mktemp("mp")
    result = h.run(_launch(data, root / "run", root / "logs", MP_STEPS), h.env(root / "cache"), timeout=600)
    assert result.returncode == 0, _logs(root / "logs")
    return root / "run", root / "cache"


def test_two_processes_match_one_process(layouts, two_process):
    got = h.losses(two_process[0])
    assert sorted(got) == list(range(MP_STEPS))
    for step, loss in layouts["fsdp"].items():
        assert got[step] == pytest.approx(loss, rel=2e-5, abs=1e-6), step


def test_two_process_sigterm_saves_and_resume_continues(data, two_process, tmp_path):
    from synermedgen_jax.training.checkpoint import resolve

    reference, cache = two_process
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    # A long run; SIGTERM to the launcher (forwarded to both trainers) once two steps are logged.
    proc = subprocess.Popen(_launch(data, workdir, logs, 400), env=h.env(cache), cwd=h.REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        h.wait_for_steps(workdir, 2, proc, lambda: _logs(logs))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, _logs(logs)  # both processes exited 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = resolve(workdir)[1]
    assert 2 <= stopped < MP_STEPS, stopped
    assert f"stopped at step {stopped} (checkpoint saved)" in _logs(logs)
    # One complete checkpoint written by both processes: each saved its own data-iterator state.
    assert sorted(p.name for p in (workdir / str(stopped) / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    result = h.run(_launch(data, workdir, tmp_path / "logs2", MP_STEPS), h.env(cache), timeout=300)
    assert result.returncode == 0, _logs(tmp_path / "logs2")
    assert f"resumed from {workdir}/{stopped}" in _logs(tmp_path / "logs2")
    want = h.losses(reference)
    got = h.losses(workdir)
    assert sorted(got) == sorted(want)
    assert all(got[s] == want[s] for s in want), (got, want)  # bitwise: same data order, same state
    h.assert_same_state(workdir, reference, MP_STEPS)  # and the same final params, EMA and Adam moments
