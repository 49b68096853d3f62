"""Flow-matching kernels (interpret mode, both lowerings) against float64 references.

The sampling-step reference is written in PyTorch the way BAGEL's ``_forward_flow`` and its sampling loop
compute it (``torch.norm``, ``clamp``, the ``t > lo and t <= hi`` interval), independently of our jnp code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from synermedgen_jax.kernels import flow_matching as fm

SETTINGS = settings(max_examples=10, deadline=None)
KERNELS = [("pallas_interpret", "triton"), ("pallas_interpret", "mosaic")]
# Few distinct shapes (each compiles once) that still cover N = 1, N not a block multiple, odd C.
shapes = st.sampled_from([(1, 16), (37, 48), (200, 64), (300, 64)])


@functools.cache
def _noising(impl, backend):
    def run(x0, noise, t, w):
        fn = lambda *a: jnp.sum(fm.noised_latents(*a, impl=impl, backend=backend, block_rows=128) * w)
        ref = lambda *a: jnp.sum(fm.noised_latents_reference(*a) * w)
        out = fm.noised_latents(x0, noise, t, impl=impl, backend=backend, block_rows=128)
        return out, jax.grad(fn, argnums=(0, 1, 2))(x0, noise, t), jax.grad(ref, argnums=(0, 1, 2))(x0, noise, t)

    return jax.jit(run)


@functools.cache
def _mse(impl, backend):
    loss = lambda p, a, b, m: fm.velocity_mse_sum(p, a, b, m, impl=impl, backend=backend, block_rows=128)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _arrays(seed, shape, count, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(dtype) for _ in range(count)]


@pytest.mark.parametrize(("impl", "backend"), KERNELS)
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_noised_latents_and_its_gradients(impl, backend, shape, seed):
    x0, noise = _arrays(seed, shape, 2)
    t = np.random.default_rng(seed + 1).uniform(size=shape[:1]).astype(np.float32)
    expected = (1 - t.astype(np.float64))[:, None] * x0 + t.astype(np.float64)[:, None] * noise
    w = _arrays(seed + 2, shape, 1)[0]
    got, grads, ref_grads = _noising(impl, backend)(x0, noise, t, w)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5)


def test_shift_timesteps_matches_bagel_schedule():
    t = np.linspace(1, 0, 50)
    np.testing.assert_allclose(np.asarray(fm.shift_timesteps(jnp.asarray(t), 1.0)), t, atol=1e-7)
    shifted = np.asarray(fm.shift_timesteps(jnp.asarray(t, jnp.float32), 3.0))
    np.testing.assert_allclose(shifted, 3 * t / (1 + 2 * t), atol=1e-6)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and np.all(np.diff(shifted) < 0)


@pytest.mark.parametrize(("impl", "backend"), KERNELS)
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), bool_mask=st.booleans())
def test_velocity_mse_sum_and_its_gradients(impl, backend, shape, seed, bool_mask):
    pred, x0, noise = _arrays(seed, shape, 3)
    rng = np.random.default_rng(seed + 3)
    mask = rng.random(shape[0]) < 0.6 if bool_mask else rng.uniform(size=shape[0]).astype(np.float32)
    diff = pred.astype(np.float64) - (noise.astype(np.float64) - x0)
    expected = np.sum(np.mean(diff**2, axis=1) * mask)
    got, (d_pred, d_x0, d_noise) = _mse(impl, backend)(pred, x0, noise, mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), expected, rtol=2e-5, atol=1e-5)
    expected_grad = 2.0 / shape[1] * diff * np.asarray(mask, np.float64)[:, None]
    np.testing.assert_allclose(np.asarray(d_pred), expected_grad, atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_x0), expected_grad, atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_noise), -expected_grad, atol=1e-5)


def test_velocity_mse_bfloat16_inputs():
    pred, x0, noise = (jnp.asarray(a, jnp.bfloat16) for a in _arrays(4, (96, 64), 3))
    mask = jnp.ones((96,), bool)
    ref = fm.velocity_mse_sum_reference(pred, x0, noise, mask)
    got = fm.velocity_mse_sum(pred, x0, noise, mask, impl="pallas_interpret")
    assert got.dtype == ref.dtype == jnp.float32  # bf16 inputs, float32 arithmetic and result
    # The exact value for these (bf16-rounded) inputs, in float64: both agree with it at float32 accumulation
    # scale (96 rows × 64 dims), not merely at bf16 scale.
    p, x, n = (np.asarray(a, np.float64) for a in (pred, x0, noise))
    exact = np.sum(np.mean((p - (n - x)) ** 2, axis=1))
    assert float(got) == pytest.approx(exact, rel=1e-6)
    assert float(ref) == pytest.approx(exact, rel=1e-6)


def _bagel_step(x, v, v_text, v_img, t, dt, cfg_text, cfg_img, interval, renorm, renorm_min):
    """BAGEL's guidance + Euler, in torch float64 (one image: the rows of x)."""
    x, v, v_text, v_img = (torch.tensor(a, dtype=torch.float64) for a in (x, v, v_text, v_img))
    if not (t > interval[0] and t <= interval[1]):
        cfg_text, cfg_img = 1.0, 1.0
    if cfg_text > 1.0:
        if renorm == "text_channel":
            v_t_text_ = v_text + cfg_text * (v - v_text)
            scale = (torch.norm(v, dim=-1, keepdim=True) / (torch.norm(v_t_text_, dim=-1, keepdim=True) + 1e-8))
            v_t_text = v_t_text_ * scale.clamp(min=renorm_min, max=1.0)
            v = v_img + cfg_img * (v_t_text - v_img) if cfg_img > 1.0 else v_t_text
        else:
            v_t_text_ = v_text + cfg_text * (v - v_text)
            v_ = v_img + cfg_img * (v_t_text_ - v_img) if cfg_img > 1.0 else v_t_text_
            if renorm == "global":
                norm_v, norm_v_ = torch.norm(v), torch.norm(v_)
            else:
                norm_v, norm_v_ = torch.norm(v, dim=-1, keepdim=True), torch.norm(v_, dim=-1, keepdim=True)
            v = v_ * (norm_v / (norm_v_ + 1e-8)).clamp(min=renorm_min, max=1.0)
    return (x - v * dt).numpy()


