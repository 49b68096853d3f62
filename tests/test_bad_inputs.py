"""Bad inputs and faults against every command, table-driven: each case asserts the exit status (2 for a
one-line error, see ``--help``), that stderr's error is one line naming the file/field/step with no traceback,
and that nothing valid was lost (checksums of the previous build/checkpoint/output before and after).
Faults: ``kill -9`` of a build and of training at a random moment, damaged newest checkpoints (a truncated
data file, a truncated ``_METADATA``, a missing step directory)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import train_helpers as h

CONFIG = "configs/stage1_gau.py:tiny"
STEPS = 4
pytestmark = pytest.mark.usefixtures("fast_compile")


def _overrides(data, **extra) -> list[str]:
    base = {"data.dir": data, "train.steps": STEPS, "train.checkpoint_every": 2, "train.eval_every": 0,
            "train.progress": False, "train.image_every": 0}
    base.update(extra)
    return [f"--config.{k}={v}" for k, v in base.items()]


def run_env(cache: Path) -> dict[str, str]:
    """Subprocess environment: the shared compilation cache, and no XLA optimisation (tiny programs)."""
    return {**h.env(cache), "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def checksums(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (hidden siblings are not included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(code: int, stderr: str, *names: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code == 2, (code, stderr[-3000:])
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny build, a 4-step Stage I run (checkpoints at steps 2 and 4) and a small NIfTI volume."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("bad_inputs")
    data = h.build_data(root / "data")
    cache = root / "cache"
    run = root / "run"
    result = h.run(h.train_cmd(CONFIG, run, _overrides(data)), run_env(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiling" in result.stderr  # a line before the first (slow) step
    volume = root / "t1.nii.gz"
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.uniform(0, 100, (24, 24, 4)).astype(np.float32), np.eye(4)), str(volume))
    return {"root": root, "data": data, "cache": cache, "run": run, "volume": volume}


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """The CLI in this process (argparse usage errors included): ``(exit status, stderr)``."""
    from synermedgen_jax.__main__ import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 2
    return code, capsys.readouterr().err


def _damage(workdir: Path, how: str, step: int) -> str:
    """Damages ``workdir/step``; returns the file (or folder) the error must name."""
    folder = workdir / str(step)
    if how == "truncated data file":
        file = max((folder / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        return file.name
    if how == "truncated _METADATA":
        file = folder / "state" / "_METADATA"
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        return "_METADATA"
    if how == "missing step directory":
        shutil.rmtree(folder / "state")
        return f"{step}/state"
    raise ValueError(how)


# ------------------------------------------------------------------------------------------------------------
# Arguments and config, checked before any expensive step (in-process: they must fail in well under a second).
def _train(env, workdir, *overrides, config=CONFIG) -> list[str]:
    return ["train", "--config", config, "--workdir", workdir, *_overrides(env["data"]), *overrides]


ARGUMENT_CASES = {
    "train unknown variant": (lambda e, t: _train(e, t / "w", config="configs/stage1_gau.py:nope"),
                              ["unknown variant", "nope"]),
    "train wrong type": (lambda e, t: _train(e, t / "w", "--config.train.steps=abc"), ["train.steps", "abc"]),
    "train steps negative": (lambda e, t: _train(e, t / "w", "--config.train.steps=-5"), ["train.steps"]),
    "train steps zero": (lambda e, t: _train(e, t / "w", "--config.train.steps=0"), ["train.steps"]),
    "train missing data dir": (lambda e, t: _train(e, t / "w", f"--config.data.dir={t / 'nowhere'}"),
                               ["data.dir", "nowhere"]),
    "train workdir is a file": (lambda e, t: _train(e, t / "afile"), ["--workdir", "afile"]),
    "train workdir under a file": (lambda e, t: _train(e, t / "afile" / "w"), ["--workdir", "afile"]),
    "build-data out is a file": (lambda e, t: ["build-data", "--out", t / "afile", *h.BUILD_ARGS], ["afile"]),
    "build-data out under a file": (lambda e, t: ["build-data", "--out", t / "afile" / "x", *h.BUILD_ARGS],
                                    ["afile"]),
    "build-data out uncreatable": (lambda e, t: ["build-data", "--out", "/proc/nowhere/data", *h.BUILD_ARGS],
                                   ["/proc/nowhere"]),
    "ask empty prompt": (lambda e, t: ["ask", "--checkpoint", e["run"], "--prompt", "", "--image", e["volume"]],
                         ["--prompt"]),
    "export VAE-only workdir": (lambda e, t: ["export", "--checkpoint", t / "vae_run", "--out", t / "bagel"],
                                ["VAE", "vae_run"]),
}


@pytest.mark.parametrize("case", list(ARGUMENT_CASES))
def test_argument_errors(case, env, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    vae_run = tmp_path / "vae_run"  # a stage-0 run: the run's checkpoints with stage "vae"
    shutil.copytree(env["run"], vae_run)
    for meta in vae_run.glob("*/config/metadata"):
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "stage": "vae"}))
    argv, names = ARGUMENT_CASES[case]
    before = {"run": checksums(env["run"]), "data": checksums(env["data"]), "vae": checksums(vae_run)}
    code, stderr = cli(argv(env, tmp_path), capsys)
    assert_one_line_error(code, stderr, *names)
    assert "compiling" not in stderr, "the check came after expensive work"
    assert (tmp_path / "afile").read_text() == "not a folder"
    assert not (tmp_path / "bagel").exists() and not (tmp_path / "w").exists()
    assert before == {"run": checksums(env["run"]), "data": checksums(env["data"]), "vae": checksums(vae_run)}


def test_exit_status_is_documented(capsys):
    from synermedgen_jax.__main__ import main

    for command in ("train", "build-data", "synthesize", "ask", "eval", "import", "export"):
        assert main([command, "--help"]) == 0
        assert "exit status: 0 done; 2 a one-line error" in " ".join(capsys.readouterr().out.split()), command


# ------------------------------------------------------------------------------------------------------------
# NIfTI headers claiming more than the file holds: refused before any voxel is read (memory stays flat).
def test_nifti_header_guard_before_any_voxel(env, tmp_path):
    import gzip

    import nibabel as nib

    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).header
    header.set_data_shape((600, 600, 600))
    raw = header.binaryblock + b"\0" * 1028
    (tmp_path / "big.nii").write_bytes(raw)
    (tmp_path / "big.nii.gz").write_bytes(gzip.compress(raw))
    synth = ["synthesize", "--checkpoint", str(env["run"]), "--source-modality", "t1", "--target-modality", "t2",
             "--output", str(tmp_path / "out.nii.gz")]
    runs = [synth + ["--input", str(tmp_path / name)] for name in ("big.nii", "big.nii.gz")]
    runs.append(["ask", "--checkpoint", str(env["run"]), "--prompt", "Which modality?", "--image",
                 str(tmp_path / "big.nii.gz")])
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking (pytest worker) process.
    script = ("import re\nfrom pathlib import Path\nfrom synermedgen_jax.__main__ import main\n"
              "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text()).group(1))\n"
              f"for argv in {runs!r}:\n"
              "    print(main(argv), hwm() // 1024, flush=True)\n")
    result = h.run([sys.executable, "-c", script], run_env(env["cache"]))
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [int(code) for code, _ in rows] == [2, 2, 2], result.stdout
    assert max(int(rss) for _, rss in rows) < 700, f"RSS in MB: {rows} (600^3 float32 is 824 MB)"
    errors = error_lines(result.stderr)
    assert len(errors) == 3 and all("big.nii" in e and "(600, 600, 600)" in e for e in errors), errors
    assert not (tmp_path / "out.nii.gz").exists()


# ------------------------------------------------------------------------------------------------------------
# Damaged newest checkpoints: the read-only commands fall back to the newest readable step (a warning naming
# the step and the file) or, given the damaged step itself, fail in one line naming it.
DAMAGE = ("truncated data file", "truncated _METADATA", "missing step directory")


@pytest.fixture(scope="module")
def step_exports(env, tmp_path_factory) -> dict[int, dict[str, str]]:
    """``{step: checksums of its export}`` of the undamaged run's steps 2 and 4 (``export --ema``), which
    differ: what a fall-back export must equal, and what it must not."""
    from synermedgen_jax.__main__ import main

    out = tmp_path_factory.mktemp("step_exports")
    sums = {}
    for step in (2, STEPS):
        assert main(["export", "--checkpoint", str(env["run"] / str(step)), "--out", str(out / str(step)),
                     "--ema"]) == 0
        sums[step] = checksums(out / str(step))
    assert sums[2]["ema.safetensors"] != sums[STEPS]["ema.safetensors"]
    return sums


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_newest_checkpoint_read_only(how, env, step_exports, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(env["run"], workdir)
    file = _damage(workdir, how, STEPS)
    before = checksums(workdir)
    # A workdir: the newest readable step (2) is exported, with a warning naming step 4 and the file.
    code, stderr = cli(["export", "--checkpoint", workdir, "--out", tmp_path / "bagel", "--ema"], capsys)
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    warning = [line for line in stderr.splitlines() if "damaged" in line]
    assert warning and f"step {STEPS}" in warning[0] and file in warning[0], stderr
    # The content is step 2's, byte for byte (not step 4's, not a fresh model's).
    assert checksums(tmp_path / "bagel") == step_exports[2]
    # The damaged step named explicitly: one line naming the step, from every reader.
    step_dir = workdir / str(STEPS)
    for argv in (["export", "--checkpoint", step_dir, "--out", tmp_path / "bagel2"],
                 ["synthesize", "--checkpoint", step_dir, "--input", env["volume"], "--source-modality", "t1",
                  "--target-modality", "t2", "--output", tmp_path / "o.nii.gz"],
                 ["ask", "--checkpoint", step_dir, "--prompt", "Which modality?"],
                 ["eval", "--checkpoint", step_dir, "--data", env["data"], "--split", "val"]):
        code, stderr = cli(argv, capsys)
        assert_one_line_error(code, stderr, f"step {STEPS}", file)
    assert not (tmp_path / "bagel2").exists() and not (tmp_path / "o.nii.gz").exists()
    assert checksums(workdir) == before  # readers never change a checkpoint


def test_every_checkpoint_damaged_is_one_line_not_step_0(env, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(env["run"], workdir)
    _damage(workdir, "truncated data file", STEPS)
    _damage(workdir, "truncated _METADATA", 2)
    before = checksums(workdir)
    code, stderr = cli(["export", "--checkpoint", workdir, "--out", tmp_path / "bagel"], capsys)
    assert_one_line_error(code, stderr, "no readable checkpoint", f"step {STEPS}", "step 2", "_METADATA")
    code, stderr = cli(_train(env, workdir, f"--config.train.steps={STEPS + 2}"), capsys)
    assert_one_line_error(code, stderr, "no readable checkpoint", f"step {STEPS}", "step 2")
    after = checksums(workdir)  # every file kept as it was (a new, empty tensorboard file may appear)
    assert {k: after.get(k) for k in before} == before and not (workdir / "0").exists()


def test_train_resumes_from_newest_readable_step(env, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(env["run"], workdir)
    file = _damage(workdir, "truncated data file", STEPS)
    damaged = checksums(workdir / str(STEPS))
    result = h.run(h.train_cmd(CONFIG, workdir, _overrides(env["data"], **{"train.steps": STEPS + 2})),
                   run_env(env["cache"]))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert any(f"step {STEPS}" in line and file in line and "damaged" in line for line in lines), result.stderr
    assert f"resumed from {workdir}/2" in result.stderr and "compiling" in result.stderr
    assert "read only" not in result.stderr  # Orbax's misleading warning is silenced
    assert checksums(workdir / f"damaged-{STEPS}") == damaged  # set aside, not deleted
    rows = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(STEPS + 2)), rows  # steps 2, 3 recomputed once each, no duplicate rows
    from synermedgen_jax.training.checkpoint import resolve

    assert resolve(workdir)[1] == STEPS + 2
    # What was restored is step 2's content (state and data position): the recomputed steps 2, 3 repeat the
    # undamaged run's losses, and the re-saved step 4 equals its step 4 array for array (params, EMA, Adam).
    losses, original = h.losses(workdir), h.losses(env["run"])
    assert [losses[s] for s in (2, 3)] == [original[s] for s in (2, 3)]
    h.assert_same_state(workdir, env["run"], STEPS)


# ------------------------------------------------------------------------------------------------------------
# kill -9 at a random moment: training (saves included) and builds.
def test_kill_9_training_at_a_random_moment(env, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(env["run"], workdir)  # resume the 4-step run towards 400 steps, saving every step
    rng = random.Random()
    cmd = h.train_cmd(CONFIG, workdir, _overrides(env["data"], **{"train.steps": 400, "train.checkpoint_every": 1}))
    proc = subprocess.Popen(cmd, env=run_env(env["cache"]), cwd=h.REPO, stderr=subprocess.PIPE, text=True)
    h.wait_for_steps(workdir, STEPS + rng.randint(1, 4), proc, lambda: "")
    time.sleep(rng.uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    events = list((workdir / "tb").glob("events.*"))
    assert events and max(p.stat().st_size for p in events) > 500  # flushed with each metrics row
    from synermedgen_jax.training.checkpoint import resolve

    last = resolve(workdir)[1]
    result = h.run(h.train_cmd(CONFIG, workdir, _overrides(env["data"], **{"train.steps": last + 1})),
                   run_env(env["cache"]))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"resumed from {workdir}/{last}" in result.stderr
    rows = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(last + 1)), rows


def _build(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "synermedgen_jax", "build-data", "--out", str(out), *h.BUILD_ARGS, *extra]
    return subprocess.Popen(cmd, env=run_env(out.parent / "cache"), cwd=h.REPO, stderr=subprocess.PIPE, text=True)


def _complete_build(out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"].values():
        for entry in shard:
            assert hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]


def test_kill_9_build_at_a_random_moment(env, tmp_path):
    rng = random.Random()
    # Over a previous good build (--overwrite): either the previous build or the new one, complete.
    out = tmp_path / "data"
    shutil.copytree(env["data"], out)
    before = checksums(out)
    proc = _build(out, "--overwrite", "--seed", "1")
    time.sleep(rng.uniform(0.5, 6.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _complete_build(out)
    assert checksums(out) == before or json.loads((out / "manifest.json").read_text())["config"]["seed"] == 1
    # Into a new folder: a rerun (without --overwrite) is not tripped by anything the killed build left.
    fresh = tmp_path / "fresh"
    proc = _build(fresh)
    time.sleep(rng.uniform(0.5, 6.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not (fresh / "manifest.json").exists():
        result = h.run([sys.executable, "-m", "synermedgen_jax", "build-data", "--out", str(fresh), *h.BUILD_ARGS],
                       run_env(tmp_path / "cache"))
        assert result.returncode == 0, result.stderr[-3000:]
    _complete_build(fresh)
    assert not list(tmp_path.glob(".fresh.*"))  # the killed build's hidden staging folder went with the rerun


def test_failed_overwrite_keeps_previous_build_and_small_builds_warn(env, tmp_path, capsys):
    out = tmp_path / "data"
    shutil.copytree(env["data"], out)
    before = checksums(out)
    # Every slice below the foreground threshold: no valid record; the previous build stays as it was.
    code, stderr = cli(["build-data", "--out", out, *h.BUILD_ARGS, "--overwrite", "--min-foreground", "1.5"], capsys)
    assert_one_line_error(code, stderr, "no valid record remains", str(out), "unchanged")
    assert checksums(out) == before and not list(tmp_path.glob(".data.*"))
    # Two subjects for three splits: val and test stay empty, said loudly (the build itself succeeds).
    args = [a for a in h.BUILD_ARGS if a not in ("--split", "0.5", "0")]
    code, stderr = cli(["build-data", "--out", tmp_path / "small", *args, "--split", "0.8", "0.1", "0.1"], capsys)
    assert code == 0 and "Traceback" not in stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert any("val split is empty" in w for w in warnings) and any("test split is empty" in w for w in warnings)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("manifest.json", "records/train.index.json"):
        assert (tmp_path / "small" / name).stat().st_mode & 0o777 == 0o666 & ~mask, name  # not forced to 0600
    shard = next((tmp_path / "small" / "records").glob("*.array_record"))
    assert shard.stat().st_mode & 0o777 == 0o666 & ~mask


def test_eval_on_data_the_model_was_not_trained_on_warns(env, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(env["data"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["source"] = "brats"
    manifest["config"]["slice_size"] = 48
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, stderr = cli(["eval", "--checkpoint", env["run"], "--data", other, "--split", "test",
                        "--max-instances", "0", "--out", tmp_path / "eval"], capsys)
    assert "Traceback" not in stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert any("dataset 'brats'" in w for w in warnings) and any("slice size 48" in w for w in warnings), stderr


def test_import_refuses_nan_weights(tiny_config, tmp_path, capsys):
    from port_fixtures import make_bagel_folder, port_test_config
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "bagel"
    make_bagel_folder(folder, port_test_config(tiny_config), seed=0)
    tensors = load_file(str(folder / "ema.safetensors"))
    name = sorted(k for k in tensors if k.endswith("q_proj.weight"))[0]
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = np.nan
    save_file(tensors, str(folder / "ema.safetensors"), metadata={"format": "pt"})
    code, stderr = cli(["import", "--bagel", folder, "--out", tmp_path / "ckpt"], capsys)
    assert_one_line_error(code, stderr, name, "NaN")
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt.*"))
