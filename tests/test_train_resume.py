"""Determinism and fault tolerance of `train`: same seed → same curve; stop/resume, SIGTERM and SIGKILL mid-save
(each really interrupting the run) all continue the uninterrupted run bitwise — its loss curve, data order, and
its final parameters, EMA and Adam moments; Stage II likewise; load_model; config/checkpoint errors."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import train_helpers as h

CONFIG = "configs/stage1_gau.py:tiny"
# Every run is configured for LONG steps (one LR schedule and one compiled program for all, shared through the
# compilation cache); the reference stops at REF (--stop-at), the interrupted runs resume up to REF.
LONG = 400
REF = 10
RUN_TIMEOUT = 900  # a guard against hangs only (one run takes well under a minute on an idle machine)


def _run(cmd: list[str], cache) -> subprocess.CompletedProcess:
    return h.run(cmd, h.env(cache), timeout=RUN_TIMEOUT)


def _overrides(data, **extra) -> list[str]:
    base = {"data.dir": data, "train.steps": LONG, "train.checkpoint_every": 5, "train.eval_every": 0,
            "train.progress": False}
    base.update(extra)
    return [f"--config.{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = h.build_data(root / "data")
    cache = root / "cache"
    reference = root / "reference"
    result = _run(h.train_cmd(CONFIG, reference, _overrides(data), "--stop-at", str(REF)), cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return data, cache, reference, root


def _steps_on_disk(workdir) -> list[int]:
    """Complete checkpoint steps (Orbax renames a step's temporary folder to its number once it is written)."""
    return sorted(int(p.name) for p in workdir.iterdir() if p.name.isdigit()) if workdir.is_dir() else []


def _wait_for_checkpoints(workdir, count: int, proc: subprocess.Popen, log, timeout: float = 300) -> list[int]:
    """Polls the workdir until it holds ``count`` complete checkpoints; fails if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = _steps_on_disk(workdir)
        if len(steps) >= count:
            return steps
        if proc.poll() is not None:
            raise AssertionError(f"training exited before its checkpoint: {log.read_text()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint within {timeout} s: {log.read_text()[-2000:]}")


def _interruptible(data, cache, workdir, log) -> subprocess.Popen:
    """A LONG run that saves every step: an async save waits for the previous one, so the run cannot get more
    than a step or two past the newest checkpoint on disk, on any machine, and a signal sent once the first
    checkpoint appears lands far before REF."""
    cmd = h.train_cmd(CONFIG, workdir, _overrides(data, **{"train.checkpoint_every": 1}))
    return subprocess.Popen(cmd, env=h.env(cache), cwd=h.REPO, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def _resume_to_ref_and_compare(data, cache, reference, workdir, resumed_from: int) -> None:
    result = _run(h.train_cmd(CONFIG, workdir, _overrides(data), "--stop-at", str(REF)), cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {workdir}/{resumed_from}" in result.stderr, result.stderr[-3000:]
    assert h.losses(workdir) == h.losses(reference)
    h.assert_same_state(workdir, reference, REF)


def test_reference_run_checkpoints_and_loads(setup):
    from synermedgen_jax.training.checkpoint import load_model, resolve

    _, _, reference, _ = setup
    curve = h.losses(reference)
    assert sorted(curve) == list(range(REF))
    assert resolve(reference)[1] == REF
    config, model = load_model(str(reference))
    assert config.stage == "stage1_gau" and config.train.steps == LONG
    _, raw = load_model(str(reference / "5"), ema=False)
    # EMA and raw weights differ; the step-5 raw weights differ from the final EMA ones.
    assert float(abs(model.connector.fc1.kernel[...] - raw.connector.fc1.kernel[...]).max()) > 0
    # What the resume tests compare is not trivially equal: EMA ≠ params, Adam moments ≠ 0, state moved.
    state, early = h.saved_state(reference, REF), h.saved_state(reference, 5)
    name = "['connector.fc1.kernel']"
    assert not np.array_equal(state["['params']" + name], state["['ema']" + name])
    assert not np.array_equal(state["['params']" + name], early["['params']" + name])
    assert any("['nu']" in key and np.any(value != 0) for key, value in state.items())


def test_stop_and_resume_is_bitwise(setup, tmp_path):
    data, cache, reference, _ = setup
    workdir = tmp_path / "run"
    cmd = h.train_cmd(CONFIG, workdir, _overrides(data))
    assert _run(cmd + ["--stop-at", "2"], cache).returncode == 0
    assert sorted(h.losses(workdir)) == [0, 1]
    _resume_to_ref_and_compare(data, cache, reference, workdir, 2)


def test_sigterm_saves_and_resume_continues(setup, tmp_path):
    from synermedgen_jax.training.checkpoint import resolve

    data, cache, reference, _ = setup
    workdir, log = tmp_path / "run", tmp_path / "train.log"
    proc = _interruptible(data, cache, workdir, log)
    try:
        first = _wait_for_checkpoints(workdir, 1, proc, log)[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = resolve(workdir)[1]
    # Interrupted for real: it stopped on the signal, after its first checkpoint and well before REF.
    assert first <= stopped < REF, (first, stopped)
    assert f"stopped at step {stopped} (checkpoint saved)" in log.read_text()
    assert sorted(h.losses(workdir)) == list(range(stopped))
    _resume_to_ref_and_compare(data, cache, reference, workdir, stopped)


def test_sigkill_mid_save_restarts_from_complete_checkpoint(setup, tmp_path):
    from synermedgen_jax.training.checkpoint import resolve

    data, cache, reference, _ = setup
    workdir, log = tmp_path / "run", tmp_path / "train.log"
    proc = _interruptible(data, cache, workdir, log)
    try:
        # Two checkpoints on disk: saves are under way every step, so the kill lands in or next to one.
        _wait_for_checkpoints(workdir, 2, proc, log)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    last = resolve(workdir)[1]
    assert last < REF, last
    # A half-written step (Orbax's temporary folder) must never be picked.
    shutil.copytree(workdir / str(last), workdir / f"{last + 50}.orbax-checkpoint-tmp-1")
    assert resolve(workdir)[1] == last
    _resume_to_ref_and_compare(data, cache, reference, workdir, last)


@pytest.mark.long
def test_stage2_stop_and_resume_is_bitwise(setup, tmp_path):
    """Stage II (flow matching, frozen understanding side, per-sample timesteps and noise): stopped at step 2
    and resumed, its curve and final state (params, EMA, Adam moments) equal an uninterrupted run's."""
    data, cache, _, _ = setup
    stage2, steps = "configs/stage2_ucg.py:tiny", 4
    overrides = _overrides(data, **{"train.checkpoint_every": 2, "train.image_every": 0})
    reference, workdir = tmp_path / "reference", tmp_path / "run"
    for where, stop in ((reference, steps), (workdir, 2), (workdir, steps)):
        result = _run(h.train_cmd(stage2, where, overrides, "--stop-at", str(stop)), cache)
        assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {workdir}/2" in result.stderr
    assert sorted(h.losses(reference)) == list(range(steps))
    assert h.losses(workdir) == h.losses(reference)
    h.assert_same_state(workdir, reference, steps)


def test_unknown_key_and_incompatible_checkpoint(setup, tmp_path):
    data, cache, reference, _ = setup
    bad = _run(h.train_cmd(CONFIG, tmp_path / "x", _overrides(data) + ["--config.train.lrr=1"]), cache)
    assert bad.returncode == 2 and "did you mean train.lr" in bad.stderr
    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    result = _run(h.train_cmd(CONFIG, workdir, _overrides(data, **{"model.llm.intermediate_size": 96})), cache)
    assert result.returncode == 2
    assert "mlp.up_proj.kernel" in result.stderr and "[64, 128]" in result.stderr
