"""``synthesize --metadata``: the official SynerMedGen inference convention (inference/metadata.py).

  python -m synermedgen_jax synthesize --checkpoint runs/s2 --metadata metadata.json --image-root SynerMed/slice \
      --output-dir preds/ [--batch-size 8 --devices 8] [--split-count 4 --split-index 0] [--output-style ours]

metadata.json: {key: {"id": source path relative to --image-root, "prompt": instruction}}; writes
<output-dir>/<key>.png and skips keys whose PNG exists. Defaults as the official script: 50 timesteps, shift 3.0,
text guidance 4.0, image guidance 1.5; outputs RGB at the generated size cropped to their bounding box
(--output-style official; `ours`: grey at the source's size). --split-count/--split-index take one contiguous
chunk of the keys in file order, as the official script. Exit status: 0 when every key of this share has an
output, 1 when some source could not be read (listed), 2 for unusable input (one line).
"""

from __future__ import annotations

import argparse
import sys

import jax
from tqdm import tqdm

from synermedgen_jax.inference import family
from synermedgen_jax.inference.loading import InferenceError, load_for_inference
from synermedgen_jax.inference.metadata import read_metadata, split_keys, synthesize_metadata
from synermedgen_jax.inference.sampler import SamplerConfig


def add_metadata_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("official metadata convention (instead of --input ... --output)")
    group.add_argument("--metadata", help="{key: {id, prompt}} JSON file")
    group.add_argument("--image-root", help="folder the entries' 'id' paths are relative to")
    group.add_argument("--output-dir", help="folder for <key>.png outputs")
    group.add_argument("--context-order", choices=("auto", "image-first", "text-first"), default="auto",
                       help="auto: image-first (the official order) for checkpoints trained on a SynerMed "
                            "release build, else text-first")
    group.add_argument("--output-style", choices=("official", "ours"), default="official",
                       help="official (default): as the official script writes, RGB (grey replicated) at the "
                            "generated size, cropped to its bounding box as PIL's getbbox(); ours: 8-bit grey "
                            "resized back to the source image's size")
    group.add_argument("--split-count", type=int, default=None, metavar="N",
                       help="split the keys, in metadata.json's insertion order, into N contiguous chunks of "
                            "ceil(keys/N) (the official script's split: contiguous, not strided) and run one "
                            "(default 1; on several JAX processes each process then takes its contiguous share "
                            "of the chunk, so the default is chunk process_index of process_count)")
    group.add_argument("--split-index", type=int, default=None, metavar="I",
                       help="the zero-based chunk to run, 0 <= I < N (default 0)")


def share_of_keys(keys: list[str], split_count: int | None, split_index: int | None) -> tuple[list[str], str]:
    """This process's keys: chunk ``split_index`` of ``split_count`` (defaults 1 / 0), then this JAX process's
    contiguous share of it (the official split, then its rank split). Returns ``(keys, description)``."""

    count = 1 if split_count is None else split_count
    index = 0 if split_index is None else split_index
    chunk = split_keys(keys, count, index)
    processes = jax.process_count()
    mine = split_keys(chunk, processes, jax.process_index())
    where = f"split {index}/{count}: {len(chunk)} of {len(keys)} key(s)"
    if processes > 1:
        where += f"; process {jax.process_index()}/{processes}: {len(mine)}"
    return mine, where


def main(args: argparse.Namespace) -> int:
    try:
        if not args.image_root or not args.output_dir:
            raise InferenceError("--metadata needs --image-root DIR and --output-dir DIR")
        for name in ("steps", "batch_size", "devices"):
            if getattr(args, name) < (2 if name == "steps" else 1):
                raise InferenceError(f"--{name.replace('_', '-')}: {getattr(args, name)} is too small")
        metadata = read_metadata(args.metadata)
        keys, where = share_of_keys(list(metadata), args.split_count, args.split_index)
        inference = load_for_inference(args.checkpoint, tokenizer=args.tokenizer)
        settings = family.resolve(inference, args)
        config = SamplerConfig(num_steps=args.steps, shift=args.shift, cfg_text=settings.cfg_text,
                               cfg_img=settings.cfg_img, renorm=args.renorm)
        print(where, file=sys.stderr)
        with tqdm(total=len(keys), unit="image", disable=args.no_progress, file=sys.stderr) as bar:
            result = synthesize_metadata(inference, metadata, args.image_root, args.output_dir, sampler_config=config,
                                         batch_size=args.batch_size, devices=args.devices, seed=args.seed,
                                         order=args.context_order, output_style=args.output_style, keys=keys,
                                         progress=bar.update, settings=settings)
    except ValueError as err:  # InferenceError and SamplerConfig checks
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {len(result['written'])} image(s) to {args.output_dir} ({args.output_style} style); "
          f"{len(result['existing'])} existed (skipped); {len(result['failed'])} failed")
    for key, reason in result["failed"]:
        print(f"failed: {key}: {reason}", file=sys.stderr)
    return 1 if result["failed"] else 0
