"""Print a model variant's parameter counts per part (abstract shapes: nothing is allocated).

Example:
  python -m synermedgen_jax model-info --config configs/models.py:bagel_7b_mot
"""

from __future__ import annotations

import argparse
import sys

from flax import nnx

from synermedgen_jax.commands._args import one_line_errors
from synermedgen_jax.config import ConfigError, load_config
from synermedgen_jax.modeling.synermedgen import SynerMedGen, count_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/models.py:tiny",
                        help="model config FILE.py[:variant] (default: configs/models.py:tiny)")
    parser.add_argument("--shapes", action="store_true", help="also list every parameter's shape and axes")
    one_line_errors(parser)


def main(args: argparse.Namespace) -> int:


    try:
        config = load_config(args.config)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "llm" not in config:  # a run config holds the model under .model
        if "model" not in config or "llm" not in config.model:
            print(f"error: {args.config}: not a model or run config (no llm or model.llm section)", file=sys.stderr)
            return 2
        config = config.model
    model = nnx.eval_shape(lambda: SynerMedGen(config, rngs=nnx.Rngs(params=0)))
    counts = count_params(model)
    print(f"model variant: {config.variant}")
    for name, count in sorted(counts.items(), key=lambda kv: (kv[0] == "total", kv[0])):
        print(f"  {name:16} {count:>16,d}")
    if args.shapes:
        for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            axes = value.get_metadata().get("logical_axes")
            print(f"  {'.'.join(map(str, path)):80} {str(tuple(value.value.shape)):20} {axes}")
    return 0
