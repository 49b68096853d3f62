"""SSIM / PSNR / MAE against scikit-image and float64 numpy on fresh random and real images.

Tolerances: SSIM 1e-4 absolute per image (the contract); PSNR 1e-3 dB (float32 vs float64 MSE); MAE
1e-5 relative. Image sizes are kept small and few so that compilation keeps the file well under a minute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from synermedgen_jax import ssim as ssim_module
from synermedgen_jax.evaluation import metrics

R = ssim_module.RADIUS
SSIM_TOL = 1e-4


def sk_ssim(x: np.ndarray, y: np.ndarray, data_range: float, full: bool = False):
    return structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=data_range, full=full)


def pair(rng: np.random.Generator, shape, *, scale=1.0, offset=0.0, noise=0.2):
    """A smooth-ish target and a degraded prediction, so SSIM values spread over (0, 1)."""
    t = ndimage.gaussian_filter(rng.random(shape), sigma=(0, 2, 2)) * 3 + 0.3 * rng.random(shape)
    p = t + noise * rng.standard_normal(shape) + 0.1 * rng.random((shape[0], 1, 1))
    return ((p * scale + offset).astype(np.float32), (t * scale + offset).astype(np.float32))


def test_constants_match_skimage_window():
    assert metrics.WIN_SIZE == ssim_module.WIN_SIZE == 11 and R == 5
    taps = ssim_module.gaussian_taps()
    # scipy.ndimage's own 1-D Gaussian of a unit impulse gives the same taps.
    impulse = np.zeros(21)
    impulse[10] = 1
    ref = ndimage.gaussian_filter1d(impulse, 1.5, truncate=3.5, mode="constant")[5:16]
    np.testing.assert_allclose(taps, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shape, scale, offset", [
    ((5, 64, 64), 1.0, 0.0),  # 5 images in one lax.map step
    ((3, 45, 77), 1.0, 0.0),  # sizes that are not tile multiples, non-square
    ((2, 11, 11), 1.0, 0.0),  # smallest legal image: a single SSIM value after the crop
    ((2, 40, 33), 1000.0, -1000.0),  # HU-like range and negative offset
])
def test_ssim_matches_skimage_random(shape, scale, offset):
    rng = np.random.default_rng()
    p, t = pair(rng, shape, scale=scale, offset=offset)
    dr = float(scale * 4)
    got = np.asarray(metrics.ssim(p, t, data_range=dr))
    ref = np.array([sk_ssim(a, b, dr) for a, b in zip(p, t)])
    assert got.shape == (shape[0],) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=SSIM_TOL, rtol=0)
    assert np.ptp(ref) > 1e-3 or shape[0] == 1  # the inputs are not trivially alike


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), h=st.integers(11, 48), w=st.integers(11, 48), seed=st.integers(0, 2**31 - 1),
       dr=st.floats(0.5, 50.0))
def test_ssim_matches_skimage_property(n, h, w, seed, dr):
    rng = np.random.default_rng(seed)
    p = (rng.random((n, h, w)) * dr).astype(np.float32)
    t = np.clip(p + 0.2 * dr * rng.standard_normal((n, h, w)), 0, dr).astype(np.float32)
    got = np.asarray(metrics.ssim(p, t, data_range=dr))
    ref = np.array([sk_ssim(a, b, dr) for a, b in zip(p, t)])
    np.testing.assert_allclose(got, ref, atol=SSIM_TOL, rtol=0)


def test_ssim_matches_skimage_real_images():
    # Real photographs shipped with scikit-image (no download), degraded by blur and noise.
    rng = np.random.default_rng()
    imgs = [skdata.camera(), skdata.moon(), skdata.coins()[:256, :256]]
    t = np.stack([img[:256, :256] for img in imgs]).astype(np.float32)
    p = ndimage.gaussian_filter(t, sigma=(0, 1.2, 1.2)) + rng.normal(0, 8, t.shape)
    p = np.clip(p, 0, 255).astype(np.float32)
    got = np.asarray(metrics.ssim(p, t, data_range=255.0))
    ref = np.array([sk_ssim(a, b, 255.0) for a, b in zip(p, t)])
    np.testing.assert_allclose(got, ref, atol=SSIM_TOL, rtol=0)


@pytest.mark.parametrize("use_mask", [False, True])
def test_ssim_several_chunks_with_padding(monkeypatch, use_mask):
    # A small chunk budget forces 2 images per lax.map step: 5 images -> 3 steps, the last one padded.
    monkeypatch.setattr(ssim_module, "_CHUNK_PIXELS", 2 * 36 * 29)
    rng = np.random.default_rng()
    p, t = pair(rng, (5, 36, 29))
    mask = rng.random(p.shape) < 0.5 if use_mask else None
    got = np.asarray(metrics.ssim(p, t, data_range=4.0, mask=mask))
    ref = []
    for i, (a, b) in enumerate(zip(p, t)):
        s = sk_ssim(a, b, 4.0, full=True)[1][R:-R, R:-R]
        ref.append(s.mean(dtype=np.float64) if mask is None else s[mask[i, R:-R, R:-R]].mean(dtype=np.float64))
    assert got.shape == (5,)
    np.testing.assert_allclose(got, ref, atol=SSIM_TOL, rtol=0)


def test_ssim_first_filter_pass_is_materialised_once():
    # The speed design (metrics module docstring): XLA writes the four first-pass planes [4, C, H, W - 2r]
    # once and the second pass reads them. If XLA fused the first pass into the second, it would recompute
    # it per tap (11x) and no buffer of that shape would exist.
    x = jnp.zeros((4, 32, 32), jnp.float32)
    text = jax.jit(lambda a, b: metrics.ssim(a, b, data_range=1.0)).lower(x, x).compile().as_text()
    assert f"f32[4,4,32,{32 - 2 * R}]" in text


def test_ssim_masked_is_mean_of_skimage_map_over_cropped_mask():
    rng = np.random.default_rng()
    p, t = pair(rng, (3, 50, 37))
    mask = rng.random(p.shape) < 0.4
    mask[0] = False
    mask[0, 20:30, 10:25] = True  # a compact body-like region
    got = np.asarray(metrics.ssim(p, t, data_range=4.0, mask=mask))
    ref = []
    for a, b, m in zip(p, t, mask):
        s = sk_ssim(a, b, 4.0, full=True)[1][R:-R, R:-R]
        ref.append(s[m[R:-R, R:-R]].mean(dtype=np.float64))
    np.testing.assert_allclose(got, ref, atol=SSIM_TOL, rtol=0)
    # An all-ones mask is the unmasked SSIM; a mask only on the cropped border gives NaN (nothing counted).
    ones = np.asarray(metrics.ssim(p, t, data_range=4.0, mask=np.ones(p.shape, bool)))
    np.testing.assert_allclose(ones, np.asarray(metrics.ssim(p, t, data_range=4.0)), atol=1e-6)
    border = np.zeros(p.shape, bool)
    border[:, :R] = True
    assert np.all(np.isnan(np.asarray(metrics.ssim(p, t, data_range=4.0, mask=border))))


def test_ssim_properties_and_batch_independence():
    rng = np.random.default_rng()
    p, t = pair(rng, (6, 33, 33))
    full = np.asarray(metrics.ssim(p, t, data_range=4.0))
    np.testing.assert_allclose(np.asarray(metrics.ssim(t, p, data_range=4.0)), full, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.ssim(t, t, data_range=4.0)), 1.0, atol=1e-6)
    # Each image's value does not depend on its batch neighbours or on chunk padding.
    for i in (0, 5):
        np.testing.assert_allclose(np.asarray(metrics.ssim(p[i:i + 1], t[i:i + 1], data_range=4.0)),
                                   full[i:i + 1], atol=1e-6)


def test_metrics_are_jittable_with_traced_data_range():
    rng = np.random.default_rng()
    p, t = pair(rng, (2, 24, 24))
    mask = rng.random(p.shape) < 0.7

    @jax.jit
    def all_metrics(a, b, m, dr):
        return (metrics.ssim(a, b, data_range=dr, mask=m), metrics.psnr(a, b, data_range=dr, mask=m),
                metrics.mae(a, b, mask=m))

    s, ps, ma = all_metrics(p, t, mask, jnp.float32(4.0))
    np.testing.assert_allclose(s, metrics.ssim(p, t, data_range=4.0, mask=mask), atol=1e-6)
    np.testing.assert_allclose(ps, metrics.psnr(p, t, data_range=4.0, mask=mask), rtol=1e-6)
    np.testing.assert_allclose(ma, metrics.mae(p, t, mask=mask), rtol=1e-6)


def test_psnr_matches_skimage_and_mae_matches_numpy():
    rng = np.random.default_rng()
    p, t = pair(rng, (4, 37, 52), scale=1500.0, offset=-1000.0)  # HU-like
    got = np.asarray(metrics.psnr(p, t, data_range=4000.0))
    ref = np.array([peak_signal_noise_ratio(b, a, data_range=4000.0) for a, b in zip(p, t)])
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    d = p.astype(np.float64) - t.astype(np.float64)
    np.testing.assert_allclose(np.asarray(metrics.mae(p, t)), np.abs(d).mean(axis=(1, 2)), rtol=1e-5)

    mask = rng.random(p.shape) < 0.3
    mse = np.array([(di[m] ** 2).mean() for di, m in zip(d, mask)])
    np.testing.assert_allclose(np.asarray(metrics.psnr(p, t, data_range=4000.0, mask=mask)),
                               10 * np.log10(4000.0**2 / mse), atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.asarray(metrics.mae(p, t, mask=mask)),
                               [np.abs(di[m]).mean() for di, m in zip(d, mask)], rtol=1e-5)
    assert np.isinf(np.asarray(metrics.psnr(t, t, data_range=1.0))).all()


@pytest.mark.parametrize("call, match", [
    (lambda x: metrics.ssim(x[0], x[0], data_range=1.0), r"pred must have shape \[N, H, W\].*rank 2"),
    (lambda x: metrics.psnr(x[None], x[None], data_range=1.0), r"pred must have shape \[N, H, W\].*rank 4"),
    (lambda x: metrics.mae(x, x[:, :-1]), r"pred and target shapes differ"),
    (lambda x: metrics.ssim(x, x, data_range=1.0, mask=x[0] > 0), r"mask must have the images' shape"),
    (lambda x: metrics.ssim(x, x, data_range=0.0), r"data_range must be positive"),
    (lambda x: metrics.psnr(x, x, data_range=-2), r"data_range must be positive"),
    (lambda x: metrics.ssim(x, x, data_range=float("nan")), r"data_range must be positive and finite"),
    (lambda x: metrics.ssim(x, x, data_range=None), r"data_range must be a real number"),
    (lambda x: metrics.ssim(x, x, data_range=np.ones(2)), r"data_range must be a scalar"),
    (lambda x: metrics.ssim(x[:, :10], x[:, :10], data_range=1.0), r"at least 11x11"),
    (lambda x: metrics.mae(x.astype(bool), x), r"pred must be a real numeric array"),
])
def test_bad_input_is_a_clear_value_error(call, match):
    x = np.random.default_rng().random((2, 16, 16)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        call(x)


def test_bad_shape_inside_jit_fails_at_trace_time():
    x = jnp.zeros((2, 16, 16))
    with pytest.raises(ValueError, match="pred and target shapes differ"):
        jax.jit(lambda a, b: metrics.ssim(a, b, data_range=1.0))(x, x[:, :, :15])
