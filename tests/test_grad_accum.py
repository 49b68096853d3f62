"""Gradient accumulation is exact: one train step over a Stage II batch split into k micro-batches
(``train.grad_accum = k``) gives the same loss, gradient, Adam moments, parameters and EMA as the same step
over the whole batch (float32; the objective divides each micro-batch's sums by the *global* token counts,
so the micro-batch gradients add up to the full-batch gradient — training/step.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("fast_compile")

ROWS = 4
ACCUM = 4  # one row per micro-batch: the most unequal token counts per micro-batch


def _one_step(accum: int) -> tuple[dict, dict, dict]:
    """``(state before, state after one step, metrics)`` of the tiny Stage II model at ``grad_accum=accum``."""
    from mesh_kernels import make_mesh, stage2_config

    from synermedgen_jax import sharding
    from synermedgen_jax.benchmark.train_bench import synthetic_batch
    from synermedgen_jax.data.packing import PackBudget
    from synermedgen_jax.training import loop, optim
    from synermedgen_jax.training import step as step_lib

    config = stage2_config("reference")
    config.train.rows, config.train.grad_accum = ROWS, accum
    config.train.ema = 0.5  # a decay that moves the EMA visibly in one step
    config.train.warmup = 0  # the first step's learning rate is lr, not 0 (else params would not move)
    # Adam's first update is lr·g/(|g| + eps): at the config's eps (1e-15) a gradient element at rounding level
    # still moves its parameter by ±lr, and its sign is what the summation order decides. An eps above that
    # level keeps such elements' updates proportional to them, so the comparison sees the accumulation only.
    config.train.eps = 1e-8
    mesh = make_mesh((1, 1, 1))
    make_model, codec, objective = loop.build(config)
    tx = optim.make_optimizer(config.train)
    _, shardings = step_lib.plan_state(codec, make_model, tx, config.train, mesh)
    state = step_lib.create_state(codec, make_model, tx, config.train, shardings)
    # llm2vae starts at zero (as in BAGEL), which stops every gradient upstream of it: give it values so the
    # step's gradient reaches every trained parameter.
    kernel = state["params"]["llm2vae.kernel"]
    state["params"]["llm2vae.kernel"] = jax.device_put(
        0.05 * jax.random.normal(jax.random.key(7), kernel.shape, kernel.dtype), kernel.sharding)
    batch, _ = synthetic_batch(config, PackBudget.from_config(config.data.pack), ROWS, seed=5)
    step = jax.jit(sharding.traced_on_mesh(step_lib.make_train_step(codec, tx, objective, config.train), mesh))
    new_state, metrics = step(state, sharding.global_batch(batch, mesh))
    return jax.device_get(state), jax.device_get(new_state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def steps():
    return {accum: _one_step(accum) for accum in (1, ACCUM)}


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf, np.float64)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_close_per_leaf(got, want, rtol: float, what: str) -> None:
    """Each leaf within ``rtol`` of its own largest magnitude (not of the largest leaf of the tree)."""
    got, want = _leaves(got), _leaves(want)
    assert sorted(got) == sorted(want), what
    worst = {name: float(np.max(np.abs(got[name] - want[name]))) / max(float(np.max(np.abs(want[name]))), 1e-30)
             for name in want if want[name].size}
    bad = {name: err for name, err in worst.items() if err > rtol}
    assert not bad, f"{what}: {len(bad)} leaves off by more than {rtol} of their scale: {sorted(bad.items())[:5]}"


def test_grad_accum_equals_one_big_batch(steps):
    (before, one, m1), (_, accum, mk) = steps[1], steps[ACCUM]
    # The step moved every trained array: equal results are not two copies of the initial state.
    assert m1["grad_norm"] > 0 and np.isfinite(m1["loss"])
    moved = [n for n in before["params"] if np.array_equal(before["params"][n], one["params"][n])]
    assert not moved, moved[:5]
    assert float(mk["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    assert float(mk["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    for key in ("ce", "mse"):
        assert float(mk[key]) == pytest.approx(float(m1[key]), rel=1e-6), key
    # Adam's first moment after one step is (1 − β1)·g: the accumulated gradient itself, per parameter.
    _assert_close_per_leaf(accum["opt"], one["opt"], 1e-4, "Adam moments")
    _assert_close_per_leaf(accum["params"], one["params"], 1e-5, "parameters")
    _assert_close_per_leaf(accum["ema"], one["ema"], 1e-5, "EMA")
