"""Import a BAGEL / SynerMedGen PyTorch folder into our parameter checkpoint (Orbax), streaming.

  python -m synermedgen_jax import --bagel /models/BAGEL-7B-MoT --out ckpt/bagel7b [--dtype f32|bf16]
  python -m synermedgen_jax import --bagel DIR --out DIR --allow-missing 'vit_model.*'   # deliberate partial load

  python -m synermedgen_jax import --bagel /models/UniMedVL --out ckpt/unimedvl   # prints "family: unimedvl"

Reads ema.safetensors (or model.safetensors / shards), ae.safetensors (FLUX names), llm_config.json,
vit_config.json and tokenizer files; infers the model config (position-table sizes, VAE widths) from the
tensors; converts one tensor at a time, so peak memory stays near --chunk-mb plus the largest tensor.
Missing, unexpected and mis-shaped keys are all reported by name (exit status 2). A checkpoint without any
_moe_gen key gets its generation expert copied from the understanding expert, as BAGEL's init_moe does.
UniMedVL folders (a BAGEL fork): the VAE inside the model file (vae_model.*) is read in place of ae.safetensors,
the latent BatchNorm's running statistics (vae_batch_norm.*) become the model's latent normalisation; the family
read is printed and recorded in port.json ("family"), where the inference commands pick its defaults.

Writes OUT/config.json (model config), OUT/params/ (Orbax; see synermedgen_jax/port/orbax_io.py), OUT/port.json
(source dtypes, the original JSON configs used by export, and the tokenizer the weights expect: vocabulary size,
special-token ids with BAGEL's added tokens, a fingerprint of the vocabulary) and OUT/tokenizer/ (the folder's
tokenizer files). synthesize / ask / eval read OUT directly; train --config.init_from=OUT and build-data
--tokenizer BAGEL_DIR refuse a tokenizer whose ids differ from the recorded one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from synermedgen_jax.commands._args import one_line_errors, positive_float, positive_int
from synermedgen_jax.data.tokenizer import load_tokenizer, tokenizer_mismatch
from synermedgen_jax.port.bagel import PortError, iter_params, plan_import
from synermedgen_jax.port.orbax_io import write_params_checkpoint
from synermedgen_jax.port.safetensors_stream import SafetensorsError

DTYPES = {"f32": "float32", "bf16": "bfloat16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bagel", required=True, type=Path, help="the BAGEL/SynerMedGen folder to read")
    parser.add_argument("--out", required=True, type=Path, help="new checkpoint folder (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32",
                        help="dtype of the language/vision/generation params (the VAE stays float32); default f32")
    parser.add_argument("--compute-dtype", choices=sorted(DTYPES), default="bf16",
                        help="compute dtype written into config.json (default bf16, BAGEL's)")
    parser.add_argument("--allow-missing", action="append", default=[], metavar="PATTERN",
                        help="fnmatch pattern (BAGEL key or our path) of keys that may be absent; repeatable")
    parser.add_argument("--max-latent-size", type=positive_int, default=None,
                        help="latent grid side for latent_pos_embed (default: from the stored table); a different "
                             "value rebuilds the sin-cos table")
    parser.add_argument("--chunk-mb", type=positive_float, default=256.0, help="MB of converted params per Orbax write")
    parser.add_argument("--family", choices=("auto", "bagel", "unimedvl"), default="auto",
                        help="model family of the folder: auto (default) reads UniMedVL when it holds UniMedVL's "
                             "extra keys (vae_model.*, vae_batch_norm.*), else BAGEL/SynerMedGen; recorded in "
                             "port.json, it picks the family's inference defaults in synthesize, ask and eval")
    one_line_errors(parser)


def main(args: argparse.Namespace) -> int:
    start = time.time()
    try:
        plan = plan_import(args.bagel, allow_missing=args.allow_missing, max_latent_size=args.max_latent_size,
                           param_dtype=DTYPES[args.dtype], compute_dtype=DTYPES[args.compute_dtype],
                           family=args.family)
    except (PortError, SafetensorsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = _weights_tokenizer(args.bagel, int(plan.config.llm.vocab_size))
    if isinstance(tokenizer, str):
        print(f"error: {tokenizer}", file=sys.stderr)
        plan.close()
        return 2
    how = "given by --family" if args.family != "auto" else (
        "UniMedVL keys found" if plan.family == "unimedvl" else "no UniMedVL keys (vae_model.*, vae_batch_norm.*)")
    print(f"family: {plan.family} ({how})")
    for note in plan.notes:
        print(f"note: {note}")
    if tokenizer is None:
        print(f"note: {args.bagel} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): pass "
              "--tokenizer to build-data, synthesize and ask")
    else:
        ids = tokenizer["special_ids"]
        print(f"note: tokenizer: {tokenizer['vocab_size']} tokens for {plan.config.llm.vocab_size} embedding rows; "
              f"<|im_start|> {ids['bos']}, <|im_end|> {ids['eos']}, <|vision_start|> {ids['vision_start']}, "
              f"<|vision_end|> {ids['vision_end']}")
    info = {"source": str(args.bagel.resolve()), "source_dtypes": plan.source_dtypes, "notes": plan.notes,
            "llm_config": plan.llm_json, "vit_config": plan.vit_json, "tokenizer": tokenizer,
            "vocab_rows": int(plan.config.llm.vocab_size), "family": plan.family}
    try:
        total = write_params_checkpoint(args.out, plan.config, iter_params(plan),
                                        chunk_bytes=int(args.chunk_mb * 2**20), port_info=info,
                                        tokenizer_src=args.bagel)
    except (PortError, SafetensorsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        plan.close()
    print(f"imported {len(plan.rules)} tensors ({total / 2**20:.1f} MB) from {args.bagel} into {args.out} "
          f"in {time.time() - start:.1f}s")
    return 0


def _weights_tokenizer(folder: Path, vocab_rows: int) -> dict | str | None:
    """The ``describe()`` of the folder's tokenizer (BAGEL's tokens added as BAGEL adds them), None when the folder
    has none, or a one-line problem (an unreadable tokenizer, more tokens than embedding rows)."""
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        return None
    try:
        described = load_tokenizer(folder).describe()
    except (ValueError, OSError) as err:
        return str(err).splitlines()[0]
    described["source"] = str(folder.resolve())
    problem = tokenizer_mismatch(described, None, vocab_rows)
    return f"{folder}: {problem}" if problem else described
