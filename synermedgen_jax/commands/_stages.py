"""The stages quickstart and ablate run: each a call of a command's typed entry point (``train.run``,
``build_data.run``, ``eval.run``, ``synthesize.run``), echoed as the command line that reproduces it, under the
locks ``__main__`` takes for that command (locking.claim: a stage's outputs are claimed as a separate command's
would be, inside the job's own lock on its workdir) and with its errors as one line (_runner.guarded). Each
returns the exit status the command would."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from synermedgen_jax.commands import build_data, synthesize
from synermedgen_jax.commands import eval as eval_command
from synermedgen_jax.commands import train as train_command
from synermedgen_jax.commands._runner import call, command_line, config_arguments
from synermedgen_jax.config import ConfigError, apply_overrides, load_config, set_fields
from synermedgen_jax.data.build import BuildConfig


def quick_train_fields(data_dir: Path, steps: int, rows: int, seed: int) -> dict[str, object]:
    """The config fields every quick stage sets (CPU-sized batches, fixed seed, no in-run eval or sample grids:
    the jobs evaluate once at the end)."""
    return {"data.dir": str(data_dir), "train.steps": steps, "train.rows": rows, "train.seed": seed,
            "data.seed": seed, "train.eval_every": 0, "train.image_every": 0,
            "train.checkpoint_every": max(steps // 3, 1)}


def train(spec: str, workdir: Path, fields: Mapping[str, object], overrides: Sequence[str] = ()) -> int:
    """``train --config SPEC --workdir WORKDIR``: the config file's config with ``fields`` set, then the user's
    ``--config.KEY=VALUE`` ``overrides`` applied (they win)."""

    def work() -> int:
        try:
            config = apply_overrides(set_fields(load_config(spec), fields), list(overrides))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return train_command.run(config, str(workdir))

    return call("train", {"workdir": workdir}, work,
                ["--config", spec, "--workdir", workdir, *config_arguments(fields), *overrides])


def build(config: BuildConfig) -> int:
    """``build-data`` of ``config``."""
    return call("build-data", {"out": config.out, "contact_sheet": config.contact_sheet},
                lambda: build_data.run(config), command_line(config, {"split_fractions": "--split",
                                                                      "progress": "--no-progress"}))


def evaluate(request: eval_command.EvalRequest) -> int:
    """``eval`` of ``request``."""
    return call("eval", {"out": request.out}, lambda: eval_command.run(request),
                command_line(request, eval_command.FLAGS))


def synthesize_volume(request: synthesize.SynthesisRequest) -> int:
    """``synthesize`` of ``request``."""
    return call("synthesize", {"output": request.output}, lambda: synthesize.run(request),
                command_line(request, synthesize.FLAGS))
