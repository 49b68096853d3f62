"""Compiled vs analytic FLOPs of one forward+backward of the MoT model (proof that routing does no double work).

    python -m tools.model_flops                    # tiny and small
    python -m tools.model_flops --variants small --json flops.json

For each model variant it lowers and compiles (abstract shapes, nothing allocated) the loss and its gradient
with respect to every trainable parameter but the frozen VAE, over a representative Stage II + Stage I pack,
and prints XLA's cost-analysis FLOPs next to the analytic count of synermedgen_jax/accounting/flops.py
(6·N_active·tokens + attention + heads). If the MoT ran both experts on every token the ratio would be ≈2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
from flax import nnx

from synermedgen_jax.accounting.flops import step_flops
from synermedgen_jax.accounting.hlo import compiled_flops
from synermedgen_jax.config import load_config
from synermedgen_jax.data.packing import Pack, PackBudget
from synermedgen_jax.modeling.synermedgen import SynerMedGen
from synermedgen_jax.training.objective import Prepared, UnifiedObjective

# Representative packs: a few Stage II samples (text + ViT + clean VAE + noised VAE) plus Stage I answers.
BUDGETS = {
    "tiny": PackBudget(und_tokens=96, gen_tokens=64, vit_patches=16, vit_images=4, vae_images=4, ce_tokens=24,
                       image_size=(16, 16), vit_image_size=(28, 28)),
    "small": PackBudget(und_tokens=768, gen_tokens=512, vit_patches=256, vit_images=4, vae_images=4,
                        ce_tokens=128, image_size=(128, 128), vit_image_size=(112, 112)),
}


def abstract_batch(budget: PackBudget, model_config, rows: int) -> dict:
    geometry_vit = model_config.vit.patch_size**2 * model_config.vit.num_channels
    height, width = budget.image_size
    shapes = {
        "token_ids": (budget.und_tokens,), "sample_id": (budget.total_tokens,), "split_id": (budget.total_tokens,),
        "split_kind": (budget.total_tokens,), "rope_id": (budget.total_tokens,),
        "vit_patches": (budget.vit_patches, geometry_vit), "vit_pos_id": (budget.vit_patches,),
        "vit_image_id": (budget.vit_patches,), "vit_dest": (budget.vit_patches,), "ce_index": (budget.ce_tokens,),
        "ce_label": (budget.ce_tokens,), "ce_mask": (budget.ce_tokens,),
        "vae_images": (budget.vae_images, height, width, model_config.vae.in_channels),
        "latent_index": (budget.gen_tokens,), "latent_pos_id": (budget.gen_tokens,),
        "timestep_logit": (budget.gen_tokens,), "mse_mask": (budget.gen_tokens,),
    }
    floats = {"vit_patches", "ce_mask", "vae_images", "timestep_logit", "mse_mask"}
    return {k: jax.ShapeDtypeStruct((rows, *s), jnp.float32 if k in floats else jnp.int32) for k, s in shapes.items()}


def measure(variant: str, rows: int = 1) -> dict:
    config = load_config(f"configs/models.py:{variant}")
    budget = BUDGETS[variant]
    model = nnx.eval_shape(lambda: SynerMedGen(config, rngs=nnx.Rngs(params=0)))
    graphdef, trainable, frozen = nnx.split(model, lambda path, v: isinstance(v, nnx.Param) and path[0] != "vae", ...)
    token_dim = config.latent_patch_size**2 * config.vae.z_channels
    stride = 2 ** (len(config.vae.ch_mult) - 1) * config.latent_patch_size
    latent_tokens = budget.vae_images * (budget.image_size[0] // stride) * (budget.image_size[1] // stride)

    def loss(trainable, frozen, batch, latents, noise):
        model = nnx.merge(graphdef, trainable, frozen)
        inputs = Prepared(Pack.from_arrays(batch), latents, noise)
        return UnifiedObjective().batch_metrics(model, inputs, flow_impl="reference")["loss"]

    args = (trainable, frozen, abstract_batch(budget, config, rows),
            jax.ShapeDtypeStruct((rows, latent_tokens, token_dim), jnp.float32),
            jax.ShapeDtypeStruct((rows, budget.gen_tokens, token_dim), jnp.float32))
    compiled = jax.jit(jax.value_and_grad(loss)).lower(*args).compile()
    analytic = step_flops(config, budget, rows)
    measured = compiled_flops(compiled)
    return {"variant": variant, "rows": rows, "tokens_per_row": budget.total_tokens,
            "compiled_flops": measured, "analytic_flops": analytic.total, "ratio": measured / analytic.total,
            "analytic_breakdown": {k: v for k, v in analytic.__dict__.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["tiny", "small"], choices=sorted(BUDGETS))
    parser.add_argument("--rows", type=int, default=1, help="pack rows per batch")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    results = [measure(variant, args.rows) for variant in args.variants]
    print(f"{'variant':8} {'tokens':>7} {'compiled GFLOP':>15} {'analytic GFLOP':>15} {'ratio':>7}")
    for r in results:
        print(f"{r['variant']:8} {r['tokens_per_row']:>7} {r['compiled_flops'] / 1e9:>15.4f} "
              f"{r['analytic_flops'] / 1e9:>15.4f} {r['ratio']:>7.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
