"""Command line: ``python -m synermedgen_jax <command> [options]``.

Each command lives in ``synermedgen_jax/commands/<name>.py`` and exposes ``add_arguments(parser)`` and
``main(args) -> int``; those that quickstart and ablate run as stages also expose a typed ``run(...)`` that
``main`` calls after parsing (commands/_stages.py). Before a command runs, its outputs are checked writable and
locked against a second writer (synermedgen_jax/locking.py); an exception that escapes it is one line naming the
command and the error (the traceback with ``--debug`` or ``SYNERMEDGEN_DEBUG=1``), exit status 1
(commands/_runner.py ``guarded``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from synermedgen_jax import locking
from synermedgen_jax.commands._runner import EXIT_CODES, debug_from_environment, guarded

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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``only`` of that one alone (the others, or all for ``only=""``,
    listed by their help line): a command line imports just its own command's module."""
    parser = argparse.ArgumentParser(
        prog="python -m synermedgen_jax",
        description="SynerMedGen-JAX: unified medical image understanding and synthesis (BAGEL-style MoT).",
    )
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an unexpected error (also: SYNERMEDGEN_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            subparsers.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"synermedgen_jax.commands.{module_name}")
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.epilog = (f"{sub.epilog}\n\n" if sub.epilog else "") + EXIT_CODES
        sub.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted after the command too (it is where one adds it to a failing command line).
    debug = "--debug" in argv or debug_from_environment()
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else "")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # a refused argument (one line, commands/_args.py) or --help: its status, returned
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    return run_guarded(args.command, args, debug=debug)


def run_guarded(command: str, args: argparse.Namespace, *, debug: bool = False) -> int:
    """Claims the command's outputs (locking.py), runs it, releases them; errors as one line (_runner.guarded)."""
    return guarded(command, lambda: locking.claim_outputs(command, args), lambda: args._main(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
