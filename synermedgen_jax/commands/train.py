"""Train a stage from a config; resumes automatically when the workdir holds a checkpoint.

  python -m synermedgen_jax train --config configs/stage1_gau.py:tiny --workdir runs/s1 --config.data.dir=data/sim
  python -m synermedgen_jax train --config configs/stage2_ucg.py:small --workdir runs/s2 \
      --config.data.dir=data/sim --config.init_from=runs/s1 --config.mesh.fsdp=4 --config.mesh.tensor=2

Stages (configs/): vae.py (stage 0), stage1_gau.py, stage2_ucg.py, baseline_vqa.py, ablations.py:no_{cts,mi,tia};
variants tiny, small, bagel_7b_mot. Any config key can be overridden with --config.KEY=VALUE (unknown keys are
an error that suggests close matches). SIGTERM saves a checkpoint and exits 0; rerun the command to resume.

Multi-host: jax.distributed is initialised from --coordinator/--num-processes/--process-id, or from the
environment on TPU pods and SLURM (--distributed auto). See launch/README.md.
Writes to WORKDIR: <step>/ Orbax checkpoints, config.json, metrics.jsonl, tb/ (tensorboard).
"""

from __future__ import annotations

import argparse
import os
import sys

from synermedgen_jax.commands._runner import accept_config_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/FILE.py[:variant]")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and config.json go here")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="save and exit cleanly when reaching this step (as if preempted)")
    parser.add_argument("--distributed", choices=("off", "auto"), default="off",
                        help="auto: jax.distributed.initialize() from the TPU/SLURM environment")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (explicit multi-process)")
    parser.add_argument("--num-processes", type=int, help="number of processes (with --coordinator)")
    parser.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")
    parser.epilog = "--config.KEY=VALUE   override any config key (repeatable)"
    accept_config_overrides(parser)


def _init_distributed(args: argparse.Namespace) -> None:
    import jax

    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise SystemExit("error: --coordinator needs --num-processes and --process-id")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.distributed == "auto":
        jax.distributed.initialize()


def main(args: argparse.Namespace) -> int:
    overrides = list(getattr(args, "overrides", None) or [])
    from synermedgen_jax.config import ConfigError, apply_overrides, load_config

    try:
        config = apply_overrides(load_config(args.config), overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _init_distributed(args)
    from synermedgen_jax.training.checkpoint import CheckpointError
    from synermedgen_jax.training.loop import TrainingError, train

    try:
        return train(config, args.workdir, stop_at=args.stop_at)
    except (CheckpointError, TrainingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