@pytest.mark.parametrize("renorm", ["text_channel", "global", "channel"])
@pytest.mark.parametrize(("impl", "backend"), KERNELS + [("reference", None)])
@settings(max_examples=6, deadline=None)
@given(
    shape=shapes, seed=st.integers(0, 2**31 - 1),
    cfg_text=st.sampled_from([1.0, 4.0]), cfg_img=st.sampled_from([1.0, 1.5]),
    t=st.sampled_from([1.0, 0.6, 0.05]), renorm_min=st.sampled_from([0.0, 0.7]),
)
def test_cfg_euler_step_matches_bagel(renorm, impl, backend, shape, seed, cfg_text, cfg_img, t, renorm_min):
    x, v, v_text, v_img = _arrays(seed, shape, 4)
    v_text = v + 0.5 * v_text  # realistic: unconditional velocities close to the conditional one
    interval = (0.1, 1.0)  # t = 0.05 falls outside: no guidance
    dt = 0.02
    expected = _bagel_step(x, v, v_text, v_img, t, dt, cfg_text, cfg_img, interval, renorm, renorm_min)
    step = jax.jit(lambda *a, t: fm.cfg_euler_step(
        *a, t, dt, cfg_text=cfg_text, cfg_img=cfg_img, cfg_interval=interval, renorm=renorm,
        renorm_min=renorm_min, impl=impl, backend=backend))
    got = step(x, v, v_text, v_img, t=jnp.float32(t))  # t traced: the interval test runs on device
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-6, rtol=1e-5)


def test_bad_arguments_are_named():
    x = jnp.zeros((4, 8))
    with pytest.raises(ValueError, match="unknown impl"):
        fm.noised_latents(x, x, jnp.zeros(4), impl="cuda")
    with pytest.raises(ValueError, match="mask must be"):
        fm.velocity_mse_sum(x, x, x, jnp.zeros(3))
    with pytest.raises(ValueError, match="renorm"):
        fm.cfg_euler_step(x, x, x, x, 0.5, 0.1, cfg_text=4.0, cfg_img=1.5, renorm="l2")
    with pytest.raises(ValueError, match="v_img_uncond"):
        fm.cfg_euler_step(x, x, x, x[:2], 0.5, 0.1, cfg_text=4.0, cfg_img=1.5)
