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

from synermedgen_jax.commands._args import int_range, non_negative_int, positive_float, positive_int


def add_release_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--source synermed (the release folder)")
    group.add_argument("--workers", type=int_range(1, 4096), default=1,
                       help="worker processes over row groups / chunks (1)")
    group.add_argument("--process-index", type=non_negative_int, default=0,
                       help="this host's index for a multi-host build (0)")
    group.add_argument("--process-count", type=positive_int, default=1, help="hosts sharing the build (1)")
    group.add_argument("--jsonl-chunk-mb", type=positive_float, default=64.0, help="JSONL work unit size in MiB (64)")
    group.add_argument("--batch-rows", type=positive_int, default=64,
                       help="Parquet rows decoded at a time per worker (64)")


def main(args: argparse.Namespace) -> int:
    from synermedgen_jax.data.synermed_build import SynerMedBuildConfig, build_release, summary_lines
    from synermedgen_jax.data.volumes import DataError

    if args.workers < 1 or args.batch_rows < 1 or not args.jsonl_chunk_mb > 0:
        print("error: --workers and --batch-rows must be >= 1 and --jsonl-chunk-mb > 0", file=sys.stderr)
        return 2
    if not 0 <= args.process_index < args.process_count:
        print(f"error: --process-index {args.process_index}: must be below --process-count {args.process_count}",
              file=sys.stderr)
        return 2
    config = SynerMedBuildConfig(root=args.root, out=args.out, workers=args.workers,
                                 process_index=args.process_index, process_count=args.process_count,
                                 jsonl_chunk_mb=args.jsonl_chunk_mb, batch_rows=args.batch_rows,
                                 vocab_size=args.vocab_size, tokenizer=args.tokenizer, overwrite=args.overwrite,
                                 progress=not args.no_progress)
    try:
        result = build_release(config)
    except DataError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    for line in summary_lines(result):
        print(line)
    if not result.finished:
        return 0
    print(f"wrote {result.out}/manifest.json")
    if sum(result.records.values()) == 0:
        print(f"error: no good row remains ({len(result.skipped)} skipped; see {result.out}/skipped.jsonl)",
              file=sys.stderr)
        return 1
    return 0
