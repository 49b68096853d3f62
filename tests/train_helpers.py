"""Shared pieces of the training tests: the tiny dataset build, subprocess runs with a shared XLA compilation
cache (identical programs compile once across processes), and an in-process layout runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# A tiny but complete build: 2 subjects (one train, one held-out val), 32×32 slices.
BUILD_ARGS = ["--source", "mni152-sim", "--subjects", "2", "--sim-voxel-mm", "8", "--slice-size", "32",
              "--split", "0.5", "0.5", "0", "--instances-per-pair", "2", "--no-progress"]


def build_data(out: Path) -> Path:
    from synermedgen_jax.__main__ import main as cli

    assert cli(["build-data", "--out", str(out), *BUILD_ARGS]) == 0
    return out


def env(cache: Path, devices: int = 1) -> dict[str, str]:
    out = dict(os.environ)
    out.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO),
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return out


def train_cmd(config: str, workdir: Path, overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "synermedgen_jax", "train", "--config", config, "--workdir", str(workdir),
            *extra, *overrides]


def run(cmd: list[str], environment: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=environment, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return result


def read_metrics(workdir: str | Path, *, eval_records: bool = False) -> dict[int, dict]:
    """``{step: metrics}`` of the train steps (or, with ``eval_records``, ``{step: {task: metrics}}`` of the
    evaluations) from the run's ``metrics.jsonl``; a step logged twice after a crash: the last line wins."""
    out: dict[int, dict] = {}
    path = Path(workdir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        if not line.strip():
            continue
        record = json.loads(line)
        step = int(record["step"])
        if eval_records and "eval" in record:
            out.setdefault(step, {})[record["eval"].removeprefix("eval/")] = record
        elif not eval_records and "eval" not in record:
            out[step] = record
    return out


def losses(workdir: Path) -> dict[int, float]:
    return {step: record["loss"] for step, record in read_metrics(workdir).items() if "eval" not in record}


def wait_for_steps(workdir: Path, count: int, proc: subprocess.Popen, logs, timeout: float = 600) -> None:
    """Waits until ``workdir/metrics.jsonl`` holds ``count`` train steps; fails with ``logs()`` if ``proc``
    exits first or nothing happens within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(losses(workdir)) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {logs()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"training made no progress: {logs()[-2000:]}")


def saved_state(workdir: str | Path, step: int) -> dict[str, np.ndarray]:
    """Every array of the train state saved at ``workdir/step`` (params, frozen, opt, ema, rng, step), by its
    pytree path (``['params']['connector.fc1.kernel']``, ``['opt'][1][0]['mu']['...']``), read straight from
    the Orbax checkpoint as host arrays: what is on disk, whatever mesh wrote it, no model and no restore
    target."""
    import jax
    import orbax.checkpoint as ocp

    folder = (Path(workdir) / str(step) / "state").absolute()
    with ocp.PyTreeCheckpointer() as reader:
        saved = reader.metadata(folder).item_metadata
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), getattr(saved, "tree", saved))
        tree = reader.restore(folder, restore_args=as_numpy)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_state(workdir: str | Path, reference: str | Path, step: int) -> None:
    """The train state at ``step`` of ``workdir`` equals the reference's bitwise: parameters, frozen weights,
    EMA, the optimizer's moments (Adam's mu and nu) and counters alike."""
    got, want = saved_state(workdir, step), saved_state(reference, step)
    assert sorted(got) == sorted(want)
    for section in ("['params']", "['ema']", "['opt']"):
        assert any(name.startswith(section) for name in want), section
    assert any("['mu']" in name for name in want) and any("['nu']" in name for name in want), sorted(want)[:20]
    differing = [name for name in want if not np.array_equal(got[name], want[name])]
    assert not differing, f"{len(differing)} of {len(want)} arrays differ, e.g. {differing[:6]}"
