"""The model trains with the fused Pallas kernels (interpret mode on CPU) exactly as with the jnp references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from synermedgen_jax.modeling.packing import (
    PackBudget,
    PackBuilder,
    SpecialTokens,
    Text,
    VaeImage,
    VitImage,
    stack_rows,
)
from synermedgen_jax.modeling.synermedgen import SynerMedGen, compute_losses

BUDGET = PackBudget(und_tokens=64, gen_tokens=64, vit_patches=8, vit_images=2, vae_images=4, ce_tokens=8,
                    image_size=(16, 16), vit_image_size=(14, 14))


def _batch(config, seed):
    rng = np.random.default_rng(seed)
    builder = PackBuilder(BUDGET, SpecialTokens(1, 2, 3, 4, 0), config)
    for _ in range(2):
        src, tgt = (rng.uniform(-1, 1, (16, 16)).astype(np.float32) for _ in range(2))
        builder.add([Text(rng.integers(5, 60, size=3).tolist()), VitImage(src[:14, :14]), VaeImage(src),
                     VaeImage(tgt, noised=True), Text(rng.integers(5, 60, size=2).tolist(), loss=True)], rng)
    return {k: jnp.asarray(v) for k, v in stack_rows([builder.build()]).items()}


def _loss_and_grads(config, batch, noise):
    model = SynerMedGen(config, rngs=nnx.Rngs(params=1))
    model.llm2vae.kernel.value = 0.05 * jnp.ones_like(model.llm2vae.kernel.value)

    def loss_fn(model):
        outputs = model(batch, model.latent_tokens(batch["vae_images"], None), noise)
        losses = compute_losses(outputs, batch, flow_impl=config.flow_matching_impl)
        return losses["loss"], losses

    (_, losses), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    return losses, grads


def test_pallas_interpret_training_matches_reference(tiny_config):
    reference = tiny_config.copy_and_resolve_references()
    reference.vae.sample_posterior = False
    fused = reference.copy_and_resolve_references()
    fused.attention_impl = "pallas_interpret"
    fused.flow_matching_impl = "pallas_interpret"
    seed = int(np.random.SeedSequence().entropy % 2**31)
    batch = _batch(reference, seed)
    noise = jax.random.normal(jax.random.key(seed), (1, BUDGET.gen_tokens, 16))
    ref_losses, ref_grads = _loss_and_grads(reference, batch, noise)
    fused_losses, fused_grads = _loss_and_grads(fused, batch, noise)
    for key in ("loss", "ce", "mse"):
        np.testing.assert_allclose(float(fused_losses[key]), float(ref_losses[key]), rtol=1e-5, atol=1e-5)
    flat_ref = dict(nnx.to_flat_state(nnx.state(ref_grads, nnx.Param)))
    flat_fused = dict(nnx.to_flat_state(nnx.state(fused_grads, nnx.Param)))
    assert flat_ref.keys() == flat_fused.keys()
    for path, value in flat_ref.items():
        np.testing.assert_allclose(np.asarray(flat_fused[path].value), np.asarray(value.value), atol=1e-4,
                                   err_msg=str(path))
