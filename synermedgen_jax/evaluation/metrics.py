"""Jitted, batched image-quality metrics: SSIM, PSNR and MAE over ``[N, H, W]`` slices.

Contract (shared/DESIGN.md §6): every metric takes ``pred`` and ``target`` of shape ``[N, H, W]`` and
returns one value per image, shape ``[N]``. SSIM reproduces scikit-image's

    structural_similarity(im1, im2, gaussian_weights=True, sigma=1.5,
                          use_sample_covariance=False, data_range=R)

i.e. Wang et al. (2004): Gaussian-weighted local means/variances with sigma 1.5 truncated at 3.5 sigma
(an 11-tap window, radius 5), population covariance, K1 = 0.01, K2 = 0.03, and the mean of the SSIM
map taken after cropping a 5-pixel border (``(win_size - 1) // 2``).

How the filter is computed, and why. XLA:CPU runs an 11-tap ``lax.conv`` slowly, and a dense banded
matrix product spends most of its FLOPs multiplying zeros. Two observations make a cheap exact
formulation possible:

* Only the cropped interior of the SSIM map enters the mean. The Gaussian at an interior pixel reads
  input pixels at most 5 away, so it never reaches the image border: the boundary mode (scipy's
  ``'reflect'``) cannot influence the result and the filter is a *valid* correlation.
* A valid correlation along an axis of length ``L`` is a product with a banded Toeplitz matrix. Cut the
  axis into tiles of ``B`` samples; every tile multiplies the *same* small ``[B, B + 2r]`` matrix whose
  first ``B`` columns give the tile's own outputs and whose last ``2r`` columns give its contribution to
  the last ``2r`` outputs of the previous tile (an overlap-add). The multiply then costs ``B + 2r``
  MACs per sample instead of ``L``.

``ssim_map`` returns the full map including the border, equal to scikit-image's ``full=True`` output;
there the border does depend on the boundary mode, so it uses dense band matrices with scipy's
``'reflect'`` folded into them (only meant for a few images, e.g. error maps in reports).

Masks (body / foreground). ``mask`` is ``[N, H, W]`` (bool or 0/1); nonzero marks pixels that count.
SSIM with a mask is the mean of the SSIM map over the mask pixels *inside the same 5-pixel crop* (mask
pixels on the border strip are ignored). PSNR and MAE with a mask use the mask pixels only. An image
with no counted pixel yields NaN (0 / 0) rather than an error, because values are unknown at trace time.

All computation is float32 (inputs of other dtypes are cast); float64 is not supported.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["K1", "K2", "SIGMA", "TRUNCATE", "RADIUS", "WIN_SIZE", "gaussian_taps", "ssim", "ssim_map",
           "psnr", "mae"]

K1 = 0.01
K2 = 0.03
SIGMA = 1.5
# scikit-image sets truncate = 3.5 for gaussian_weights so that sigma 1.5 gives Wang et al.'s 11 taps.
TRUNCATE = 3.5
RADIUS = int(TRUNCATE * SIGMA + 0.5)  # scipy.ndimage's radius rule -> 5
WIN_SIZE = 2 * RADIUS + 1  # 11; also the crop: (WIN_SIZE - 1) // 2 == RADIUS

# Tile length of the banded product. 32 keeps the per-tile matrix [32, 42] in registers/L1 while the
# wasted work stays at (B + 2r) / (2r + 1) ~ 3.8x the 11-tap floor; 16 and 64 measured no better.
_TILE = 32
# Images per lax.map step. Whole-batch intermediates (5 filtered planes of 64 x 256 x 256 float32 are
# 84 MB) are slower on XLA:CPU than a loop over small chunks whose buffers stay cache-resident.
_CHUNK = 4


def gaussian_taps(sigma: float = SIGMA, radius: int = RADIUS) -> np.ndarray:
    """Normalised 1-D Gaussian taps ``[2 * radius + 1]`` (float64), as scipy.ndimage builds them."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


# --------------------------------------------------------------------------------------------------
# Validation: everything here runs at trace time on static shapes, so a bad call fails with a
# one-line ValueError before JAX builds anything.
# --------------------------------------------------------------------------------------------------


def _check_images(pred, target, mask, *, min_size: int = 1) -> tuple[jax.Array, jax.Array, jax.Array | None]:
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


def _check_data_range(data_range) -> jax.Array:
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
    return jnp.asarray(data_range, jnp.float32)


# --------------------------------------------------------------------------------------------------
# The tiled banded filter
# --------------------------------------------------------------------------------------------------


