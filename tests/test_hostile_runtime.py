"""Runtime faults against the commands (issue 30, part A): a second writer on the same output, a stale lock of a
dead process, damaged newest checkpoints that pass every metadata check (flipped bytes inside an array, a
missing data-iterator file), a full disk during a checkpoint save, read-only outputs and outputs under a file,
and exceptions escaping a command. Each case asserts the exit status, one ``error:`` line naming the path or
field (no traceback), and the checksums of everything that existed before; fall-backs compare the restored
arrays and iterator state with the older step's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
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
STEPS = 4  # checkpoints at 2 and 4
pytestmark = pytest.mark.usefixtures("fast_compile")


def _overrides(data: Path, steps: int = STEPS) -> list[str]:
    base = {"data.dir": data, "train.steps": steps, "train.checkpoint_every": 2, "train.eval_every": 0,
            "train.progress": False, "train.image_every": 0}
    return [f"--config.{k}={v}" for k, v in base.items()]


def _train(workdir: Path, data: Path, steps: int = STEPS) -> list[str]:
    return ["train", "--config", CONFIG, "--workdir", str(workdir), *_overrides(data, steps)]


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def cli(argv: list, capsys) -> tuple[int, str]:
    """``python -m synermedgen_jax ARGV`` in this process: ``(exit status, stderr)``."""
    from synermedgen_jax.__main__ import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 2
    return code, capsys.readouterr().err


def one_error(code: int, stderr: str, expected_code: int, *names: str) -> str:
    """Asserts the exit status, no traceback and exactly one ``error:`` line holding every name; returns it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code == expected_code, (code, stderr[-3000:])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny build and a 4-step Stage I run (steps 2 and 4), in this process; the compilation cache is shared
    by the later in-process runs of the same program."""
    import jax

    from synermedgen_jax.__main__ import main

    root = tmp_path_factory.mktemp("hostile_runtime")
    previous = {name: getattr(jax.config, name) for name in ("jax_compilation_cache_dir",
                                                          "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", str(root / "cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    data = h.build_data(root / "data")
    run = root / "run"
    assert main(_train(run, data)) == 0
    import nibabel as nib

    volume = np.random.default_rng(0).uniform(0, 100, (24, 24, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(root / "t1.nii.gz"))
    yield {"root": root, "data": data, "run": run}
    for name, value in previous.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def bagel(env, tiny_config) -> Path:
    """A tiny BAGEL folder (import's input), made only for the cases that import."""
    from port_fixtures import make_bagel_folder, port_test_config

    folder = env["root"] / "bagel_in"
    if not folder.exists():
        make_bagel_folder(folder, port_test_config(tiny_config), seed=0)
    return folder


def _with_bagel(env: dict, request) -> dict:
    return {**env, "bagel": request.getfixturevalue("bagel")}


# ------------------------------------------------------------------------------------------------------------
# Damaged newest checkpoints that pass the metadata checks: train falls back to the older step, and what it
# restores is the older step's content (every array and the data iterator's state).
def _value_location(step_dir: Path, key: str) -> tuple[Path, int, int]:
    """``(file, offset, length)`` of an array chunk ``key`` (``params.<name>/0.0``) in the step's OCDBT store."""
    import tensorstore as ts

    state = step_dir / "state"
    kvstore = ts.KvStore.open({"driver": "file", "path": str(state) + "/"}).result()
    pending = [ts.ocdbt.dump(kvstore).result()["versions"][0]["root"]["location"]]
    while pending:
        node = ts.ocdbt.dump(kvstore, pending.pop()).result()
        for entry in node.get("entries", []):
            if "node" in entry or "location" in entry:
                pending.append(entry.get("node") or entry.get("location"))
            elif entry.get("key") == key.encode() and "indirect_value" in entry:
                _, prefix, name, offset, length = entry["indirect_value"].split(":")
                return state / prefix / name, int(offset), int(length)
    raise AssertionError(f"{key} not stored out of line in {state}")


def _flip_array_bytes(step_dir: Path, section: str) -> str:
    """Inverts 16 bytes in the middle of the stored chunk of the largest ``section`` kernel; returns its name."""
    manifest = json.loads((step_dir / "manifest" / "metadata").read_text())
    name = max((n for n in manifest[section] if n.endswith("kernel")),
               key=lambda n: int(np.prod(manifest[section][n][0])))
    chunk = ".".join("0" * len(manifest[section][name][0]))
    file, offset, length = _value_location(step_dir, f"{section}.{name}/{chunk}")
    raw = bytearray(file.read_bytes())
    for i in range(offset + length // 2, offset + length // 2 + 16):
        raw[i] ^= 0xFF
    file.write_bytes(bytes(raw))
    return name


def _reference_state(step_dir: Path) -> tuple[dict, list, dict]:
    """``({section: {name: array}} incl. step/rng, opt leaves, data-iterator state)`` of a step, read without
    the training code (Orbax's plain PyTree reader, numpy arrays)."""
    import jax
    import orbax.checkpoint as ocp

    raw = ocp.PyTreeCheckpointer().restore(str(step_dir / "state"))
    named = {key: raw[key] for key in ("params", "frozen", "ema", "step", "rng")}
    data = json.loads(next((step_dir / "data").glob("process_*.json")).read_text())
    return named, jax.tree.leaves(raw["opt"]), data


@pytest.mark.parametrize("how", ["flipped bytes in an array", "missing data-iterator file"])
def test_damaged_newest_step_falls_back_with_older_content(how, env, tmp_path, capsys, monkeypatch):
    import jax

    from synermedgen_jax.training import checkpoint

    workdir = tmp_path / "run"
    shutil.copytree(env["run"], workdir)
    if how == "flipped bytes in an array":
        name = _flip_array_bytes(workdir / str(STEPS), "params")
        named = f"['params']['{name}']"
    else:
        (workdir / str(STEPS) / "data" / "process_0-of-1.json").unlink()
        named = "process_"
    # Both damages pass the old metadata/byte-range check: the fall-back comes from the content check.
    from etils import epath

    assert checkpoint._ocdbt_problem(epath.Path(workdir / str(STEPS) / "state")) is None
    damaged = checksums(workdir / str(STEPS))
    before = checksums(workdir / "2")
    captured = {}
    original = checkpoint.restore_newest

    def capture(mngr, target, data_iter, **kwargs):
        step, state, bad = original(mngr, target, data_iter, **kwargs)
        position = data_iter.get_state()
        captured.update(step=step, state=jax.device_get(state),
                        data=json.loads(position) if isinstance(position, (bytes, str)) else position)
        return step, state, bad

    monkeypatch.setattr(checkpoint, "restore_newest", capture)
    # train.steps=2: the restored step already finishes the run, so no train step is compiled.
    code, stderr = cli(_train(workdir, env["data"], steps=2), capsys)
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:") and "damaged" in line]
    assert any(f"step {STEPS}" in w and named in w for w in warnings), stderr
    assert f"resumed from {workdir}/2" in stderr
    assert checksums(workdir / f"damaged-{STEPS}") == damaged and checksums(workdir / "2") == before
    # The restored state is step 2's, array for array, and so is the iterator's position.
    assert captured["step"] == 2
    reference, opt_leaves, data_state = _reference_state(env["run"] / "2")
    state = captured["state"]
    for section in ("params", "frozen", "ema"):
        assert set(state[section]) == set(reference[section]), section
        for key, value in reference[section].items():
            np.testing.assert_array_equal(np.asarray(state[section][key]), value, err_msg=f"{section}.{key}")
    for key in ("step", "rng"):
        np.testing.assert_array_equal(np.asarray(state[key]), reference[key])
    restored_opt = jax.tree.leaves(state["opt"])
    assert len(restored_opt) == len(opt_leaves)
    for got, want in zip(restored_opt, opt_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert captured["data"] == data_state
    assert captured["data"] != _reference_state(env["run"] / str(STEPS))[2]  # the older position, not the newer


def test_readers_never_use_flipped_weights(env, tmp_path, capsys):
    """Readers compare what they restore with the saved fingerprints: load_model (synthesize, ask, eval) falls
    back to the older step with a warning; export of the damaged step is one line, nothing written."""
    from synermedgen_jax.training import checkpoint

    workdir = tmp_path / "run"
    shutil.copytree(env["run"], workdir)
    name = _flip_array_bytes(workdir / str(STEPS), "ema")
    before = checksums(workdir)
    code, stderr = cli(["export", "--checkpoint", workdir / str(STEPS), "--out", tmp_path / "bagel"], capsys)
    one_error(code, stderr, 2, f"step {STEPS}", name)
    assert not (tmp_path / "bagel").exists() and not list(tmp_path.glob(".bagel*"))
    capsys.readouterr()
    config, model = checkpoint.load_model(str(workdir))
    stderr = capsys.readouterr().err
    assert f"step {STEPS}" in stderr and name in stderr and "older step" in stderr, stderr
    from flax import nnx

    weights = {".".join(str(p) for p in path): np.asarray(v.get_value())
               for path, v in nnx.to_flat_state(nnx.state(model))}
    reference, _, _ = _reference_state(env["run"] / "2")
    for key, value in reference["ema"].items():
        np.testing.assert_array_equal(weights[key], value, err_msg=key)
    assert checksums(workdir) == before  # readers change nothing


# ------------------------------------------------------------------------------------------------------------
# A full disk during a checkpoint save: one line naming the path and the errno, the older checkpoints intact,
# and the same command resumes afterwards.
def test_full_disk_at_save_keeps_last_checkpoint_and_resumes(env, tmp_path, capsys, monkeypatch):
    import grain.checkpoint as grain_ckpt

    workdir = tmp_path / "run"
    shutil.copytree(env["run"], workdir)
    steps = {s: checksums(workdir / s) for s in ("2", str(STEPS))}
    config = (workdir / "config.json").read_bytes()
    metrics = (workdir / "metrics.jsonl").read_text()
    original = grain_ckpt.CheckpointHandler.save
    written = []

    def full_disk(self, directory, *args, **kwargs):  # where the data iterator's file would be written
        written.append(directory)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "process_0-of-1.json"))

    monkeypatch.setattr(grain_ckpt.CheckpointHandler, "save", full_disk)
    code, stderr = cli(_train(workdir, env["data"], steps=STEPS + 2), capsys)
    line = one_error(code, stderr, 1, "train", "process_0-of-1.json", "No space left on device", "errno 28 ENOSPC",
                     "rerun the same command to resume")
    assert written and str(workdir) in line
    assert not (workdir / str(STEPS + 2)).exists()  # the failed step never became a checkpoint
    assert {s: checksums(workdir / s) for s in steps} == steps and (workdir / "config.json").read_bytes() == config
    assert (workdir / "metrics.jsonl").read_text().startswith(metrics)
    assert not (tmp_path / ".run.lock").exists()  # the lock went with the failed run
    monkeypatch.setattr(grain_ckpt.CheckpointHandler, "save", original)
    code, stderr = cli(_train(workdir, env["data"], steps=STEPS + 2), capsys)
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert f"resumed from {workdir}/{STEPS}" in stderr
    assert (workdir / str(STEPS + 2) / "state").is_dir() and not list(workdir.glob("*.orbax-checkpoint-tmp*"))
    rows = [json.loads(r)["step"] for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(STEPS + 2)), rows


def test_too_little_free_space_is_one_line_before_any_work(env, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(env["run"], workdir)
    before = checksums(workdir)
    real = shutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        return type(usage)(usage.total, usage.total - 2**20, 2**20)  # 1 MiB free

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    code, stderr = cli(_train(workdir, env["data"], steps=STEPS + 2), capsys)
    one_error(code, stderr, 2, str(workdir), "1 MiB free", "ENOSPC")
    assert checksums(workdir) == before


# ------------------------------------------------------------------------------------------------------------
# Unwritable outputs, found before any work: a read-only folder, and an output whose parent is a file.
def _read_only_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write: mode 0555, or (as root, which ignores modes) a path under /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    return Path("/sys/synermedgen_read_only")


OUTPUT_CASES = {
    "train --workdir": lambda e, d: _train(d / "w", e["data"]),
    "build-data --out": lambda e, d: ["build-data", "--out", d / "data", *h.BUILD_ARGS],
    "build-data --contact-sheet": lambda e, d: ["build-data", "--out", e["root"] / "unused",
                                                "--contact-sheet", d / "sheet.png", *h.BUILD_ARGS],
    "import --out": lambda e, d: ["import", "--bagel", e["bagel"], "--out", d / "ckpt"],
    "export --out": lambda e, d: ["export", "--checkpoint", e["run"], "--out", d / "bagel"],
    "synthesize --output": lambda e, d: ["synthesize", "--checkpoint", e["run"], "--input", e["root"] / "t1.nii.gz",
                                         "--source-modality", "t1", "--target-modality", "t2",
                                         "--output", d / "o.nii.gz"],
    "eval --out": lambda e, d: ["eval", "--checkpoint", e["run"], "--data", e["data"], "--split", "val",
                                "--max-slices", "1", "--max-instances", "1", "--steps", "2", "--out", d / "eval"],
    "bench --json": lambda e, d: ["bench", "--json", d / "bench.json"],
    "plan --json": lambda e, d: ["plan", "--json", d / "plan.json"],
}


@pytest.mark.parametrize("where", ["read-only folder", "parent is a file"])
@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_unwritable_output_is_one_line_before_any_work(case, where, env, tmp_path, capsys, request):
    env = _with_bagel(env, request) if case.startswith("import") else env
    if where == "read-only folder":
        folder = _read_only_dir(tmp_path)
        reason = "cannot write in"
    else:
        (tmp_path / "afile").write_text("not a folder")
        folder = tmp_path / "afile"
        reason = "is a file"
    before = {"run": checksums(env["run"]), "data": checksums(env["data"]), "tmp": checksums(tmp_path)}
    argv = OUTPUT_CASES[case](env, folder)
    flag = case.split()[1]
    code, stderr = cli(argv, capsys)
    one_error(code, stderr, 2, flag, str(folder), reason)
    after = {"run": checksums(env["run"]), "data": checksums(env["data"]), "tmp": checksums(tmp_path)}
    assert after == before and not (env["root"] / "unused").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["afile"] if where == "parent is a file" else
                                                                ["read_only"] if os.geteuid() else [])


# ------------------------------------------------------------------------------------------------------------
# One writer per output: a second one is refused naming the holder; a dead holder's lock is taken over.
_HOLDER = ("import sys, time\nfrom synermedgen_jax import locking\n"
           "locking.acquire(sys.argv[1], '--out', 'holder')\nprint('held', flush=True)\nsys.stdin.read()\n")


def _hold(target: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(target)], cwd=h.REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(h.REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


LOCK_CASES = {
    "train": lambda e, t: (_train(t / "run", e["data"]), t / "run"),
    "build-data": lambda e, t: (["build-data", "--out", t / "data", *h.BUILD_ARGS, "--overwrite"], t / "data"),
    "import": lambda e, t: (["import", "--bagel", e["bagel"], "--out", t / "ckpt"], t / "ckpt"),
    "export": lambda e, t: (["export", "--checkpoint", e["run"], "--out", t / "bagel"], t / "bagel"),
    "synthesize": lambda e, t: (["synthesize", "--checkpoint", e["run"], "--input", e["root"] / "t1.nii.gz",
                                 "--source-modality", "t1", "--target-modality", "t2", "--output",
                                 t / "o.nii.gz"], t / "o.nii.gz"),
}


def test_second_writer_is_refused_naming_the_holder(env, tmp_path, capsys, request):
    import socket

    env = _with_bagel(env, request)
    shutil.copytree(env["run"], tmp_path / "run")
    shutil.copytree(env["data"], tmp_path / "data")
    before = checksums(tmp_path)
    for command, case in LOCK_CASES.items():
        argv, target = case(env, tmp_path)
        holder = _hold(target)
        try:
            code, stderr = cli(argv, capsys)
        finally:
            holder.stdin.close()
            holder.wait()
        one_error(code, stderr, 2, str(target), f"pid {holder.pid}", socket.gethostname(), "in use")
        assert checksums(tmp_path) == before, command
        assert not (target.parent / f".{target.name}.lock").exists()  # the holder released it on exit


def test_stale_lock_of_a_dead_process_is_taken_over(env, tmp_path, capsys):
    out = tmp_path / "bagel"
    holder = _hold(out)
    holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays, its flock goes with the process
    holder.wait()
    lock = tmp_path / ".bagel.lock"
    assert json.loads(lock.read_text())["pid"] == holder.pid
    code, stderr = cli(["export", "--checkpoint", env["run"], "--out", out], capsys)
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if "stale lock" in line]
    assert len(warnings) == 1 and f"pid {holder.pid}" in warnings[0] and str(out) in warnings[0], stderr
    assert (out / "ema.safetensors").is_file() and not lock.exists()
    # A lock file written on another host is not taken over (that host cannot be asked): one line naming it.
    lock.write_text(json.dumps({"pid": 1, "host": "another-host", "command": "export", "started": "then"}))
    code, stderr = cli(["export", "--checkpoint", env["run"], "--out", tmp_path / "bagel"], capsys)
    one_error(code, stderr, 2, str(lock), "another-host", "delete the file")


def test_concurrent_builds_into_one_folder(env, tmp_path, capsys):
    """The reported data loss: two build-data runs into one --out. The second is refused while the first runs;
    the first's build is complete and untouched by it."""
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "synermedgen_jax", "build-data", "--out", str(out), *h.BUILD_ARGS]
    first = subprocess.Popen(cmd, cwd=h.REPO, env=h.env(tmp_path / "cache"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".data.lock"
    while not lock.exists() or not lock.read_text():
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # paused mid-build, so the second build surely starts while it runs
    try:
        code, stderr = cli(["build-data", "--out", out, *h.BUILD_ARGS, "--seed", "1"], capsys)
    finally:
        first.send_signal(signal.SIGCONT)
    one_error(code, stderr, 2, str(out), f"pid {first.pid}", "in use")
    stdout, first_err = first.communicate(timeout=600)
    assert first.returncode == 0 and "Traceback" not in first_err, first_err[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 0
    for shard in manifest["shards"].values():
        for entry in shard:
            assert hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    assert not lock.exists()


# ------------------------------------------------------------------------------------------------------------
# The top-level guard: an exception escaping a command is one line naming the command and the error class.
def test_escaping_exception_is_one_line_and_releases_locks(env, tmp_path, capsys, monkeypatch):
    from synermedgen_jax.commands import export_bagel

    def broken(args):
        raise RuntimeError("an invariant broke\nsecond line of detail")

    monkeypatch.setattr(export_bagel, "main", broken)
    argv = ["export", "--checkpoint", env["run"], "--out", tmp_path / "bagel"]
    code, stderr = cli(argv, capsys)
    line = one_error(code, stderr, 1, "export", "RuntimeError", "an invariant broke", "--debug")
    assert "second line" not in line and not (tmp_path / ".bagel.lock").exists()
    monkeypatch.setenv("SYNERMEDGEN_DEBUG", "1")
    code, stderr = cli(argv, capsys)
    assert code == 1 and "Traceback" in stderr and "an invariant broke" in stderr
    monkeypatch.delenv("SYNERMEDGEN_DEBUG")
    code, stderr = cli(["--debug", *argv], capsys)
    assert code == 1 and "Traceback" in stderr

    def unwritable(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "bagel" / "model.safetensors"))

    monkeypatch.setattr(export_bagel, "main", unwritable)
    code, stderr = cli(argv, capsys)
    one_error(code, stderr, 1, "export", "model.safetensors", "errno 13 EACCES")
