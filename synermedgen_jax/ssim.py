"""Jitted, batched SSIM over ``[N, H, W]`` images: the one implementation behind evaluation's SSIM score
(evaluation/metrics.py) and the stage-0 VAE's SSIM loss (training/vae_stage.py).

Contract (docs/architecture.md): ``ssim`` takes ``pred`` and ``target`` of shape ``[N, H, W]`` and returns one
value per image, shape ``[N]``. It reproduces scikit-image's

    structural_similarity(im1, im2, gaussian_weights=True, sigma=1.5,
                          use_sample_covariance=False, data_range=R)

i.e. Wang et al. (2004): Gaussian-weighted local means/variances with sigma 1.5 truncated at 3.5 sigma
(an 11-tap window, radius 5), population covariance, K1 = 0.01, K2 = 0.03, and the mean of the SSIM
map taken after cropping a 5-pixel border (``(win_size - 1) // 2``).

How the filter is computed, and why. Only the cropped interior of the SSIM map enters the mean. The
Gaussian at an interior pixel reads input pixels at most 5 away, so it never reaches the image border:
the boundary mode (scipy's ``'reflect'``) cannot influence the result and the filter is a *valid*
correlation, ``out[o] = sum_k taps[k] * in[o + k]`` for ``o < L - 2r``. The kernel is separable and
symmetric, so each pass is 11 shifted slices folded in pairs (6 multiplies, 10 adds per output), which
XLA:CPU fuses into one vectorised loop per pass. Three choices make that fast on CPU (measured with
``python -m tools.bench_metrics``; ~5-10x a banded-matrix version):

* Four moment planes instead of five. SSIM needs ``mu_x``, ``mu_y``, ``var_x + var_y`` and ``cov_xy``
  only, so ``x^2`` and ``y^2`` are filtered as one plane ``x^2 + y^2``.
* The first (width) pass is materialised once and the second (height) pass reads it. XLA fuses a
  producer into a consumer that reads it through several slices by *recomputing* it per slice (11x the
  first pass). The four first-pass planes are computed separately and stacked; XLA does not fuse a
  concatenation into slicing consumers, so the stack is written once. The second pass, the SSIM formula
  and the per-image weights then run as one fused loop, and the mean is a matrix-vector product
  (XLA:CPU's fused elementwise+reduce loops measured several times slower than that).
* Batch chunks of about ``_CHUNK_PIXELS`` pixels per ``lax.map`` step keep each step's buffers (four
  planes) cache-sized; whole-batch intermediates are memory-bound. The image axes stay minor: a
  batch-minor ``[H, W, B]`` layout measured 2-4x slower here (the W-pass then strides over B).

Masks (body / foreground). ``mask`` is ``[N, H, W]`` (bool or 0/1); nonzero marks pixels that count.
SSIM with a mask is the mean of the SSIM map over the mask pixels *inside the same 5-pixel crop* (mask
pixels on the border strip are ignored). An image with no counted pixel yields NaN (0 / 0) rather than an
error, because values are unknown at trace time. :func:`check_images` and :func:`check_data_range` are the
argument checks every metric of evaluation/metrics.py shares.

All computation is float32 (inputs of other dtypes are cast); float64 is not supported.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["K1", "K2", "SIGMA", "TRUNCATE", "RADIUS", "WIN_SIZE", "gaussian_taps", "ssim", "check_images",
           "check_data_range"]

K1 = 0.01
K2 = 0.03
SIGMA = 1.5
# scikit-image sets truncate = 3.5 for gaussian_weights so that sigma 1.5 gives Wang et al.'s 11 taps.
TRUNCATE = 3.5
RADIUS = int(TRUNCATE * SIGMA + 0.5)  # scipy.ndimage's radius rule -> 5
WIN_SIZE = 2 * RADIUS + 1  # 11; also the crop: (WIN_SIZE - 1) // 2 == RADIUS

# Pixels per lax.map step (images per step = this // (H * W), at least 2): 4 images of 256 x 256. The
# step's four first-pass planes are then 4 MB; 2^17 .. 2^20 measured within noise of each other.
_CHUNK_PIXELS = 1 << 18


def gaussian_taps(sigma: float = SIGMA, radius: int = RADIUS) -> np.ndarray:
    """Normalised 1-D Gaussian taps ``[2 * radius + 1]`` (float64), as scipy.ndimage builds them."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


