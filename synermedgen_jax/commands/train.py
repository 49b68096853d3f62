"""Train a stage from a config; resumes automatically when the workdir holds a checkpoint.

  python -m synermedgen_jax train --config configs/stage1_gau.py:tiny --workdir runs/s1 --config.data.dir=data/sim
  python -m synermedgen_jax train --config configs/stage2_ucg.py:small --workdir runs/s2 \
      --config.data.dir=data/sim --config.init_from=runs/s1 --config.mesh.fsdp=4 --config.mesh.tensor=2

Stages (configs/): vae.py (stage 0), stage1_gau.py, stage2_ucg.py, baseline_vqa.py, ablations.py:no_{cts,mi,tia};
variants tiny, small, bagel_7b_mot. Any config key can be overridden with --config.KEY=VALUE (unknown keys are
an error that suggests close matches). SIGTERM saves a checkpoint and exits 0; rerun the command to resume.

Multi-host: jax.distributed is initialised from --coordinator/--num-processes/--process-id, or from the
environment on TPU pods and SLURM (--distributed auto). See launch/README.md.
Writes to WORKDIR: <step>/ Orbax checkpoints, config.json, metrics.jsonl, tb/ (tensorboard). A damaged newest
checkpoint (a truncated or missing file) is named, renamed damaged-<step>, and the run resumes from the newest
readable step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import jax
import ml_collections
from etils import epath

from synermedgen_jax.commands._args import non_negative_int, one_line_errors, positive_int
from synermedgen_jax.commands._runner import accept_config_overrides
from synermedgen_jax.config import ConfigError, apply_overrides, load_config
from synermedgen_jax.data.records import SPLITS, ShardError, check_shards
from synermedgen_jax.data.tokenizer import tokenizer_mismatch
from synermedgen_jax.inference.loading import checkpoint_tokenizer
from synermedgen_jax.inference.sample_grids import SampleGrids
from synermedgen_jax.training.checkpoint import CheckpointError, is_params_checkpoint, read_config
from synermedgen_jax.training.loop import TrainingError, resolve_config, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/FILE.py[:variant]")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and config.json go here")
    parser.add_argument("--stop-at", type=non_negative_int, default=None,
                        help="save and exit cleanly when reaching this step (as if preempted)")
    parser.add_argument("--distributed", choices=("off", "auto"), default="off",
                        help="auto: jax.distributed.initialize() from the TPU/SLURM environment")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (explicit multi-process)")
    parser.add_argument("--num-processes", type=positive_int, help="number of processes (with --coordinator)")
    parser.add_argument("--process-id", type=non_negative_int, help="this process's index (with --coordinator)")
    parser.add_argument("--expect-devices", type=non_negative_int, default=0,
                        help="fail at start unless the job sees exactly this many devices in all (0: no check); "
                             "launchers pass the hardware they reserved, so a mis-detected cluster cannot fill "
                             "a -1 mesh axis with a fraction of it")
    parser.epilog = "--config.KEY=VALUE   override any config key (repeatable)"
    accept_config_overrides(parser)
    one_line_errors(parser)


def validate(config, workdir: str, stop_at: int | None) -> None:
    """Every check that needs no model or data loading, before any of it (ConfigError naming the field)."""
    train = config.train
    for key in ("steps", "rows", "checkpoint_every", "grad_accum", "keep"):
        if key in train and int(train[key]) <= 0:
            raise ConfigError(f"--config.train.{key}={train[key]}: must be a positive integer")
    for key in ("eval_every", "image_every", "log_every"):
        if key in train and int(train[key]) < 0:
            raise ConfigError(f"--config.train.{key}={train[key]}: must be >= 0")
    if stop_at is not None and stop_at < 0:  # the API path; the CLI's argument type refuses it already
        raise ConfigError(f"--stop-at {stop_at}: must be >= 0")
    for key in ("init_from", "vae_from"):
        if config.get(key) and not epath.Path(str(config[key])).exists():
            raise ConfigError(f"--config.{key}={config[key]}: does not exist")
        if config.get(key) and "://" not in str(config[key]) and not Path(str(config[key])).is_dir():
            raise ConfigError(f"--config.{key}={config[key]}: is a file; expected a checkpoint folder (a training "
                              "workdir, a step folder or what import writes)")
    try:
        resolve_config(config)
    except (ValueError, TrainingError) as err:  # unknown stage, nan policy, rows vs grad_accum, vae_from's scale
        raise ConfigError(str(err).splitlines()[0]) from None
    data = Path(str(config.data.dir))
    if not (data / "manifest.json").is_file() or not (data / "records").is_dir():
        what = "does not exist" if not data.exists() else "is not a built data folder (no manifest.json/records)"
        raise ConfigError(f"--config.data.dir={data}: {what}; build it with build-data")
    _check_splits(config, data)
    _check_tokenizer(config, data)
    try:  # a damaged shard is named now, not as a Riegeli traceback at the step that reads it
        check_shards(data)
    except ShardError as err:
        raise ConfigError(f"--config.data.dir={data}: {err}") from None
    if "://" in str(workdir):  # remote storage (gs://…): Orbax and the logger create it through etils.epath
        return
    path = Path(workdir)
    _check_not_inside_a_run(workdir, path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"--workdir {workdir}: {blocker} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--workdir {workdir}: cannot create it ({err.strerror or err})") from None


def _check_splits(config, data: Path) -> None:
    """The record splits the run reads must be in the build (a records build names train/val/test shards)."""
    try:
        shards = json.loads((data / "manifest.json").read_text()).get("shards") or {}
    except (OSError, ValueError, AttributeError):
        raise ConfigError(f"--config.data.dir={data}: manifest.json is unreadable; rebuild the data") from None
    if not isinstance(shards, dict) or not set(shards) & set(SPLITS):
        return  # a SynerMed release build (edit/conv shards): the pipeline picks its own
    wanted = [("data.split", config.data.get("split", "train"))]
    if int(config.train.get("eval_every", 0) or 0) > 0:
        wanted.append(("data.eval_split", config.data.get("eval_split", "val")))
    for key, split in wanted:
        if split not in shards:
            raise ConfigError(f"--config.{key}={split}: not a split of the build {data} (it has "
                              f"{', '.join(sorted(shards))})")


def _check_not_inside_a_run(workdir: str, path: Path) -> None:
    """--workdir must be a run folder, not one of a run's step folders (``run/200``) or a folder inside one: a
    fresh run would start there, inside the other run's checkpoint (ConfigError naming the run to pass)."""
    def is_step(folder: Path) -> bool:
        return folder.name.isdigit() and any((folder / item).exists() for item in ("state", "_CHECKPOINT_METADATA"))

    resolved = path.resolve()
    for folder in (resolved, *resolved.parents):
        if is_step(folder):
            raise ConfigError(f"--workdir {workdir}: is inside the checkpoint step folder {folder} of the run "
                              f"{folder.parent}; pass --workdir {folder.parent} to resume that run, or a new folder")
        if folder.name.startswith("damaged-") and folder.name[len("damaged-"):].isdigit():
            raise ConfigError(f"--workdir {workdir}: is the set-aside damaged checkpoint {folder}; pass a run folder")
    if (path / "manifest.json").is_file() and (path / "records").is_dir():
        raise ConfigError(f"--workdir {workdir}: is a built data folder; pass it as --config.data.dir and give the "
                          "run its own --workdir")
    if (path / "params").is_dir() and (path / "config.json").is_file():
        raise ConfigError(f"--workdir {workdir}: is a parameter checkpoint (what import writes); pass it as "
                          "--config.init_from and give the run its own --workdir")


