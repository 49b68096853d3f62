"""Export a checkpoint as a BAGEL/SynerMedGen folder: a training workdir / step directory (``train``), or a
parameter checkpoint (from ``import`` or ``save_params_checkpoint``).

  python -m synermedgen_jax export --checkpoint runs/stage2 --out /models/my-bagel --ema
  python -m synermedgen_jax export --checkpoint ckpt/bagel7b --out /models/my-bagel [--dtype auto|bf16|f32]

Writes ema.safetensors, ae.safetensors (FLUX names), llm_config.json, vit_config.json (num_hidden_layers = used
layers + 1, as the release) and the tokenizer files, with BAGEL's key names, shapes and layouts, so the official
PyTorch code loads the folder unchanged. Streams: params are read from Orbax a chunk at a time and written one
tensor at a time. --dtype auto writes ema.safetensors in the dtype the imported checkpoint had (port.json), else
bf16 like the release; ae.safetensors is float32 unless --ae-dtype says otherwise. An import followed by an
export reproduces the original tensors bit for bit. Bad input: a message naming the problem, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from synermedgen_jax.port import keys as K
from synermedgen_jax.port.bagel import PortError, save
from synermedgen_jax.port.safetensors_stream import SafetensorsError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="our checkpoint folder (config.json, params/)")
    parser.add_argument("--out", required=True, type=Path, help="new BAGEL folder (must not exist or be empty)")
    parser.add_argument("--dtype", choices=("auto", "bf16", "f32"), default="auto", help="ema.safetensors dtype")
    parser.add_argument("--ae-dtype", choices=("auto", "bf16", "f32"), default="auto", help="ae.safetensors dtype")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="folder with tokenizer files to copy (default: CHECKPOINT/tokenizer if present)")
    parser.add_argument("--chunk-mb", type=float, default=256.0, help="MB of params read from Orbax at a time")
    parser.add_argument("--ema", action="store_true",
                        help="training checkpoints: export the EMA weights (what BAGEL releases), not the raw ones")


def _is_training_checkpoint(path: Path) -> bool:
    """Training workdirs hold numbered step folders with a ``state`` item (training/checkpoint.py)."""
    def is_step(p: Path) -> bool:  # _CHECKPOINT_METADATA: a step whose state item is damaged or missing
        return p.name.isdigit() and ((p / "state").is_dir() or (p / "_CHECKPOINT_METADATA").is_file())

    return is_step(path) or (path.is_dir() and any(is_step(p) for p in path.iterdir()))


def _export_training(args: argparse.Namespace) -> int:
    """A training checkpoint: weights restored (EMA with --ema), then written tensor by tensor."""
    from flax import nnx

    from synermedgen_jax.training.checkpoint import CheckpointError, load_model, read_config

    start = time.time()
    try:
        if read_config(str(args.checkpoint)).stage == "vae":
            raise CheckpointError(f"{args.checkpoint}: a stage-0 (VAE only) checkpoint; its language and vision "
                                  "parts are untrained, so it is not a BAGEL model (export a Stage I/II run)")
        run_config, model = load_model(str(args.checkpoint), ema=args.ema)
        dtype = "bf16" if args.dtype == "auto" else args.dtype
        ae_dtype = "f32" if args.ae_dtype == "auto" else args.ae_dtype
        save(run_config.model, nnx.state(model), args.out, dtype=dtype, ae_dtype=ae_dtype,
             tokenizer_dir=args.tokenizer if args.tokenizer and args.tokenizer.is_dir() else None)
    except (CheckpointError, PortError, SafetensorsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    which = "EMA" if args.ema else "raw"
    print(f"exported the {which} weights of {args.checkpoint} to {args.out} (ema.safetensors {dtype}, ae {ae_dtype}) "
          f"in {time.time() - start:.1f}s")
    return 0


class _ChunkedParams:
    """Serves params in the order the writer asks for them, restoring a chunk of upcoming names per miss."""

    def __init__(self, folder: Path, order: list[str], shapes: dict, chunk_bytes: int):
        from synermedgen_jax.port.orbax_io import chunk_names

        self.folder = folder
        self.group_of = {}
        for group in chunk_names(order, shapes, chunk_bytes):
            for name in group:
                self.group_of[name] = group
        self.cache: dict[str, np.ndarray] = {}

    def getter(self, name: str):
        return lambda: self.get(name)

    def get(self, name: str) -> np.ndarray:
        from synermedgen_jax.port.orbax_io import read_leaves

        if name not in self.cache:
            self.cache = read_leaves(self.folder, self.group_of[name])  # the previous chunk is written already
        return self.cache.pop(name)


def main(args: argparse.Namespace) -> int:
    from synermedgen_jax.port.orbax_io import checkpoint_shapes, read_config

    if _is_training_checkpoint(args.checkpoint):
        return _export_training(args)

    start = time.time()
    try:
        config = read_config(args.checkpoint)
        info_path = args.checkpoint / "port.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        source = info.get("source_dtypes", {})
        dtype = source.get("ema", "BF16") if args.dtype == "auto" else args.dtype
        ae_dtype = source.get("ae", "F32") if args.ae_dtype == "auto" else args.ae_dtype
        rules = K.build_table(config)
        stored = checkpoint_shapes(args.checkpoint)
        problems = [f"{r.ours}: missing" for r in rules if r.ours not in stored]
        problems += [f"{r.ours}: checkpoint {list(stored[r.ours][0])}, config {list(r.our_shape)}"
                     for r in rules if r.ours in stored and stored[r.ours][0] != r.our_shape]
        problems += [f"{name}: unexpected" for name in sorted(set(stored) - {r.ours for r in rules})]
        if problems:
            raise PortError(f"{args.checkpoint}: params do not match config.json:\n  " + "\n  ".join(problems))
        order = [r.ours for r in rules if r.file == "ema"] + [r.ours for r in rules if r.file == "ae"]
        chunked = _ChunkedParams(args.checkpoint, order, stored, int(args.chunk_mb * 2**20))
        tokenizer = args.tokenizer or (args.checkpoint / "tokenizer")
        save(config, {name: chunked.getter(name) for name in order}, args.out, dtype=dtype, ae_dtype=ae_dtype,
             llm_json=info.get("llm_config"), vit_json=info.get("vit_config"),
             tokenizer_dir=tokenizer if tokenizer.is_dir() else None)
    except (PortError, SafetensorsError, OSError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {len(rules)} tensors from {args.checkpoint} to {args.out} (ema {dtype}, ae {ae_dtype}) "
          f"in {time.time() - start:.1f}s")
    return 0
