"""``remat="full"`` (modeling/llm.py remat_after_cotangent) changes memory, never gradients, and the plan's
loop-aware FLOP count (accounting/hlo.py hlo_matmul_flops) counts loop bodies times their trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synermedgen_jax.accounting.hlo import hlo_matmul_flops
from synermedgen_jax.data.packing import (
    PackBudget,
    PackBuilder,
    SpecialTokens,
    Text,
    VaeImage,
    VitImage,
    stack_rows,
)

pytestmark = pytest.mark.usefixtures("fast_compile")

# Two Stage II samples (text, ViT source, clean VAE source, noised target, answer) in one tiny pack row.
BUDGET = PackBudget(und_tokens=64, gen_tokens=64, vit_patches=8, vit_images=2, vae_images=4, ce_tokens=8,
                    image_size=(16, 16), vit_image_size=(14, 14))


def _batch(model_config, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    builder = PackBuilder(BUDGET, SpecialTokens(1, 2, 3, 4, 0), model_config)
    for _ in range(2):
        source, target = (rng.uniform(-1, 1, (16, 16)).astype(np.float32) for _ in range(2))
        builder.add([Text(rng.integers(5, 60, size=3).tolist()), VitImage(source[:14, :14]), VaeImage(source),
                     VaeImage(target, noised=True), Text(rng.integers(5, 60, size=2).tolist(), loss=True)], rng)
    return {k: jnp.asarray(v) for k, v in stack_rows([builder.build()]).items()}


def test_full_remat_gives_the_same_loss_and_gradients():
    """Through the trainer's split into trained / frozen parameters (frozen leaves are not differentiated:
    the custom VJP must give them no cotangent and the trained ones exactly the plain gradient)."""
    from synermedgen_jax.config import load_config
    from synermedgen_jax.modeling.synermedgen import build_model
    from synermedgen_jax.training import optim
    from synermedgen_jax.training import step as step_lib
    from synermedgen_jax.training.loop import resolve_config
    from synermedgen_jax.training.objective import UnifiedObjective

    seed = int(np.random.SeedSequence().entropy % 2**31)
    results = {}
    for policy in ("none", "full"):
        config = resolve_config(load_config("configs/stage2_ucg.py:tiny"))
        config.model.remat = policy
        config.model.vae.sample_posterior = False
        model = build_model(config.model, 0)
        codec = step_lib.Codec(model, optim.trainable_predicate(config))
        params, frozen = codec.split_values(model)
        key = jax.random.key(seed)
        # Random trained weights (llm2vae starts at zero, which would hide the generation path's gradients).
        params = {n: v + 0.05 * jax.random.normal(jax.random.fold_in(key, i), v.shape)
                  for i, (n, v) in enumerate(sorted(params.items()))}
        batch = _batch(config.model, seed)
        objective = UnifiedObjective()
        full = objective.prepare(model, batch, key)
        totals = objective.totals(full)
        loss = lambda p: objective.loss(codec.model(p, frozen), full, totals)[0]  # noqa: B023
        results[policy] = jax.jit(jax.value_and_grad(loss))(params)
    (loss_none, grads_none), (loss_full, grads_full) = results["none"], results["full"]
    assert float(loss_none) > 0
    np.testing.assert_allclose(float(loss_full), float(loss_none), rtol=1e-6)
    assert grads_full.keys() == grads_none.keys()
    assert max(float(jnp.max(jnp.abs(g))) for g in grads_none.values()) > 1e-3  # gradients are not all zero
    for name, value in grads_none.items():
        np.testing.assert_allclose(np.asarray(grads_full[name]), np.asarray(value), atol=1e-5, rtol=1e-5,
                                   err_msg=name)


def test_hlo_flops_count_loop_bodies_times_their_trips():
    trips, n = 7, 32
    rng = np.random.default_rng(0)
    weights = jnp.asarray(rng.standard_normal((trips, n, n)), jnp.float32)
    images = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.float32)

    def f(x, weights, images, kernel):
        y, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, weights)
        conv = jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y) + jnp.sum(conv)

    x = jnp.ones((4, n), jnp.float32)
    compiled = jax.jit(f).lower(x, weights, images, kernel).compile()
    counted = hlo_matmul_flops(compiled.as_text())
    body = 2.0 * 4 * n * n
    conv = 2.0 * (2 * 8 * 8 * 5) * (3 * 3 * 3)
    assert counted["with_trips"] == pytest.approx(trips * body + conv)
    assert counted["once"] == pytest.approx(body + conv)
    assert any(loop["trips"] == trips and loop["body_flops"] == pytest.approx(body) for loop in counted["loops"])
