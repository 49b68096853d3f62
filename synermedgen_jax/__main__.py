"""Command line: ``python -m synermedgen_jax <command> [options]``.

Each command lives in ``synermedgen_jax/commands/<name>.py`` and exposes ``add_arguments(parser)`` and
``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from synermedgen_jax.commands._runner import EXIT_CODES

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("quickstart", "the main job on the embedded default: data, training, eval, report"),
    "build-data": ("build_data", "build SynerMed ArrayRecord shards from NIfTI datasets"),
    "train": ("train", "train a stage (vae, stage1_gau, stage2_ucg, baselines) from a config"),
    "eval": ("eval", "evaluate synthesis routes and understanding accuracy"),
    "synthesize": ("synthesize", "NIfTI in, NIfTI out: synthesize a target-modality volume"),
    "ask": ("ask", "answer understanding questions about images"),
    "import": ("import_bagel", "import a BAGEL/SynerMedGen PyTorch folder into an Orbax checkpoint"),
    "export": ("export_bagel", "export a checkpoint as a BAGEL/SynerMedGen PyTorch folder"),
    "bench": ("bench", "throughput benchmarks: train step, sampling, attention, data, metrics"),
    "plan": ("plan", "ahead-of-time memory and FLOP plan for a config on a mesh"),
    "ablate": ("ablate", "the GAU vs non-aligned vs no-Stage-I control experiment"),
    "model-info": ("model_info", "print a model variant's parameter counts and shapes"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m synermedgen_jax",
        description="SynerMedGen-JAX: unified medical image understanding and synthesis (BAGEL-style MoT).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"synermedgen_jax.commands.{module_name}")
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
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
