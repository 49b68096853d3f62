"""Shared machinery of the commands: resumable stages run through the CLI (quickstart, ablate) and
``--config.KEY=VALUE`` overrides (train, bench, ablate)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The exit-status convention of every command (shown at the end of each --help).
EXIT_CODES = ("exit status: 0 done; 2 a one-line error (bad argument, config, input file, data or checkpoint, an "
              "unwritable output, an output another run is writing), found before any work where it can be, with "
              "nothing valid overwritten; 1 a failure during the work, one line naming it (a failed write names "
              "the path and the errno; --debug or SYNERMEDGEN_DEBUG=1 adds the traceback)")


def cli(argv: list[str]) -> int:
    """Runs ``python -m synermedgen_jax ARGV`` in this process (echoing the command, so logs are replayable)."""
    from synermedgen_jax.__main__ import main as cli_main

    print(f"\n$ python -m synermedgen_jax {' '.join(argv)}", flush=True)
    return cli_main(argv)


class StageState:
    """A JSON file of finished stages and their wall-clock seconds, so a rerun skips what is done."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"stages": {}}

    def done(self, name: str) -> bool:
        return name in self.data["stages"]

    def finish(self, name: str, seconds: float, **extra) -> None:
        self.data["stages"][name] = {"seconds": round(seconds, 1), **extra}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)

    def run(self, name: str, argv: list[str], **extra) -> None:
        """Runs a CLI stage unless already finished; a failing stage stops the job (rerun to resume)."""
        if self.done(name):
            print(f"[{self.path.stem}] {name}: already done ({self.data['stages'][name]['seconds']} s)")
            return
        start = time.time()
        code = cli(argv)
        if code != 0:
            raise SystemExit(f"error: stage '{name}' failed (exit {code}); rerun the same command to resume")
        self.finish(name, time.time() - start, **extra)


def train_overrides(data_dir: Path, steps: int, rows: int, seed: int) -> list[str]:
    """The overrides every quick stage shares (CPU-sized batches, fixed seed, no in-run eval or sample grids:
    the jobs evaluate once at the end)."""
    return [f"--config.data.dir={data_dir}", f"--config.train.steps={steps}", f"--config.train.rows={rows}",
            f"--config.train.seed={seed}", f"--config.data.seed={seed}", "--config.train.eval_every=0",
            "--config.train.image_every=0", f"--config.train.checkpoint_every={max(steps // 3, 1)}"]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