def _check_tokenizer(config, data) -> None:
    """The build's token ids must fit the model's embedding and, with ``init_from``, be the ids the weights were
    trained with (an import records its tokenizer; a run's is its data's): else one ConfigError line."""
    found = json.loads((data / "manifest.json").read_text()).get("tokenizer") or {}
    expected, origin = None, ""
    if config.get("init_from") and "://" not in str(config.init_from):
        try:
            run = None if is_params_checkpoint(config.init_from) else read_config(config.init_from)
            _, expected = checkpoint_tokenizer(config.init_from, run)
        except (CheckpointError, OSError, ValueError):
            expected = None  # an unreadable init checkpoint is reported by the loop, with its own message
        origin = f" (--config.init_from={config.init_from})"
    problem = tokenizer_mismatch(found, expected, int(config.model.llm.vocab_size))
    if problem:
        raise ConfigError(f"--config.data.dir={data}: tokenizer.json: {problem}{origin}; rebuild the data with "
                          "build-data --tokenizer <the weights' tokenizer folder>")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How the process joins a multi-process job (train's --distributed, --coordinator, ... options)."""

    distributed: str = "off"  # auto: jax.distributed.initialize() from the TPU/SLURM environment
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    expect_devices: int = 0  # 0: no check


def _init_distributed(launch: Launch) -> None:
    if launch.coordinator:
        if launch.num_processes is None or launch.process_id is None:
            raise SystemExit("error: --coordinator needs --num-processes and --process-id")
        jax.distributed.initialize(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                                   process_id=launch.process_id)
    elif launch.distributed == "auto":
        jax.distributed.initialize()


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
        launch: Launch = Launch()) -> int:
    """Trains ``config`` into ``workdir`` (resuming from its checkpoint): the typed entry point of ``train``
    (quickstart and ablate call it). Every check of ``validate`` first; a bad config, checkpoint or device count
    is one error line, exit status 2."""
    try:
        validate(config, workdir, stop_at)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _init_distributed(launch)
    if launch.expect_devices and jax.device_count() != launch.expect_devices:
        print(f"error: --expect-devices {launch.expect_devices}: the job sees {jax.device_count()} devices "
              f"({jax.process_count()} processes x {jax.local_device_count()} local); check the launcher's "
              "tasks per node and GPUs per task", file=sys.stderr)
        return 2
    try:
        return train(config, workdir, stop_at=stop_at, sample_grids=SampleGrids)
    except (CheckpointError, TrainingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(args: argparse.Namespace) -> int:
    try:
        config = apply_overrides(load_config(args.config), list(getattr(args, "overrides", None) or []))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    launch = Launch(distributed=args.distributed, coordinator=args.coordinator, num_processes=args.num_processes,
                    process_id=args.process_id, expect_devices=args.expect_devices)
    return run(config, args.workdir, stop_at=args.stop_at, launch=launch)
