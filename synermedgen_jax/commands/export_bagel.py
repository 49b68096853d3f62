"""Export a checkpoint as a BAGEL/SynerMedGen folder: a training workdir / step directory (``train``), or a
parameter checkpoint (from ``import`` or ``save_params_checkpoint``).

  python -m synermedgen_jax export --checkpoint runs/stage2 --out /models/my-bagel
  python -m synermedgen_jax export --checkpoint ckpt/bagel7b --out /models/my-bagel [--dtype auto|bf16|f32]

Writes model.safetensors and ema.safetensors (what the official inference reads; its training restart reads
model.safetensors unless --finetune_from_ema), ae.safetensors (FLUX names), llm_config.json, vit_config.json
(num_hidden_layers = used layers + 1, as the release) and the tokenizer files, with BAGEL's key names, shapes and
layouts, so the official PyTorch code loads the folder unchanged. From a training checkpoint model.safetensors
holds the trained parameters and ema.safetensors their EMA (the same tensors when the run kept no EMA); from a
parameter checkpoint both hold the same tensors (it has one set of weights). Streams: tensors are written one at
a time, parameter checkpoints read a chunk at a time (--chunk-mb), training checkpoints one weight set at a time.
--dtype auto writes model/ema.safetensors in the dtype the imported checkpoint had (port.json), else bf16 like the
release; ae.safetensors is float32 unless --ae-dtype says otherwise. An import followed by an export reproduces
the original tensors bit for bit. A VAE that is not FLUX-shaped is written all the same, with a warning: the
official load_ae hard-codes FLUX's autoencoder (our import reads it). --family unimedvl writes UniMedVL's layout
(the same files plus vae_model.* — the VAE inside the model files — and a latent BatchNorm's vae_batch_norm.*);
auto keeps the family an import recorded. Bad input: a message naming the problem, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flax import nnx

from synermedgen_jax.commands._args import one_line_errors, positive_float
from synermedgen_jax.kernels.dispatch import resolve_kernels
from synermedgen_jax.modeling.synermedgen import build_model
from synermedgen_jax.port import keys as K
from synermedgen_jax.port import orbax_io
from synermedgen_jax.port.bagel import PortError, export_order, flux_ae_differences, save
from synermedgen_jax.port.safetensors_stream import SafetensorsError
from synermedgen_jax.stages import Stage
from synermedgen_jax.training.checkpoint import CheckpointError, model_targets, read_config, read_weights, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="our checkpoint folder (config.json, params/)")
    parser.add_argument("--out", required=True, type=Path, help="new BAGEL folder (must not exist or be empty)")
    parser.add_argument("--dtype", choices=("auto", "bf16", "f32"), default="auto",
                        help="model.safetensors / ema.safetensors dtype")
    parser.add_argument("--ae-dtype", choices=("auto", "bf16", "f32"), default="auto", help="ae.safetensors dtype")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="folder with tokenizer files to copy (default: CHECKPOINT/tokenizer if present)")
    parser.add_argument("--chunk-mb", type=positive_float, default=256.0,
                        help="parameter checkpoints: MB of params read from Orbax at a time")
    parser.add_argument("--family", choices=("auto", "bagel", "unimedvl"), default="auto",
                        help="folder layout: bagel, or unimedvl (the BAGEL files plus the VAE inside the model "
                             "files as vae_model.* and any latent BatchNorm as vae_batch_norm.*); auto: the "
                             "family an import recorded (port.json), unimedvl for a model with a latent BatchNorm, "
                             "else bagel")
    parser.add_argument("--ema", action="store_true",
                        help="no effect, kept for old command lines: a training checkpoint's EMA always goes to "
                             "ema.safetensors and its trained parameters to model.safetensors")
    one_line_errors(parser)


def _family(args: argparse.Namespace, config, info: dict | None = None) -> str:
    if args.family != "auto":
        return args.family
    recorded = (info or {}).get("family")
    if recorded in ("bagel", "unimedvl"):
        return recorded
    return "unimedvl" if config.vae.get("latent_batch_norm", False) else "bagel"


def _warn_if_not_flux(config) -> None:
    differences = flux_ae_differences(config)
    if differences:
        print(f"warning: ae.safetensors is not FLUX-shaped ({', '.join(differences)}): the official load_ae "
              "(modeling/autoencoder.py) hard-codes FLUX's autoencoder, so the official code cannot load it; "
              "our import reads it", file=sys.stderr)


def _is_training_checkpoint(path: Path) -> bool:
    """Training workdirs hold numbered step folders with a ``state`` item (training/checkpoint.py)."""
    def is_step(p: Path) -> bool:  # _CHECKPOINT_METADATA: a step whose state item is damaged or missing
        return p.name.isdigit() and ((p / "state").is_dir() or (p / "_CHECKPOINT_METADATA").is_file())

    return is_step(path) or (path.is_dir() and any(is_step(p) for p in path.iterdir()))


def _export_training(args: argparse.Namespace) -> int:
    """A training checkpoint: model.safetensors from the trained parameters, ema.safetensors from their EMA
    (a copy of model.safetensors when the run kept none); each weight set is read when the writer reaches it and
    dropped tensor by tensor as written, so about one set is held at a time."""
    start = time.time()
    try:
        workdir, step = resolve(args.checkpoint)  # a damaged newer step is named once, here
        step_dir = workdir / str(step)
        run_config = read_config(step_dir)
        if run_config.stage == Stage.VAE:
            raise CheckpointError(f"{args.checkpoint}: a stage-0 (VAE only) checkpoint; its language and vision "
                                  "parts are untrained, so it is not a BAGEL model (export a Stage I/II run)")
        config = run_config.model
        # The run's kernel request ("auto") resolved for this machine, as load_model does, to build the model.
        built = resolve_kernels(config, mesh_shape=None)
        targets = model_targets(nnx.eval_shape(lambda: build_model(built, seed=int(run_config.train.seed))))
        order = export_order(config)
        unknown = sorted(set(order) ^ set(targets))
        if unknown:
            raise CheckpointError(f"{args.checkpoint}: the model's weights and the BAGEL key table differ: "
                                  f"{unknown[:5]}")

        def reader(ema: bool) -> Callable[[list[str]], dict]:
            def read(names: list[str]) -> dict:
                weights = read_weights(step_dir, {n: targets[n] for n in names}, ema=ema)
                missing = sorted(set(names) - set(weights))
                if missing:
                    raise CheckpointError(f"checkpoint {step_dir} does not match its config: {len(missing)} weights "
                                          f"missing, e.g. {missing[:5]}")
                return weights
            return read

        kept_ema = float(run_config.train.get("ema", 0.0)) > 0
        params = _Streamed(reader(False), [order])
        ema_names = [n for n in order if not n.startswith("vae.")]  # the VAE comes from params
        ema = _Streamed(reader(True), [ema_names]).values() if kept_ema else None
        dtype = "bf16" if args.dtype == "auto" else args.dtype
        ae_dtype = "f32" if args.ae_dtype == "auto" else args.ae_dtype
        family = _family(args, config)
        save(config, params.values(), args.out, dtype=dtype, ema=ema, ae_dtype=ae_dtype,
             tokenizer_dir=args.tokenizer if args.tokenizer and args.tokenizer.is_dir() else None, family=family)
    except (CheckpointError, PortError, SafetensorsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _warn_if_not_flux(config)
    which = "their EMA" if kept_ema else "the same tensors (the run kept no EMA)"
    print(f"exported step {step} of {workdir} to {args.out} ({family} layout): model.safetensors the trained "
          f"parameters, ema.safetensors {which} ({dtype}), ae {ae_dtype}, in {time.time() - start:.1f}s")
    return 0


class _Streamed:
    """Serves tensors in the order the writer asks for them: on a miss, ``read(group)`` fetches the group of
    upcoming names holding it; each tensor is dropped once served, so about one group is held at a time."""

    def __init__(self, read: Callable[[list[str]], dict], groups: list[list[str]]):
        self.read = read
        self.group_of = {name: group for group in groups for name in group}
        self.cache: dict[str, object] = {}

    def values(self) -> dict[str, Callable[[], object]]:
        return {name: (lambda name=name: self.get(name)) for name in self.group_of}

    def get(self, name: str):
        if name not in self.cache:
            self.cache = self.read(self.group_of[name])  # the previous group is written already
        return self.cache.pop(name)


def main(args: argparse.Namespace) -> int:
    if _is_training_checkpoint(args.checkpoint):
        return _export_training(args)

    start = time.time()
    try:
        config = orbax_io.read_config(args.checkpoint)
        info_path = args.checkpoint / "port.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        source = info.get("source_dtypes", {})
        dtype = source.get("ema", "BF16") if args.dtype == "auto" else args.dtype
        ae_dtype = source.get("ae", "F32") if args.ae_dtype == "auto" else args.ae_dtype
        rules = K.build_table(config)
        stored = orbax_io.checkpoint_shapes(args.checkpoint)
        problems = [f"{r.ours}: missing" for r in rules if r.ours not in stored]
        problems += [f"{r.ours}: checkpoint {list(stored[r.ours][0])}, config {list(r.our_shape)}"
                     for r in rules if r.ours in stored and stored[r.ours][0] != r.our_shape]
        problems += [f"{name}: unexpected" for name in sorted(set(stored) - {r.ours for r in rules})]
        if problems:
            raise PortError(f"{args.checkpoint}: params do not match config.json:\n  " + "\n  ".join(problems))
        order = export_order(config)
        groups = orbax_io.chunk_names(order, stored, int(args.chunk_mb * 2**20))
        params = _Streamed(lambda names: orbax_io.read_leaves(args.checkpoint, names), groups)
        tokenizer = args.tokenizer or (args.checkpoint / "tokenizer")
        # One set of weights: ema.safetensors is model.safetensors' bytes.
        family = _family(args, config, info)
        save(config, params.values(), args.out, dtype=dtype, ema=None, ae_dtype=ae_dtype,
             llm_json=info.get("llm_config"), vit_json=info.get("vit_config"),
             tokenizer_dir=tokenizer if tokenizer.is_dir() else None, family=family)
    except (PortError, SafetensorsError, OSError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _warn_if_not_flux(config)
    print(f"exported {len(rules)} tensors from {args.checkpoint} to {args.out} ({family} layout; model.safetensors and "
          f"ema.safetensors the same tensors, {dtype}; ae {ae_dtype}) in {time.time() - start:.1f}s")
    return 0