def _tile_matrix(block: int, taps: np.ndarray) -> np.ndarray:
    """``[block, block + 2r]`` map from one input tile to its outputs (valid correlation).

    Output ``o`` of the valid correlation reads inputs ``o .. o + 2r``. For input ``k`` of tile ``i``:
    column ``j < block`` is output ``i * block + j`` (tap ``k - j``); column ``block + jj`` is output
    ``(i - 1) * block + block - 2r + jj`` of the previous tile (tap ``k + 2r - jj``).
    """
    r2 = taps.shape[0] - 1
    a = np.zeros((block, block + r2), np.float64)
    for k in range(block):
        for j in range(max(0, k - r2), k + 1):
            a[k, j] = taps[k - j]
        for jj in range(k, r2):
            a[k, block + jj] = taps[k + r2 - jj]
    return a


def _overlap_add(p: jax.Array, block: int, axis: int) -> jax.Array:
    """Fold the ``2r`` halo columns of tile ``i + 1`` onto the tail of tile ``i``.

    ``p`` has the tile index at ``axis`` and the ``block + 2r`` tile outputs at ``axis + 1``; returns the
    same with ``block`` outputs per tile. The last tile receives zeros (its tail is outside the valid
    range anyway and gets zero weight).
    """
    nd = p.ndim
    main = jax.lax.slice_in_dim(p, 0, block, axis=axis + 1)
    halo = jax.lax.slice_in_dim(jax.lax.slice_in_dim(p, block, p.shape[axis + 1], axis=axis + 1),
                                1, p.shape[axis], axis=axis)
    pads = [(0, 0)] * nd
    pads[axis] = (0, 1)
    r2 = p.shape[axis + 1] - block
    pads[axis + 1] = (block - r2, 0)
    return main + jnp.pad(halo, pads)


def _filter_cols(x: jax.Array, a: jax.Array, block: int) -> jax.Array:
    """Valid Gaussian along the last axis. ``x [..., L]`` with ``L % block == 0`` -> ``[..., L]``."""
    lead, length = x.shape[:-1], x.shape[-1]
    p = x.reshape(*lead, length // block, block) @ a  # [..., nb, block + 2r]
    return _overlap_add(p, block, axis=len(lead)).reshape(*lead, length)


def _filter_rows(x: jax.Array, a: jax.Array, block: int) -> jax.Array:
    """Valid Gaussian along axis -2. ``x [..., L, W]`` with ``L % block == 0`` -> ``[..., L, W]``."""
    lead, (length, width) = x.shape[:-2], x.shape[-2:]
    nb = length // block
    xb = x.reshape(-1, block, width)  # [(... nb), block, W]
    # A batched product with the (broadcast) tile matrix keeps the contraction on the operand's
    # major-to-minor order, so XLA does not transpose the planes first.
    at = jnp.broadcast_to(a.T[None], (xb.shape[0],) + a.T.shape)
    p = jnp.matmul(at, xb).reshape(*lead, nb, a.shape[1], width)  # [..., nb, block + 2r, W]
    return _overlap_add(p, block, axis=len(lead)).reshape(*lead, length, width)


def _ssim_terms(mu: jax.Array, c1: jax.Array, c2: jax.Array) -> jax.Array:
    """SSIM map from the five filtered planes ``mu [5, ...]`` = (x, y, xx, yy, xy)."""
    ux, uy, uxx, uyy, uxy = mu[0], mu[1], mu[2], mu[3], mu[4]
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    num = (2.0 * ux * uy + c1) * (2.0 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    return num / den


def _pad_to(x: jax.Array, hp: int, wp: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, hp - x.shape[1]), (0, wp - x.shape[2])))


