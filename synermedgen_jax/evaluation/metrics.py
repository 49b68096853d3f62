"""Jitted, batched image-quality metrics: SSIM, PSNR and MAE over ``[N, H, W]`` slices.

Contract (docs/architecture.md): every metric takes ``pred`` and ``target`` of shape ``[N, H, W]`` and
returns one value per image, shape ``[N]``. SSIM is scikit-image's Gaussian-window SSIM, implemented once in
synermedgen_jax/ssim.py (the stage-0 VAE's SSIM loss uses the same function); PSNR and MAE are below.

Masks (body / foreground). ``mask`` is ``[N, H, W]`` (bool or 0/1); nonzero marks pixels that count.
SSIM with a mask is the mean of the SSIM map over the mask pixels inside its 5-pixel crop; PSNR and MAE
with a mask use the mask pixels only. An image with no counted pixel yields NaN (0 / 0) rather than an
error, because values are unknown at trace time.

All computation is float32 (inputs of other dtypes are cast); float64 is not supported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from synermedgen_jax.ssim import WIN_SIZE, check_data_range, check_images, ssim

__all__ = ["WIN_SIZE", "ssim", "psnr", "mae"]


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
    x, y, m = check_images(pred, target, mask)
    dr = check_data_range(data_range)
    mse = _masked_mean(jnp.square(x - y), m)
    return 10.0 * jnp.log10(dr * dr / mse)


def mae(pred, target, *, mask=None) -> jax.Array:
    """Mean absolute error per image, in the units of the inputs (de-normalise first, e.g. to HU).

    Shapes: ``pred``, ``target``, ``mask`` ``[N, H, W]`` -> ``[N]``.
    """
    x, y, m = check_images(pred, target, mask)
    return _masked_mean(jnp.abs(x - y), m)
