"""Launchers launch what they say: the SLURM script runs one process per GPU and JAX's own SLURM detection gives
each process its GPU (checked in a faked SLURM environment); a job that sees another device count than it
reserved stops at start with one line; gs:// workdirs keep their scheme through the checkpoint and logging code
(etils.epath; object stores are faked by redirecting epath's file operations to a local folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import train_helpers as h

SBATCH = h.REPO / "launch" / "slurm.sbatch"


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
