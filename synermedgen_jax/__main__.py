"""Command line: ``python -m synermedgen_jax <command> [options]``.

Each command lives in ``synermedgen_jax/commands/<name>.py`` and exposes ``add_arguments(parser)`` and
``main(args) -> int``. Commands whose module is not there yet are listed as "not built yet".
"""

from __future__ import annotations

import argparse
import importlib
import sys

from synermedgen_jax.commands._runner import EXIT_CODES

# name -> (module, one-line help, issue that builds it)
COMMANDS: dict[str, tuple[str, str, int]] = {
    "quickstart": ("quickstart", "the main job on the embedded default: data, training, eval, report", 9),
    "build-data": ("build_data", "build SynerMed ArrayRecord shards from NIfTI datasets", 4),
    "train": ("train", "train a stage (vae, stage1_gau, stage2_ucg, baselines) from a config", 5),
    "eval": ("eval", "evaluate synthesis routes and understanding accuracy", 6),
    "synthesize": ("synthesize", "NIfTI in, NIfTI out: synthesize a target-modality volume", 6),
    "ask": ("ask", "answer understanding questions about images", 6),
    "import": ("import_bagel", "import a BAGEL/SynerMedGen PyTorch folder into an Orbax checkpoint", 7),
    "export": ("export_bagel", "export a checkpoint as a BAGEL/SynerMedGen PyTorch folder", 7),
    "bench": ("bench", "throughput benchmarks: train step, sampling, attention, data, metrics", 8),
    "plan": ("plan", "ahead-of-time memory and FLOP plan for a config on a mesh", 8),
    "ablate": ("ablate", "the GAU vs non-aligned vs no-Stage-I control experiment", 9),
    "model-info": ("model_info", "print a model variant's parameter counts and shapes", 2),
}


def _load(module_name: str):
    try:
        return importlib.import_module(f"synermedgen_jax.commands.{module_name}")
    except ModuleNotFoundError as err:
        if err.name == f"synermedgen_jax.commands.{module_name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m synermedgen_jax",
        description="SynerMedGen-JAX: unified medical image understanding and synthesis (BAGEL-style MoT).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module_name, help_text, issue) in COMMANDS.items():
        module = _load(module_name)
        if module is None:
            sub = subparsers.add_parser(name, help=f"[not built yet, issue {issue}] {help_text}")
            sub.set_defaults(_not_built=(name, issue))
            continue
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.epilog = (f"{sub.epilog}\n\n" if sub.epilog else "") + EXIT_CODES
        sub.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if hasattr(args, "_not_built"):
        name, issue = args._not_built
        print(f"error: command '{name}' is not built yet (tracked in issue {issue}).", file=sys.stderr)
        return 2
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