# --------------------------------------------------------------------------------------------------
# Validation: everything here runs at trace time on static shapes, so a bad call fails with a
# one-line ValueError before JAX builds anything.
# --------------------------------------------------------------------------------------------------


def check_images(pred, target, mask, *, min_size: int = 1) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(pred, target, mask)`` checked and cast: float32 ``[N, H, W]`` images of equal shape (H, W >=
    ``min_size``), the mask as bool (or None). A bad argument raises a one-line ValueError."""
    p_shape, t_shape = np.shape(pred), np.shape(target)
    for name, shape in (("pred", p_shape), ("target", t_shape)):
        if len(shape) != 3:
            hint = " (add a batch axis for a single image)" if len(shape) == 2 else ""
            raise ValueError(f"{name} must have shape [N, H, W]; got rank {len(shape)} shape {shape}{hint}")
    if p_shape != t_shape:
        raise ValueError(f"pred and target shapes differ: pred {p_shape} vs target {t_shape}")
    if p_shape[1] < min_size or p_shape[2] < min_size:
        raise ValueError(f"pred/target images must be at least {min_size}x{min_size} (the SSIM window); "
                         f"got H={p_shape[1]}, W={p_shape[2]}")
    for name, x in (("pred", pred), ("target", target)):
        dt = jnp.result_type(x)
        if not (jnp.issubdtype(dt, jnp.floating) or jnp.issubdtype(dt, jnp.integer)):
            raise ValueError(f"{name} must be a real numeric array; got dtype {dt}")
    m = None
    if mask is not None:
        if np.shape(mask) != p_shape:
            raise ValueError(f"mask must have the images' shape {p_shape}; got {np.shape(mask)}")
        m = jnp.asarray(mask) != 0
    return jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), m


def check_data_range(data_range) -> jax.Array | np.float32:
    """A positive finite scalar data range as float32 (a traced value is only checked for its shape)."""
    if isinstance(data_range, jax.core.Tracer):
        # A traced value cannot be checked here; the caller took responsibility for it.
        if np.ndim(data_range) != 0:
            raise ValueError(f"data_range must be a scalar; got shape {np.shape(data_range)}")
        return jnp.asarray(data_range, jnp.float32)
    if isinstance(data_range, (np.ndarray, jax.Array)):
        if np.ndim(data_range) != 0:
            raise ValueError(f"data_range must be a scalar; got shape {np.shape(data_range)}")
        data_range = np.asarray(data_range).item()
    if isinstance(data_range, bool) or not isinstance(data_range, numbers.Real):
        raise ValueError(f"data_range must be a real number; got {data_range!r}")
    if not np.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range must be positive and finite; got {data_range}")
    # A NumPy scalar, not a device array: jnp.asarray costs ~0.1 ms per call, a visible share of a small
    # batch's SSIM; the jitted implementation takes either.
    return np.float32(data_range)


# --------------------------------------------------------------------------------------------------
# Separable valid Gaussian as fused shifted slices
# --------------------------------------------------------------------------------------------------


def _valid_gauss(x: jax.Array, axis: int) -> jax.Array:
    """Valid Gaussian correlation along ``axis``: length ``L`` -> ``L - 2 * RADIUS``.

    ``out[o] = sum_k taps[k] * x[o + k]``; the symmetric taps are applied to pairs of slices so each
    output costs ``RADIUS + 1`` multiplies. The taps are Python floats, i.e. compile-time constants.
    """
    taps = gaussian_taps()
    n_out = x.shape[axis] - 2 * RADIUS

    def sl(k: int) -> jax.Array:
        return jax.lax.slice_in_dim(x, k, k + n_out, axis=axis)

    acc = float(taps[RADIUS]) * sl(RADIUS)
    for k in range(RADIUS):
        acc = acc + float(taps[k]) * (sl(k) + sl(2 * RADIUS - k))
    return acc


def _ssim_terms(ux, uy, uss, uxy, c1, c2) -> jax.Array:
    """SSIM map from the filtered moments: means of x, y, x^2 + y^2 and x * y (population statistics)."""
    uxuy = ux * uy
    u2 = ux * ux + uy * uy
    # var_x + var_y = E[x^2 + y^2] - (mu_x^2 + mu_y^2); cov = E[xy] - mu_x mu_y.
    num = (2.0 * uxuy + c1) * (2.0 * (uxy - uxuy) + c2)
    den = (u2 + c1) * (uss - u2 + c2)
    return num / den


def _chunk_ssim_map(xc: jax.Array, yc: jax.Array, c1, c2) -> jax.Array:
    """Cropped SSIM maps of one chunk: ``xc, yc [C, H, W]`` -> ``[C, (H - 2r) * (W - 2r)]``.

    Output ``(i, j)`` is skimage's map at pixel ``(i + r, j + r)``.
    """
    c, h, w = xc.shape
    # Four separately filtered width passes, stacked: the stack is what XLA materialises (see the
    # module docstring), so the height pass below reads the first pass instead of recomputing it.
    first = jnp.stack([_valid_gauss(p, 2) for p in (xc, yc, xc * xc + yc * yc, xc * yc)])  # [4, C, H, W-2r]
    mu = _valid_gauss(first, 2)  # [4, C, H-2r, W-2r]
    s = _ssim_terms(mu[0], mu[1], mu[2], mu[3], c1, c2)
    return s.reshape(c, (h - 2 * RADIUS) * (w - 2 * RADIUS))


@functools.partial(jax.jit, static_argnames=("chunk",))
def _ssim_impl(pred, target, data_range, mask, *, chunk: int) -> jax.Array:
    n, h, w = pred.shape
    ho, wo = h - 2 * RADIUS, w - 2 * RADIUS
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    nc = -(-n // chunk)
    npad = nc * chunk - n
    # Padded images (zeros) give a finite SSIM of 1 and are dropped below.
    x = jnp.pad(pred, ((0, npad), (0, 0), (0, 0))).reshape(nc, chunk, h, w)
    y = jnp.pad(target, ((0, npad), (0, 0), (0, 0))).reshape(nc, chunk, h, w)

    if mask is None:
        # XLA sinks this broadcast into the loop body (one [(H-2r)(W-2r)] write per step, ~5% of a step's
        # memory traffic); a reduce instead of the dot measured slower.
        mean_w = jnp.full((ho * wo,), 1.0 / (ho * wo), jnp.float32)

        def body(args):
            return _chunk_ssim_map(*args, c1, c2) @ mean_w

        return jax.lax.map(body, (x, y)).reshape(-1)[:n]

    # Mask weights on the cropped frame (mask pixels on the border strip do not count).
    m = mask[:, RADIUS : h - RADIUS, RADIUS : w - RADIUS].astype(jnp.float32).reshape(n, ho * wo)
    m = jnp.pad(m, ((0, npad), (0, 0))).reshape(nc, chunk, ho * wo)

    def body_masked(args):
        xc, yc, mc = args
        s = _chunk_ssim_map(xc, yc, c1, c2)
        return jnp.einsum("ck,ck->c", s, mc) / jnp.sum(mc, axis=1)

    return jax.lax.map(body_masked, (x, y, m)).reshape(-1)[:n]


def ssim(pred, target, *, data_range, mask=None) -> jax.Array:
    """Mean SSIM per image, as scikit-image's Gaussian-window SSIM (see the module docstring).

    Args:
      pred: ``[N, H, W]`` predicted images (H, W >= 11).
      target: ``[N, H, W]`` reference images.
      data_range: positive scalar, the dynamic range of the images (max - min possible value).
      mask: optional ``[N, H, W]`` bool/0-1; average the SSIM map over mask pixels inside the
        ``RADIUS``-pixel crop.

    Returns:
      ``[N]`` float32 SSIM values. Jittable; usable inside ``jax.jit`` with static shapes.
    """
    x, y, m = check_images(pred, target, mask, min_size=WIN_SIZE)
    dr = check_data_range(data_range)
    n, h, w = x.shape
    chunk = max(1, min(n, max(2, _CHUNK_PIXELS // (h * w))))
    return _ssim_impl(x, y, dr, m, chunk=chunk)
