"""Shared machinery of the commands: the guard every command runs under (its outputs claimed, escaping errors
as one line, the exit statuses), the resumable stage log of quickstart and ablate, typed config fields and
``--config.KEY=VALUE`` overrides (train, bench, plan, ablate)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from synermedgen_jax import locking
from synermedgen_jax.staging import write_atomic

# The exit-status convention of every command (shown at the end of each --help).
EXIT_CODES = ("exit status: 0 done; 2 a one-line error (bad argument, config, input file, data or checkpoint, an "
              "unwritable output, an output another run is writing), found before any work where it can be, with "
              "nothing valid overwritten; 1 a failure during the work, one line naming it (a failed write names "
              "the path and the errno; --debug or SYNERMEDGEN_DEBUG=1 adds the traceback)")

_RESUMABLE = {"train": "the last complete checkpoint is intact; rerun the same command to resume",
              "quickstart": "finished stages are kept; rerun the same command to resume",
              "ablate": "finished stages are kept; rerun the same command to resume"}


def debug_from_environment() -> bool:
    return os.environ.get("SYNERMEDGEN_DEBUG", "") not in ("", "0")


def guarded(command: str, claim: Callable[[], None], work: Callable[[], int | None], *, debug: bool = False) -> int:
    """Claims the command's outputs (``claim``: locking.claim / claim_outputs), runs ``work``, releases them.
    What escapes it becomes one line on stderr: an unwritable or locked output exit status 2 (before any work),
    a failed write (full disk, read-only file system) naming the path and the errno, or any other error naming
    its class, exit status 1."""
    mark = locking.held()
    try:
        claim()
        return int(work() or 0)
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


def _os_error_line(command: str, err: OSError) -> str:
    """``error: train: WORKDIR/6/state: No space left on device, errno 28 ENOSPC; ...``."""
    paths = [p for p in (err.filename, err.filename2) if p]
    where = " -> ".join(str(p) for p in paths) if paths else "(path not given)"
    hint = f"; {_RESUMABLE[command]}" if command in _RESUMABLE else ""
    return f"error: {command}: {where}: {locking.describe_os_error(err)}{hint}"


def _report(command: str, err: BaseException, debug: bool, line: str) -> None:
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    print(line if debug else f"{line} (rerun with --debug or SYNERMEDGEN_DEBUG=1 for the traceback)",
          file=sys.stderr, flush=True)


def call(command: str, outputs: Mapping[str, object], work: Callable[[], int], arguments: Sequence[object]) -> int:
    """Runs a command's typed entry point as ``python -m synermedgen_jax COMMAND ARGUMENTS`` would run: the
    command line echoed (logs stay replayable), ``outputs`` (its OUTPUTS attrs -> paths) claimed with the locks
    ``__main__`` takes, escaping errors one line. Returns the exit status."""
    print(f"\n$ python -m synermedgen_jax {command} {' '.join(str(a) for a in arguments)}", flush=True)
    return guarded(command, lambda: locking.claim(command, dict(outputs)), work, debug=debug_from_environment())


def command_line(request, flags: Mapping[str, str] | None = None) -> list[str]:
    """The options that reproduce a typed request (a dataclass): each field that differs from its default as
    ``--field-name VALUE`` (``flags`` renames a field's option; a bool is the option alone, a tuple its values
    after it)."""
    out: list[str] = []
    for field in dataclasses.fields(request):
        value = getattr(request, field.name)
        if value == field.default:
            continue
        flag = (flags or {}).get(field.name, "--" + field.name.replace("_", "-"))
        if isinstance(value, bool):
            out.append(flag)
        elif isinstance(value, (tuple, list)):
            out += [flag, *(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out


def request_from(cls, args: argparse.Namespace, **given):
    """A typed request (dataclass ``cls``) from parsed arguments: each field from the argument of its name,
    ``given`` for the fields whose argument is spelt otherwise."""
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{name: getattr(args, name) for name in names - set(given) if hasattr(args, name)}, **given)


class StageState:
    """A JSON file of finished stages and their wall-clock seconds, so a rerun skips what is done."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"stages": {}}

    def done(self, name: str) -> bool:
        return name in self.data["stages"]

    def finish(self, name: str, seconds: float, **extra) -> None:
        self.data["stages"][name] = {"seconds": round(seconds, 1), **extra}
        write_atomic(self.path, json.dumps(self.data, indent=2))

    def run(self, name: str, stage: Callable[[], int], **extra) -> None:
        """Runs ``stage`` (returns an exit status) unless already finished; a failing stage stops the job (rerun
        to resume)."""
        if self.done(name):
            print(f"[{self.path.stem}] {name}: already done ({self.data['stages'][name]['seconds']} s)")
            return
        start = time.time()
        code = stage()
        if code != 0:
            raise SystemExit(f"error: stage '{name}' failed (exit {code}); rerun the same command to resume")
        self.finish(name, time.time() - start, **extra)


def config_arguments(fields: Mapping[str, object]) -> list[str]:
    """``fields`` as the ``--config.KEY=VALUE`` options that set them."""
    return [f"--config.{key}={value}" for key, value in fields.items()]


def accept_config_overrides(parser: argparse.ArgumentParser) -> None:
    """Collects ``--config.KEY=VALUE`` arguments into ``args.overrides`` (argparse cannot declare an open set of
    options; the top-level parser hands the sub-command's leftovers to this parser's parse_known_args)."""
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        overrides = [a for a in args if a.startswith("--config.")]
        namespace, rest = original([a for a in args if not a.startswith("--config.")], namespace)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + overrides
        return namespace, rest

    parser.parse_known_args = parse_known_args