@functools.partial(jax.jit, static_argnames=("chunk", "block"))
def _ssim_impl(pred, target, data_range, mask, *, chunk: int, block: int) -> jax.Array:
    n, h, w = pred.shape
    r2 = 2 * RADIUS
    hp, wp = -(-h // block) * block, -(-w // block) * block
    a = jnp.asarray(_tile_matrix(block, gaussian_taps()), jnp.float32)
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2

    # Weights on the valid-output frame: output (i, j) is the SSIM at pixel (i + r, j + r), so the
    # crop of skimage is "the first h - 2r rows and w - 2r columns"; the zero padding beyond never
    # reaches those outputs (each reads at most 2r samples ahead).
    if mask is None:
        wgt = np.zeros((hp, wp), np.float32)
        wgt[: h - r2, : w - r2] = 1.0 / ((h - r2) * (w - r2))
        weights = jnp.asarray(wgt.reshape(-1))
    else:
        m = mask[:, RADIUS : h - RADIUS, RADIUS : w - RADIUS].astype(jnp.float32)
        weights = _pad_to(m, hp, wp).reshape(n, hp * wp)

    npad = -(-n // chunk) * chunk - n
    x = _pad_to(jnp.pad(pred, ((0, npad), (0, 0), (0, 0))), hp, wp)
    y = _pad_to(jnp.pad(target, ((0, npad), (0, 0), (0, 0))), hp, wp)

    def one_chunk(xy):
        xc, yc = xy  # [chunk, hp, wp]
        planes = jnp.stack([xc, yc, xc * xc, yc * yc, xc * yc])  # [5, chunk, hp, wp]
        mu = _filter_rows(_filter_cols(planes, a, block), a, block)
        return _ssim_terms(mu, c1, c2).reshape(chunk, hp * wp)

    if mask is None:
        # Reduce with a matrix-vector product: XLA:CPU's fused elementwise+reduce loops are several
        # times slower than writing the map and contracting it.
        def body(xy):
            return one_chunk(xy) @ weights

        out = jax.lax.map(body, (x.reshape(-1, chunk, hp, wp), y.reshape(-1, chunk, hp, wp)))
        return out.reshape(-1)[:n]

    wpad = jnp.pad(weights, ((0, npad), (0, 0)))

    def body_masked(args):
        xc, yc, wc = args
        s = one_chunk((xc, yc))
        return jnp.einsum("ck,ck->c", s, wc) / jnp.sum(wc, axis=1)

    out = jax.lax.map(body_masked, (x.reshape(-1, chunk, hp, wp), y.reshape(-1, chunk, hp, wp),
                                    wpad.reshape(-1, chunk, hp * wp)))
    return out.reshape(-1)[:n]


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
    x, y, m = _check_images(pred, target, mask, min_size=WIN_SIZE)
    dr = _check_data_range(data_range)
    chunk = min(_CHUNK, x.shape[0]) or 1
    return _ssim_impl(x, y, dr, m, chunk=chunk, block=_TILE)


# --------------------------------------------------------------------------------------------------
# Full SSIM map (reflect boundary), for error maps and tests
# --------------------------------------------------------------------------------------------------


def _reflect_band(n: int, taps: np.ndarray) -> np.ndarray:
    """``[n, n]`` matrix ``G`` with ``(G @ x)[o] = sum_k taps[k] * x[reflect(o + k - r)]``.

    scipy.ndimage's 'reflect' mirrors about the edge including the edge sample: (d c b a | a b c d).
    """
    r = (taps.shape[0] - 1) // 2
    g = np.zeros((n, n), np.float64)
    for o in range(n):
        for k, t in enumerate(taps):
            i = o + k - r
            # Repeat the mirror until inside: only matters for n < r, which the size check forbids.
            while i < 0 or i >= n:
                i = -i - 1 if i < 0 else 2 * n - i - 1
            g[o, i] += t
    return g


@jax.jit
def _ssim_map_impl(pred, target, data_range, gh, gw) -> jax.Array:
    planes = jnp.stack([pred, target, pred * pred, target * target, pred * target])
    mu = jnp.einsum("oh,qnhw,pw->qnop", gh, planes, gw)
    return _ssim_terms(mu, (K1 * data_range) ** 2, (K2 * data_range) ** 2)


def ssim_map(pred, target, *, data_range) -> jax.Array:
    """Full SSIM map ``[N, H, W]`` including the border, equal to scikit-image's ``full=True`` map.

    Uses dense reflect-folded band matrices (``O(H^2 W + H W^2)`` per image): meant for a few images.
    """
    x, y, _ = _check_images(pred, target, None, min_size=WIN_SIZE)
    dr = _check_data_range(data_range)
    taps = gaussian_taps()
    gh = jnp.asarray(_reflect_band(x.shape[1], taps), jnp.float32)
    gw = jnp.asarray(_reflect_band(x.shape[2], taps), jnp.float32)
    return _ssim_map_impl(x, y, dr, gh, gw)


# --------------------------------------------------------------------------------------------------
# PSNR and MAE
# --------------------------------------------------------------------------------------------------


@jax.jit
def _masked_mean(v: jax.Array, mask) -> jax.Array:
    n = v.shape[0]
    v = v.reshape(n, -1)
    if mask is None:
        return jnp.mean(v, axis=1)
    m = mask.reshape(n, -1).astype(jnp.float32)
    return jnp.sum(v * m, axis=1) / jnp.sum(m, axis=1)


def psnr(pred, target, *, data_range, mask=None) -> jax.Array:
    """Peak signal-to-noise ratio per image in dB, as scikit-image's ``peak_signal_noise_ratio``.

    ``10 * log10(data_range**2 / MSE)``; identical images give ``inf``. With ``mask`` the MSE is over the
    mask pixels only. Shapes: ``pred``, ``target``, ``mask`` ``[N, H, W]`` -> ``[N]``.
    """
    x, y, m = _check_images(pred, target, mask)
    dr = _check_data_range(data_range)
    mse = _masked_mean(jnp.square(x - y), m)
    return 10.0 * jnp.log10(dr * dr / mse)


def mae(pred, target, *, mask=None) -> jax.Array:
    """Mean absolute error per image, in the units of the inputs (de-normalise first, e.g. to HU).

    Shapes: ``pred``, ``target``, ``mask`` ``[N, H, W]`` -> ``[N]``.
    """
    x, y, m = _check_images(pred, target, mask)
    return _masked_mean(jnp.abs(x - y), m)
