"""Check that the model trains the same with the fused kernels as with the jnp references, on this machine.

Run it first on a new GPU/TPU machine: it builds one packed Stage II batch (text + ViT source + clean VAE source +
noised VAE target + answer text, several samples per row), then computes the loss and every parameter gradient
twice from the same weights and noise: with ``attention_impl = flow_matching_impl = "reference"`` (jnp, matmuls
at ``highest`` precision) and with the fused kernels (``pallas`` on GPU/TPU, ``pallas_interpret`` on CPU). It
prints the loss terms of both and the largest gradient differences, relative to each gradient's scale, and exits
with status 1 when a difference is over ``--rtol``.

Usage::

    python -m tools.check_model_kernels                      # small model, float32
    python -m tools.check_model_kernels --variant tiny --impl pallas_interpret
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from synermedgen_jax.config import load_config
from synermedgen_jax.data.packing import (
    Pack,
    PackBudget,
    PackBuilder,
    SpecialTokens,
    Text,
    VaeImage,
    VitImage,
    stack_rows,
)
from synermedgen_jax.modeling.synermedgen import SynerMedGen
from synermedgen_jax.training.objective import Prepared, UnifiedObjective


def packed_batch(config, image_side: int, samples: int, seed: int) -> tuple[dict, PackBudget]:
    """One Stage II pack row of ``samples`` random samples, as the model sees it (``[1, ...]`` arrays)."""
    patch = config.vit.patch_size
    vit_side = (image_side // patch) * patch
    rng = np.random.default_rng(seed)
    vocab = config.llm.vocab_size
    rows = []
    for _ in range(samples):
        source, target = (rng.uniform(-1, 1, (image_side, image_side)).astype(np.float32) for _ in range(2))
        rows.append([Text(rng.integers(5, vocab, size=8).tolist()), VitImage(source[:vit_side, :vit_side]),
                     VaeImage(source), VaeImage(target, noised=True),
                     Text(rng.integers(5, vocab, size=3).tolist(), loss=True)])
    # Size the budget from what the samples need (the builder's own count), plus a little padding.
    big = PackBudget(1 << 20, 1 << 20, 1 << 20, samples, 2 * samples, 1 << 20, (image_side,) * 2, (vit_side,) * 2)
    needs = [PackBuilder(big, SpecialTokens(1, 2, 3, 4, 0), config).need(sample) for sample in rows]
    budget = PackBudget(und_tokens=sum(n.und for n in needs) + 5, gen_tokens=sum(n.gen for n in needs) + 3,
                        vit_patches=sum(n.vit_patches for n in needs), vit_images=samples,
                        vae_images=2 * samples, ce_tokens=sum(n.ce for n in needs),
                        image_size=(image_side, image_side), vit_image_size=(vit_side, vit_side))
    builder = PackBuilder(budget, SpecialTokens(1, 2, 3, 4, 0), config)
    for sample in rows:
        builder.add(sample, rng)
    return {k: jnp.asarray(v) for k, v in stack_rows([builder.build()]).items()}, budget


def loss_and_grads(config, batch: dict, noise: jax.Array):
    """Loss terms and parameter gradients (a flat ``{path: array}``) of a fresh model (param seed 1)."""
    model = SynerMedGen(config, rngs=nnx.Rngs(params=1))
    # llm2vae starts at zero in BAGEL; a non-zero value makes the velocity (and its gradients) non-trivial.
    model.llm2vae.kernel[...] = 0.05 * jnp.ones_like(model.llm2vae.kernel[...])

    def loss_fn(model):
        inputs = Prepared(Pack.from_arrays(batch), model.latent_tokens(batch["vae_images"], None), noise)
        losses = UnifiedObjective().batch_metrics(model, inputs, flow_impl=config.flow_matching_impl)
        return losses["loss"], losses

    (_, losses), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    flat = {"/".join(map(str, path)): np.asarray(value[...], np.float32)
            for path, value in nnx.to_flat_state(nnx.state(grads, nnx.Param))}
    return {k: float(v) for k, v in losses.items() if np.ndim(v) == 0}, flat


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--variant", default="small", choices=("tiny", "small"), help="model variant")
    parser.add_argument("--impl", default="auto", choices=("auto", "pallas", "pallas_interpret"),
                        help="fused implementation (auto: pallas on GPU/TPU, pallas_interpret on CPU)")
    parser.add_argument("--image-side", type=int, default=64, help="slice side in pixels")
    parser.add_argument("--samples", type=int, default=3, help="samples per pack row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=2e-3,
                        help="largest allowed |Δgrad| / max|grad| per parameter (and |Δloss| / |loss|)")
    parser.add_argument("--precision", default="default", choices=("default", "highest"),
                        help="matmul precision of the fused run (the reference always runs at highest); on GPU the "
                             "default lets XLA and the Triton kernels use TF32 for float32, highest isolates the "
                             "kernels' own error")
    args = parser.parse_args(argv)

    platform = jax.default_backend()
    impl = args.impl if args.impl != "auto" else ("pallas" if platform in ("gpu", "cuda", "tpu") else
                                                  "pallas_interpret")
    reference = load_config(f"configs/models.py:{args.variant}")
    reference.attention_impl = reference.flow_matching_impl = "reference"  # the configs' "auto" is the kernels
    reference.vae.sample_posterior = False  # both runs must see the same latents
    fused = reference.copy_and_resolve_references()
    fused.attention_impl = fused.flow_matching_impl = impl
    batch, budget = packed_batch(reference, args.image_side, args.samples, args.seed)
    noise = jax.random.normal(jax.random.key(args.seed), (1, budget.gen_tokens, reference.vae.z_channels *
                                                          reference.latent_patch_size ** 2))
    with jax.default_matmul_precision("highest"):
        ref_losses, ref_grads = loss_and_grads(reference, batch, noise)
    with jax.default_matmul_precision(None if args.precision == "default" else args.precision):
        fused_losses, fused_grads = loss_and_grads(fused, batch, noise)

    print(f"# platform={platform} devices={jax.devices()} variant={args.variant} impl={impl} "
          f"T={budget.total_tokens} (und {budget.und_tokens} + gen {budget.gen_tokens}) precision={args.precision}")
    failed = []
    for key, value in ref_losses.items():
        rel = abs(fused_losses[key] - value) / max(abs(value), 1e-6)
        print(f"loss {key:>6}: reference={value:.6f} fused={fused_losses[key]:.6f} rel_diff={rel:.2e}")
        if rel > args.rtol:
            failed.append(f"loss {key}")
    # A gradient that is zero in exact arithmetic (e.g. a key bias: softmax ignores a constant shift) holds only
    # rounding noise, so each parameter's scale is floored at 1e-3 of the largest gradient in the model.
    floor = 1e-3 * max(float(np.max(np.abs(g))) for g in ref_grads.values())
    worst = sorted(((float(np.max(np.abs(fused_grads[p] - g))) / max(float(np.max(np.abs(g))), floor), p)
                    for p, g in ref_grads.items()), reverse=True)
    print(f"gradients: {len(worst)} parameters; largest |Δgrad| / max(max|grad|, 1e-3 * model max):")
    for rel, path in worst[:8]:
        print(f"  {rel:.2e}  {path}")
    failed += [p for rel, p in worst if rel > args.rtol]
    if any(not np.all(np.isfinite(g)) for g in fused_grads.values()):
        failed.append("non-finite fused gradients")
    print("FAILED: " + ", ".join(failed[:10]) if failed else f"OK (all within rtol {args.rtol:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
