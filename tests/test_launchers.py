"""Launchers launch what they say: the SLURM script runs one process per GPU and JAX's own SLURM detection gives
each process its GPU (checked in a faked SLURM environment); a job that sees another device count than it
reserved stops at start with one line; gs:// workdirs keep their scheme through the checkpoint and logging code
(etils.epath; object stores are faked by redirecting epath's file operations to a local folder).

The SLURM time-limit path runs the real batch script under bash with fake srun / scancel / scontrol on PATH: USR1
reaches the training task as SIGTERM, it saves, and the job is requeued; a run that finishes, a cancelled run and a
failed save are not requeued. launch/gpu_env.sh appends exactly the listed XLA flags to the caller's XLA_FLAGS and
jaxlib parses every one of them. The TPU script's --dry-run commands are checked, and its remote train and stop
commands are run here on a fake worker (detached from the caller, one log and pid file, SIGTERM to the trainer)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import train_helpers as h

SBATCH = h.REPO / "launch" / "slurm.sbatch"
GPU_ENV = h.REPO / "launch" / "gpu_env.sh"
TPU_POD = h.REPO / "launch" / "tpu_pod.sh"
SCRIPTS = [SBATCH, GPU_ENV, TPU_POD]

# Every flag launch/gpu_env.sh may add to XLA_FLAGS, with its value; the test fails on any other.
GPU_XLA_FLAGS = {
    "--xla_gpu_enable_latency_hiding_scheduler": "true",
    "--xla_gpu_enable_highest_priority_async_stream": "true",
    "--xla_gpu_enable_pipelined_all_gather": "true",
    "--xla_gpu_enable_pipelined_reduce_scatter": "true",
    "--xla_gpu_enable_pipelined_all_reduce": "true",
    "--xla_gpu_all_gather_combine_threshold_bytes": "1073741824",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes": "1073741824",
    "--xla_gpu_all_reduce_combine_threshold_bytes": "1073741824",
    "--xla_gpu_enable_all_gather_combine_by_dim": "false",
    "--xla_gpu_enable_reduce_scatter_combine_by_dim": "false",
}
LIBTPU_FLAGS = ["--xla_tpu_enable_async_collective_fusion=true",
                "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
                "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
                "--xla_tpu_overlap_compute_collective_tc=true", "--xla_enable_async_all_gather=true"]


def _sbatch_option(name: str) -> int:
    match = re.search(rf"^#SBATCH --{name}=(\d+)$", SBATCH.read_text(), re.MULTILINE)
    assert match, f"#SBATCH --{name} missing from {SBATCH}"
    return int(match.group(1))


def test_slurm_script_runs_one_process_per_gpu():
    gpus, tasks = _sbatch_option("gpus-per-node"), _sbatch_option("ntasks-per-node")
    assert tasks == gpus == 8
    text = SBATCH.read_text()
    assert "--distributed auto" in text and "--expect-devices $((SLURM_JOB_NUM_NODES * GPUS_PER_NODE))" in text
    assert re.search(rf"^GPUS_PER_NODE={gpus}\b", text, re.MULTILINE)


@pytest.mark.parametrize(("procid", "localid"), [(0, 0), (11, 3), (15, 7)])
def test_jax_slurm_detection_gives_each_task_its_gpu(monkeypatch, procid, localid):
    from jax._src import clusters

    nodes, per_node = 2, _sbatch_option("ntasks-per-node")
    for key in list(os.environ):
        if key.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_", "CLOUD_TPU")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", str(nodes))
    monkeypatch.setenv("SLURM_NTASKS", str(nodes * per_node))
    monkeypatch.setenv("SLURM_PROCID", str(procid))
    monkeypatch.setenv("SLURM_LOCALID", str(localid))
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-08]")
    address, processes, process_id, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 300)
    assert address.startswith("gpu07:") and processes == nodes * per_node and process_id == procid
    assert list(local_ids) == [localid]  # one GPU per process: nodes x 8 devices in all


def test_expect_devices_mismatch_is_one_line(tmp_path):
    data = h.build_data(tmp_path / "data")
    result = h.run(h.train_cmd("configs/stage1_gau.py:tiny", tmp_path / "run", [f"--config.data.dir={data}"],
                               "--expect-devices", "3"), h.env(tmp_path / "cache"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in errors if "--expect-devices 3: the job sees 1 devices" in line] != []
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_gs_workdir_keeps_its_scheme(tmp_path, monkeypatch):
    from etils import epath
    from etils.epath import testing

    from synermedgen_jax.training import checkpoint
    from synermedgen_jax.training.logging import RunLogger

    bucket = tmp_path / "bucket"

    def local(path) -> str:  # gs://bucket/x -> tmp/bucket/x
        text = os.fspath(path)
        assert text.startswith("gs://bucket"), text  # nothing else may be touched
        return str(bucket) + text[len("gs://bucket"):]

    def redirect(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    workdir = epath.Path("gs://bucket/runs/s1")
    assert str(workdir / "3") == "gs://bucket/runs/s1/3"
    assert checkpoint._kvstore_spec(workdir / "3" / "state") == "gs://bucket/runs/s1/3/state/"
    from synermedgen_jax.config import load_config

    config = load_config("configs/stage1_gau.py:tiny")
    config.train.progress = False
    with testing.mock_epath(open=redirect, exists=redirect, isdir=redirect, makedirs=redirect, mkdir=redirect,
                            listdir=redirect, glob=redirect, stat=redirect, rename=redirect, replace=redirect):
        # tensorboardX writes gs:// itself (google-cloud-storage and credentials); not under test here.
        monkeypatch.setattr("synermedgen_jax.training.logging.SummaryWriter", lambda logdir: _NullWriter(logdir))
        logger = RunLogger("gs://bucket/runs/s1", config, 10, 1)
        assert logger.writer.logdir == "gs://bucket/runs/s1/tb"
        logger.step(0, {"loss": 1.5}, 10, 0.1)
        logger.step(1, {"loss": 1.25}, 10, 0.1)
        logger.close()
        with pytest.raises(checkpoint.CheckpointError, match="gs://bucket/runs/s1 holds no complete checkpoint"):
            checkpoint.resolve("gs://bucket/runs/s1")
    rows = (bucket / "runs" / "s1" / "metrics.jsonl").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ['{"step": 0', '{"step": 1']
    assert not (tmp_path / "gs:").exists() and not os.path.exists("gs:")  # no local 'gs:/…' folder appeared


class _NullWriter:
    def __init__(self, logdir: str):
        self.logdir = logdir

    def add_scalar(self, *args, **kwargs): ...
    def add_image(self, *args, **kwargs): ...
    def flush(self): ...
    def close(self): ...


def test_local_launcher_help():
    result = subprocess.run([sys.executable, str(h.REPO / "launch" / "local.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--devices-per-process" in result.stdout


# ---- shell scripts: syntax, help ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax_and_help(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    result = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "launch/" in result.stdout, result.stderr
    text = script.read_text()
    assert "set -euo pipefail" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=h.REPO)
    assert result.returncode == 0, result.stdout


# ---- SLURM: time limit -> save -> requeue --------------------------------------------------------------------------

def test_slurm_script_traps_the_time_limit_signal():
    text = SBATCH.read_text()
    match = re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.MULTILINE)
    assert match and int(match.group(1)) >= 300  # to the batch shell, with time to finish a step and save
    assert re.search(r"^#SBATCH --requeue$", text, re.MULTILINE)
    assert re.search(r"^#SBATCH --open-mode=append$", text, re.MULTILINE)  # a requeue does not truncate the log
    assert re.search(r"^trap on_time_limit USR1$", text, re.MULTILINE)
    assert re.search(r"^\. launch/gpu_env\.sh$", text, re.MULTILINE)


_FAKE_SRUN = r"""#!/bin/bash
# Records its command and environment, runs the "task", and (like real srun) turns its own SIGTERM into a kill.
printf '%s\n' "$@" > "$FAKE_DIR/srun.args"
printf '%s\n' "XLA_FLAGS=$XLA_FLAGS" "JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR" > "$FAKE_DIR/srun.env"
bash "$FAKE_DIR/task.sh" &
child=$!
echo "$child" > "$FAKE_DIR/task.pid"
trap 'echo srun-term >> "$FAKE_DIR/events"; kill -KILL "$child"; exit 143' TERM
wait "$child"
"""
_FAKE_TASK = r"""#!/bin/bash
# The trainer: SIGTERM saves and exits FAKE_TERM_RC (the real one exits 0); otherwise it finishes after a while.
trap 'echo task-term >> "$FAKE_DIR/events"; echo saved >> "$FAKE_DIR/events"; exit "${FAKE_TERM_RC:-0}"' TERM
echo started >> "$FAKE_DIR/events"
for _ in $(seq "${FAKE_TICKS:-400}"); do sleep 0.05; done
echo finished >> "$FAKE_DIR/events"
"""
_FAKE_SCANCEL = r"""#!/bin/bash
echo "scancel $*" >> "$FAKE_DIR/events"
if [ "$1" = --signal=TERM ]; then kill -TERM "$(cat "$FAKE_DIR/task.pid")"; fi
"""
_FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_DIR/events"
"""


