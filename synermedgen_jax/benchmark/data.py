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
        build(BuildConfig(source="mni152-sim", out=str(data), subjects=args.subjects, slice_size=args.slice_size,
                          overwrite=True, progress=False))
    reader = RecordReader(data, "train")
    n = min(args.records, len(reader))
    start = time.perf_counter()
    for i in range(n):
        reader[(i * 7919) % len(reader)]
    rate = n / (time.perf_counter() - start)
    print(f"records/s (random read + decode, {len(reader[0]['images'])} modalities of "
          f"{args.slice_size}px): {rate:.0f}")

    model_config = load_config(f"configs/models.py:{args.model}")
    budget = pack_budget(args.model, args.slice_size)
    for workers in args.workers:
        config = PipelineConfig(stage=args.stage, rows_per_batch=1, workers=workers, augment=True,
                                process_index=0, process_count=1)
        it = iter(packed_dataset(data, budget, model_config, config))
        next(it)  # warm-up (opens readers, starts workers)
        samples = 0
        start = time.perf_counter()
        for _ in range(args.rows):
            batch = next(it)
            samples += int((batch["sample_id"].max(axis=1) + 1).sum())
        elapsed = time.perf_counter() - start
        print(f"workers={workers}: packs/s {args.rows / elapsed:.1f}  samples/s {samples / elapsed:.1f}  "
              f"({args.model} budget, stage {args.stage})")
        del it
    return 0


if __name__ == "__main__":
    sys.exit(main())
