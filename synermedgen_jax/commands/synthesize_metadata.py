"""``synthesize --metadata``: the official SynerMedGen inference convention (inference/metadata.py).

  python -m synermedgen_jax synthesize --checkpoint runs/s2 --metadata metadata.json --image-root SynerMed/slice \
      --output-dir preds/ [--batch-size 8 --devices 8]

metadata.json: {key: {"id": source path relative to --image-root, "prompt": instruction}}; writes
<output-dir>/<key>.png and skips keys whose PNG exists. Defaults as the official script: 50 timesteps, shift 3.0,
text guidance 4.0, image guidance 1.5. Exit status: 0 when every key has an output, 1 when some source could
not be read (listed), 2 for unusable input (one line).
"""

from __future__ import annotations

import argparse
import sys


def add_metadata_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("official metadata convention (instead of --input ... --output)")
    group.add_argument("--metadata", help="{key: {id, prompt}} JSON file")
    group.add_argument("--image-root", help="folder the entries' 'id' paths are relative to")
    group.add_argument("--output-dir", help="folder for <key>.png outputs")
    group.add_argument("--context-order", choices=("auto", "image-first", "text-first"), default="auto",
                       help="auto: image-first (the official order) for checkpoints trained on a SynerMed "
                            "release build, else text-first")


def main(args: argparse.Namespace) -> int:
    from synermedgen_jax.inference.loading import InferenceError, load_for_inference
    from synermedgen_jax.inference.metadata import read_metadata, synthesize_metadata
    from synermedgen_jax.inference.sampler import SamplerConfig

    try:
        if not args.image_root or not args.output_dir:
            raise InferenceError("--metadata needs --image-root DIR and --output-dir DIR")
        for name in ("steps", "batch_size", "devices"):
            if getattr(args, name) < (2 if name == "steps" else 1):
                raise InferenceError(f"--{name.replace('_', '-')}: {getattr(args, name)} is too small")
        metadata = read_metadata(args.metadata)
        config = SamplerConfig(num_steps=args.steps, shift=args.shift, cfg_text=args.cfg_text, cfg_img=args.cfg_img,
                               renorm=args.renorm)
        inference = load_for_inference(args.checkpoint, tokenizer=args.tokenizer)
        from tqdm import tqdm

        with tqdm(total=len(metadata), unit="image", disable=args.no_progress, file=sys.stderr) as bar:
            result = synthesize_metadata(inference, metadata, args.image_root, args.output_dir, sampler_config=config,
                                         batch_size=args.batch_size, devices=args.devices, seed=args.seed,
                                         order=args.context_order, progress=bar.update)
    except ValueError as err:  # InferenceError and SamplerConfig checks
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {len(result['written'])} image(s) to {args.output_dir}; {len(result['existing'])} existed "
          f"(skipped); {len(result['failed'])} failed")
    for key, reason in result["failed"]:
        print(f"failed: {key}: {reason}", file=sys.stderr)
    return 1 if result["failed"] else 0