def _fake_slurm(tmp_path: Path, **extra: str) -> tuple[Path, dict[str, str]]:
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    for name, body in [("bin/srun", _FAKE_SRUN), ("bin/scancel", _FAKE_SCANCEL), ("bin/scontrol", _FAKE_SCONTROL),
                       ("task.sh", _FAKE_TASK)]:
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    (fake / "events").write_text("")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "XLA_", "JAX_", "SMG_"))}
    env.update(PATH=f"{fake / 'bin'}{os.pathsep}{env['PATH']}", FAKE_DIR=str(fake), SLURM_SUBMIT_DIR=str(h.REPO),
               SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               XLA_FLAGS="--xla_gpu_all_reduce_combine_threshold_bytes=5", **extra)
    return fake, env


def _events(fake: Path) -> list[str]:
    return (fake / "events").read_text().splitlines()


def _wait_until(predicate, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize(("case", "expected_rc", "expected_events"), [
    ("time_limit", 0, ["started", "scancel --signal=TERM 4242", "task-term", "saved", "scontrol requeue 4242"]),
    ("finished", 0, ["started", "finished"]),
    ("cancelled", 0, ["started", "task-term", "saved"]),
    ("save_failed", 3, ["started", "scancel --signal=TERM 4242", "task-term", "saved"]),
])
def test_slurm_time_limit_requeues_only_after_a_clean_save(tmp_path, case, expected_rc, expected_events):
    fake, env = _fake_slurm(tmp_path, FAKE_TICKS="8" if case == "finished" else "600",
                            FAKE_TERM_RC="3" if case == "save_failed" else "0")
    proc = subprocess.Popen(["bash", str(SBATCH), "configs/stage2_ucg.py:bagel_7b_mot", "runs/s2",
                             "--config.data.dir=/data/a b"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_until(lambda: (fake / "task.pid").exists() and "started" in _events(fake))
        if case in ("time_limit", "save_failed"):
            proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@N sends the batch shell
        elif case == "cancelled":  # scancel: SLURM sends TERM to the batch shell and to every task
            proc.send_signal(signal.SIGTERM)
            os.kill(int((fake / "task.pid").read_text()), signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == expected_rc, out
    assert _events(fake) == expected_events, out  # never srun-term: the task saves instead of being killed
    args = (fake / "srun.args").read_text().splitlines()
    assert args == ["--kill-on-bad-exit=1", "python", "-m", "synermedgen_jax", "train", "--distributed", "auto",
                    "--expect-devices", "16", "--config", "configs/stage2_ucg.py:bagel_7b_mot", "--workdir",
                    "runs/s2", "--config.data.dir=/data/a b"]
    srun_env = dict(line.split("=", 1) for line in (fake / "srun.env").read_text().splitlines())
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in srun_env["XLA_FLAGS"].split()
    assert srun_env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "jax_cache")


# ---- GPU environment ---------------------------------------------------------------------------------------------

def _source_gpu_env(tmp_path: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("XLA_", "JAX_", "SMG_"))}
    env.update(env_vars)
    script = (f". {shlex.quote(str(GPU_ENV))} && printf '%s\\n' \"$XLA_FLAGS\" \"$JAX_COMPILATION_CACHE_DIR\" "
              "\"${XLA_PYTHON_CLIENT_MEM_FRACTION-unset}\"")
    return subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)


def test_gpu_env_appends_the_listed_flags_and_keeps_the_users(tmp_path):
    mine = "--xla_force_host_platform_device_count=8 --xla_gpu_all_reduce_combine_threshold_bytes=5"
    result = _source_gpu_env(tmp_path, XLA_FLAGS=mine)
    assert result.returncode == 0, result.stderr
    flags, cache, fraction = result.stdout.splitlines()
    assert flags.startswith(mine + " ")  # appended, not clobbered
    added = dict(flag.split("=", 1) for flag in flags[len(mine):].split())
    expected = {k: v for k, v in GPU_XLA_FLAGS.items() if k != "--xla_gpu_all_reduce_combine_threshold_bytes"}
    assert added == expected  # every flag it sets is listed; the user's own value for a listed flag wins
    assert flags.split().count("--xla_gpu_all_reduce_combine_threshold_bytes=5") == 1
    assert cache == str(tmp_path / "runs" / "jax_cache") and (tmp_path / "runs" / "jax_cache").is_dir()
    assert fraction == "unset"  # JAX's default pool unless asked

    result = _source_gpu_env(tmp_path, JAX_COMPILATION_CACHE_DIR="gs://bucket/cache", SMG_MEM_FRACTION="0.9")
    flags, cache, fraction = result.stdout.splitlines()
    assert dict(flag.split("=", 1) for flag in flags.split()) == GPU_XLA_FLAGS
    assert (cache, fraction) == ("gs://bucket/cache", "0.9")
    bad = _source_gpu_env(tmp_path, SMG_MEM_FRACTION="90")
    assert bad.returncode != 0 and "SMG_MEM_FRACTION=90" in bad.stderr


def _jax_accepts(xla_flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(2).block_until_ready()"], env=env,
                          capture_output=True, text=True, timeout=180)


def test_jaxlib_parses_every_gpu_flag():
    # XLA parses all of XLA_FLAGS (GPU flags included) when any backend starts and aborts on an unknown flag, so
    # the CPU jaxlib pinned here proves each name exists in this XLA; the invented flag shows the check can fail.
    flags = " ".join(f"{name}={value}" for name, value in GPU_XLA_FLAGS.items())
    assert set(GPU_XLA_FLAGS) == set(re.findall(r"^\s*(--xla_[a-z0-9_]+)=", GPU_ENV.read_text(), re.MULTILINE))
    result = _jax_accepts(flags)
    assert result.returncode == 0, result.stderr[-2000:]
    invented = _jax_accepts(flags + " --xla_gpu_enable_async_collectives=true")  # removed from XLA
    assert invented.returncode != 0 and "Unknown flag" in invented.stderr


# ---- TPU pod -----------------------------------------------------------------------------------------------------

def _tpu(*args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TPU_", "LIBTPU_"))}
    env.update(env_vars)
    return subprocess.run(["bash", str(TPU_POD), "--dry-run", *args], env=env, capture_output=True, text=True,
                          timeout=30)


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _remote(command: list[str]) -> str:
    assert command[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], command
    return command[command.index("--command") + 1]


def test_tpu_dry_run_sets_up_then_starts_detached():
    result = _tpu("my-tpu", "us-east5-a", "configs/stage1_gau.py:tiny", "gs://b/run", "--config.data.dir=/d x")
    assert result.returncode == 0, result.stderr
    archive, scp, setup, train = _commands(result.stdout)
    assert archive[:2] == ["git", "-C"] and archive[3] == "archive" and archive[-1] == "HEAD"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    for command in (setup, train):
        assert command[4:9] == ["ssh", "my-tpu", "--zone", "us-east5-a", "--worker=all"]
    assert "pip install -q -r requirements.txt 'jax[tpu]==0.10.2'" in _remote(setup)
    remote = _remote(train)
    assert "setsid nohup .venv/bin/python -m synermedgen_jax train --distributed auto" in remote
    assert "--config configs/stage1_gau.py:tiny --workdir gs://b/run '--config.data.dir=/d x'" in remote
    assert f"export LIBTPU_INIT_ARGS='{' '.join(LIBTPU_FLAGS)}'" in remote
    assert "--logs my-tpu us-east5-a" in result.stdout and "--stop my-tpu us-east5-a" in result.stdout

    skipped = _tpu("--skip-setup", "t", "z", "c", "w", LIBTPU_INIT_ARGS="--xla_tpu_x=1")
    (only,) = _commands(skipped.stdout)
    assert "export LIBTPU_INIT_ARGS=--xla_tpu_x=1;" in _remote(only) and "pip" not in skipped.stdout
    (logs,) = _commands(_tpu("--logs", "t", "z", "3").stdout)
    assert "--worker=3" in logs and "tail -n 200 -F" in _remote(logs)
    usage = _tpu("t", "z")
    assert usage.returncode != 0 and not _commands(usage.stdout)


_FAKE_PYTHON = r"""#!/bin/bash
echo "$$" > "$FAKE_DIR/python.pid"
echo "args: $* LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS"
trap 'echo saved; exit 0' TERM
for _ in $(seq 1200); do sleep 0.05; done
"""


def test_tpu_remote_commands_detach_log_and_stop(tmp_path):
    # The worker side, run here: TPU_REPO_DIR is a folder whose .venv/bin/python stands in for the trainer.
    repo = tmp_path / "worker"
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").write_text(_FAKE_PYTHON)
    (repo / ".venv" / "bin" / "python").chmod(0o755)
    env = dict(os.environ, FAKE_DIR=str(tmp_path))
    (train,) = _commands(_tpu("--skip-setup", "t", "z", "cfg", "gs://b/w", TPU_REPO_DIR=str(repo)).stdout)
    (stop,) = _commands(_tpu("--stop", "t", "z", TPU_REPO_DIR=str(repo)).stdout)
    first = subprocess.run(["bash", "-c", _remote(train)], env=env, capture_output=True, text=True, timeout=30)
    pid = None
    try:
        assert first.returncode == 0, first.stderr
        _wait_until(lambda: (tmp_path / "python.pid").exists())
        pid = int((tmp_path / "python.pid").read_text())
        assert _alive(pid)  # the command returned while the trainer (a 60 s loop) goes on: the run is detached
        (pid_file,) = (repo / "logs").glob("train-*.pid")
        assert int(pid_file.read_text()) == pid  # the pid file names the trainer itself
        assert os.getsid(pid) == pid  # its own session: the end of the ssh session does not reach it
        second = subprocess.run(["bash", "-c", _remote(train)], env=env, capture_output=True, text=True, timeout=30)
        assert second.returncode == 1 and "still going" in second.stderr
        assert subprocess.run(["bash", "-c", _remote(stop)], env=env, timeout=30).returncode == 0
        _wait_until(lambda: not _alive(pid))
        (log,) = (repo / "logs").glob("train-*.log")
        text = log.read_text()
        assert "args: -m synermedgen_jax train --distributed auto --config cfg --workdir gs://b/w" in text
        assert f"LIBTPU_INIT_ARGS={' '.join(LIBTPU_FLAGS)}" in text and text.rstrip().endswith("saved")
    finally:
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # An exited child of ours is not reaped by us (setsid nohup's parent was the remote shell, now gone): a zombie
    # would still answer; /proc says whether it is one.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))
