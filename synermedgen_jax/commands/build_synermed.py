"""``build-data --source synermed``: the published SynerMed release folder -> training shards.

  python -m synermedgen_jax build-data --source synermed --root SynerMed/ --out data/synermed --workers 32
  # multi-host: every host builds its share; the last one to finish writes the manifest
  python -m synermedgen_jax build-data --source synermed --root SynerMed/ --out data/synermed \
      --process-index $I --process-count $N --workers 32

Reads SynerMed.parquet by row group (pyarrow) and SynerMed.jsonl by line, checks every row as the official
loaders read it (images decoded, truncated PNGs as with Pillow's LOAD_TRUNCATED_IMAGES; slice files present;
"combined" rows with one instruction for the whole chain kept; <image> markers beyond the images dropped; a
gpt turn present) and writes the good ones to records/edit-*.array_record and records/conv-*.array_record; bad
ones go to skipped.jsonl with their row or line number and the reason. A rerun resumes: finished units (row
groups, JSONL chunks) are kept. Writes manifest.json (counts per route, skipped rows per reason, rows kept
leniently as the official loaders do), tokenizer.json and a link slice -> the release's slice/ folder (conversation
images are read through it at training time; re-point it if the release moves). Exit status: 0 when built
(or this process's share is done), 1 when no good row remains, 2 for unusable input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from typing import TypeVar

from synermedgen_jax.commands._args import int_range, non_negative_int, positive_float, positive_int
from synermedgen_jax.commands._runner import request_from
from synermedgen_jax.data.synermed_build import SynerMedBuildConfig, build_release, summary_lines
from synermedgen_jax.data.volumes import DataError

Config = TypeVar("Config")
Result = TypeVar("Result")


def add_release_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--source synermed (the release folder)")
    group.add_argument("--workers", type=int_range(1, 4096), default=SynerMedBuildConfig.workers,
                       help="worker processes over row groups / chunks (1)")
    group.add_argument("--process-index", type=non_negative_int, default=SynerMedBuildConfig.process_index,
                       help="this host's index for a multi-host build (0)")
    group.add_argument("--process-count", type=positive_int, default=SynerMedBuildConfig.process_count,
                       help="hosts sharing the build (1)")
    group.add_argument("--jsonl-chunk-mb", type=positive_float, default=SynerMedBuildConfig.jsonl_chunk_mb,
                       help="JSONL work unit size in MiB (64)")
    group.add_argument("--batch-rows", type=positive_int, default=SynerMedBuildConfig.batch_rows,
                       help="Parquet rows decoded at a time per worker (64)")


def run_build(build: Callable[[Config], Result], config: Config,
              summary: Callable[[Result], Iterable[str]]) -> Result | None:
    """Runs a build (both builders) and prints its summary; a DataError is one error line and None."""
    try:
        result = build(config)
    except DataError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return None
    for line in summary(result):
        print(line)
    return result


def run(config: SynerMedBuildConfig) -> int:
    """Builds the release's shards (this process's share): the typed entry point of ``--source synermed``."""
    if config.workers < 1 or config.batch_rows < 1 or not config.jsonl_chunk_mb > 0:
        print("error: --workers and --batch-rows must be >= 1 and --jsonl-chunk-mb > 0", file=sys.stderr)
        return 2
    if not 0 <= config.process_index < config.process_count:
        print(f"error: --process-index {config.process_index}: must be below --process-count {config.process_count}",
              file=sys.stderr)
        return 2
    result = run_build(build_release, config, summary_lines)
    if result is None:
        return 2
    if not result.finished:
        return 0
    print(f"wrote {result.out}/manifest.json")
    if sum(result.records.values()) == 0:
        print(f"error: no good row remains ({len(result.skipped)} skipped; see {result.out}/skipped.jsonl)",
              file=sys.stderr)
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    return run(request_from(SynerMedBuildConfig, args, progress=not args.no_progress))
