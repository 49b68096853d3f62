"""Command line: ``python -m synermedgen_jax <command> [options]``.

Each command lives in ``synermedgen_jax/commands/<name>.py`` and exposes ``add_arguments(parser)`` and
``main(args) -> int``. Before a command runs, its outputs are checked writable and locked against a second
writer (synermedgen_jax/locking.py); an exception that escapes it is one line naming the command and the error
(the traceback with ``--debug`` or ``SYNERMEDGEN_DEBUG=1``), exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

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
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an unexpected error (also: SYNERMEDGEN_DEBUG=1)")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted after the command too (it is where one adds it to a failing command line).
    debug = "--debug" in argv or os.environ.get("SYNERMEDGEN_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # a refused argument (one line, commands/_args.py) or --help: its status, returned
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    return run_guarded(args.command, args, debug=debug)


def run_guarded(command: str, args: argparse.Namespace, *, debug: bool = False) -> int:
    """Claims the command's outputs, runs it, releases them. What escapes it becomes one line on stderr: an
    unwritable or locked output exit status 2 (before any work), a failed write (full disk, read-only file
    system) naming the path and the errno, or any other error naming its class, exit status 1."""
    from synermedgen_jax import locking

    mark = locking.held()
    try:
        locking.claim_outputs(command, args)
        return int(args._main(args) or 0)
    except locking.OutputError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"error: {command}: interrupted", file=sys.stderr, flush=True)
        return 130
    except OSError as err:
        _report(command, err, debug, _os_error_line(command, err))
        return 1
    except Exception as err:  # the backstop: a command's own checks should have named the problem
        text = (str(err).strip().splitlines() or [""])[0]
        text = text if len(text) <= 400 else text[:397] + "..."
        _report(command, err, debug, f"error: {command}: {type(err).__name__}: {text}".rstrip(": "))
        return 1
    finally:
        locking.release_above(mark)


_RESUMABLE = {"train": "the last complete checkpoint is intact; rerun the same command to resume",
              "quickstart": "finished stages are kept; rerun the same command to resume",
              "ablate": "finished stages are kept; rerun the same command to resume"}


def _os_error_line(command: str, err: OSError) -> str:
    """``error: train: WORKDIR/6/state: No space left on device, errno 28 ENOSPC; ...``."""
    from synermedgen_jax.locking import describe_os_error

    paths = [p for p in (err.filename, err.filename2) if p]
    where = " -> ".join(str(p) for p in paths) if paths else "(path not given)"
    hint = f"; {_RESUMABLE[command]}" if command in _RESUMABLE else ""
    return f"error: {command}: {where}: {describe_os_error(err)}{hint}"


def _report(command: str, err: BaseException, debug: bool, line: str) -> None:
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    print(line if debug else f"{line} (rerun with --debug or SYNERMEDGEN_DEBUG=1 for the traceback)",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
