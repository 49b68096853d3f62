"""Data-pipeline throughput: records/s (read + decode) and packs/s (samples -> packed rows), in-process vs
Grain worker processes.

    python -m tools.bench_data --data /tmp/simdata --model small --rows 200 --workers 0 2

Builds a small mni152-sim dataset first when --data has no manifest.json (--subjects, --slice-size).
The budget defaults to one that holds a whole CTS sample of the chosen model variant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from synermedgen_jax.config import load_config
from synermedgen_jax.data.build import BuildConfig, build
from synermedgen_jax.data.packing import PackBudget
from synermedgen_jax.data.pipeline import PipelineConfig, packed_dataset
from synermedgen_jax.data.records import RecordReader
from synermedgen_jax.stages import DataStage


def pack_budget(variant: str, slice_size: int):
    if variant == "tiny":
        return PackBudget(und_tokens=1024, gen_tokens=512, vit_patches=512, vit_images=24, vae_images=8,
                          ce_tokens=128, image_size=(32, 32), vit_image_size=(56, 56))
    # small: ViT 16 patches/side max; 112 px ViT images (64 patches), 64 px VAE images (8x8 latent tokens)
    return PackBudget(und_tokens=2048, gen_tokens=512, vit_patches=1024, vit_images=32, vae_images=8,
                      ce_tokens=256, image_size=(64, 64), vit_image_size=(112, 112))


def build_if_missing(data: Path, subjects: int, slice_size: int) -> bool:
    """Builds a small mni152-sim dataset into ``data`` when it has no manifest.json; whether it did."""
    if (data / "manifest.json").is_file():
        return False
    build(BuildConfig(source="mni152-sim", out=str(data), subjects=subjects, slice_size=slice_size, overwrite=True,
                      progress=False))
    return True


def records_per_s(reader: RecordReader, records: int) -> tuple[int, float]:
    """``(records read, records/s)`` of random reads (read + decode) of up to ``records`` records."""
    n = min(records, len(reader))
    start = time.perf_counter()
    for i in range(n):
        reader[(i * 7919) % len(reader)]
    return n, n / (time.perf_counter() - start)


def packs_per_s(data: Path, budget: PackBudget, model_config: Any, config: PipelineConfig,
                rows: int) -> tuple[float, float]:
    """``(packs/s, samples/s)`` of ``rows`` packed rows of the pipeline after one warm-up row."""
    it = iter(packed_dataset(data, budget, model_config, config))
    next(it)  # warm-up (opens readers and the tokenizer, starts workers)
    samples = 0
    start = time.perf_counter()
    for _ in range(rows):
        batch = next(it)
        samples += int((batch["sample_id"].max(axis=1) + 1).sum())
    elapsed = time.perf_counter() - start
    return rows / elapsed, samples / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/smg_bench_data")
    parser.add_argument("--model", choices=("tiny", "small"), default="small")
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--slice-size", type=int, default=128)
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--stage", default=DataStage.MIXED.value)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        print(f"building mni152-sim into {data} ...")
    build_if_missing(data, args.subjects, args.slice_size)
    reader = RecordReader(data, "train")
    _, rate = records_per_s(reader, args.records)
    print(f"records/s (random read + decode, {len(reader[0]['images'])} modalities of "
          f"{args.slice_size}px): {rate:.0f}")

    model_config = load_config(f"configs/models.py:{args.model}")
    budget = pack_budget(args.model, args.slice_size)
    for workers in args.workers:
        config = PipelineConfig(stage=args.stage, rows_per_batch=1, workers=workers, augment=True,
                                process_index=0, process_count=1)
        packs, samples = packs_per_s(data, budget, model_config, config, args.rows)
        print(f"workers={workers}: packs/s {packs:.1f}  samples/s {samples:.1f}  "
              f"({args.model} budget, stage {args.stage})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
