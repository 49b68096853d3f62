"""The mesh path, for the default ``small`` config (``auto`` kernels resolved for the target): on simulated meshes
(data=2×fsdp=4, fsdp=8, data=2×fsdp=2×tensor=2) every Pallas kernel of the Stage II train step and of a sampler
step runs under shard_map on per-device shapes, for CUDA (Triton) and TPU (Mosaic) — proven by exporting for those
platforms and reading the modules — and the sharded loss and gradients of the tiny model equal the single-device
ones (kernels in interpret mode). A negative control exports with the model's call sites blind to the mesh and
finds the global batch in the kernels, as before the mesh path."""

from __future__ import annotations

import json
import math
import sys

import pytest
import train_helpers as h
from mesh_kernels import MESHES, ROWS

GRAD_RTOL = 1e-5  # per parameter, relative to that parameter's largest gradient entry (float32 reductions)


def _run(mode: str, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(mode)
    result = h.run([sys.executable, str(h.REPO / "tests" / "mesh_kernels.py"), mode], h.env(out / "cache", devices=8),
                   timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _run("export", tmp_path_factory)


@pytest.fixture(scope="module")
def numerics(tmp_path_factory):
    return _run("numerics", tmp_path_factory)


def _check_local(calls: list[dict], mesh: tuple[int, int, int], what: str, platform: str, expect: dict) -> None:
    """Every call inside shard_map; attention operands on ROWS / (data·fsdp) rows and heads / tensor heads;
    flow-matching operands on the device's latent-token rows."""
    data, fsdp, tensor = mesh
    rows = ROWS // (data * fsdp)
    attention = flow = 0
    for call in calls:
        assert call["manual"], f"kernel outside shard_map: {call}"
        big = [s for s in call["shapes"] if len(s) >= 2]
        if any(len(s) == 4 for s in big):  # attention: [rows, T, heads, D] (Triton) / [rows, heads, T, D] (Mosaic)
            attention += 1
            four = [s for s in big if len(s) == 4]
            assert all(shape[0] == rows for shape in four), (call, rows)
            for shape in four[:3]:  # q, k, v lead every attention kernel's operands
                assert shape[1 if platform == "tpu" else 2] in {h // tensor for h in expect["heads"]}, call
        else:  # flow matching: [token rows, C], or [images, tokens, C] for the sampler's vmapped step
            flow += 1
            local = ROWS * expect[f"gen_{what}"] // (data * fsdp)
            assert math.prod(big[0][:-1]) == local, (call, local)
    assert attention > 0 and flow > 0, calls


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("what", ["train", "sample"])
def test_every_kernel_call_is_per_device(exported, platform, mesh, what):
    key = f"{platform}/{mesh}/{what}"
    if key not in exported:
        pytest.skip("jax-cuda12-plugin is not installed: no CUDA lowering (see requirements-test.txt)")
    _check_local(exported[key], MESHES[mesh], what, platform, exported["expect"])


def test_negative_control_sees_the_global_batch(tmp_path_factory):
    calls = _run("unpartitioned", tmp_path_factory)
    if not calls:
        pytest.skip("jax-cuda12-plugin is not installed")
    train = calls["cuda/data2_fsdp4/train"]
    assert not any(call["manual"] for call in train)
    with pytest.raises(AssertionError):
        _check_local(train, MESHES["data2_fsdp4"], "train", "cuda", calls["expect"])
    # The attention kernels receive all ROWS rows: XLA gathered the batch onto every device.
    assert any(s[0] == ROWS for call in train for s in call["shapes"] if len(s) == 4)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_loss_and_gradients_equal_single_device(numerics, mesh):
    single, sharded = numerics["single"], numerics[mesh]
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
    # Every parameter's gradient within RTOL of its own largest entry (not of the largest gradient of any
    # parameter), and every one of them non-zero: none is vacuously equal.
    assert not single["zero_grads"], single["zero_grads"][:10]
    worst = sorted(sharded["grad_rel_diff"].items(), key=lambda item: -item[1])
    assert worst[0][1] <= GRAD_RTOL, worst[:5]
    assert math.isfinite(single["grad_norm"]) and single["grad_norm"] > 0
