"""Stage 0: train the small FLUX-family autoencoder on the embedded data (no FLUX weights downloadable here).

Loss per image: ``l1·|x̂ − x| + l2·(x̂ − x)²`` averaged over pixels, plus ``kl·KL(q(z|x) ‖ N(0, I))`` summed
over latent elements and averaged over images (the usual VAE recipe at a small KL weight, which keeps the
latent close to Gaussian so flow matching's N(0, I) prior fits it). The model holds only ``vae`` so its
parameter names are those of the full model (``vae.encoder...``) and Stages I/II load them by name.

With ``train.fit_latent_scale`` the run ends by measuring its latents on training images and writing
``WORKDIR/latent_scale.json`` (``shift_factor`` = their mean, ``scale_factor`` = 1 / their std), the way
FLUX's and Stable Diffusion's constants were chosen: flow matching mixes latents with N(0, I) noise and
assumes unit-scale data. Runs that load this VAE (``vae_from``) adopt the two numbers (:func:`adopt_latent_scale`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from synermedgen_jax.modeling.synermedgen import freeze_config
from synermedgen_jax.modeling.vae import AutoEncoder
from synermedgen_jax.ssim import ssim
from synermedgen_jax.staging import write_atomic


class VaeOnly(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        self.config = freeze_config(config)
        self.vae = AutoEncoder(self.config, rngs=rngs)


def build_vae_model(model_config, seed: int = 0) -> VaeOnly:
    return VaeOnly(model_config, rngs=nnx.Rngs(params=seed))


@dataclasses.dataclass(frozen=True)
class VaeObjective:
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kl_weight: float = 1e-6
    sample_posterior: bool = True  # False: decode the posterior mean (a deterministic autoencoder + KL term)
    ssim_weight: float = 0.0  # weight of (1 − SSIM) per image (synermedgen_jax/ssim.py, data range 2)

    def prepare(self, model, batch, key):
        images = batch["image"]
        f = model.vae.downsample
        shape = (images.shape[0], images.shape[1] // f, images.shape[2] // f, model.config.vae.z_channels)
        return {**batch, "eps": jax.random.normal(key, shape, jnp.float32)}

    def totals(self, batch):
        return {"images": jnp.asarray(batch["image"].shape[0], jnp.float32)}

    def loss(self, model, micro, totals):
        images = micro["image"]
        mean, logvar = model.vae.posterior(images)
        z = mean + jnp.exp(0.5 * logvar) * micro["eps"] if self.sample_posterior else mean
        recon = model.vae.decoder(z)
        err = recon.astype(jnp.float32) - images
        l1 = jnp.sum(jnp.mean(jnp.abs(err), axis=(1, 2, 3)))
        l2 = jnp.sum(jnp.mean(jnp.square(err), axis=(1, 2, 3)))
        kl = jnp.sum(0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar))
        sums = {"l1": l1, "l2": l2, "kl": kl}
        if self.ssim_weight:  # only when it is trained on: SSIM filters every image (and needs >= 11 pixels)
            sums["ssim"] = jnp.sum(image_ssim(recon.astype(jnp.float32), images))
        loss = self._weighted(sums, totals["images"]) / totals["images"]
        return loss, sums

    def _weighted(self, sums: dict, images) -> jax.Array:
        loss = self.l1_weight * sums["l1"] + self.l2_weight * sums["l2"] + self.kl_weight * sums["kl"]
        return loss + self.ssim_weight * (images - sums["ssim"]) if "ssim" in sums else loss

    def metrics(self, sums, totals):
        n = totals["images"]
        out = {key: value / n for key, value in sums.items()}
        out["loss"] = self._weighted(sums, n) / n
        out["psnr"] = 10.0 * jnp.log10(4.0 / jnp.maximum(out["l2"], 1e-12))  # data range 2 ([-1, 1])
        return out


def image_ssim(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``[N]`` SSIM of ``[N, H, W, C]`` images in [-1, 1] (channels averaged): synermedgen_jax/ssim.py, the
    function evaluation scores slices with."""
    n, height, width, channels = pred.shape
    flat = lambda x: jnp.moveaxis(x, -1, 1).reshape(n * channels, height, width)
    return ssim(flat(pred), flat(target), data_range=2.0).reshape(n, channels).mean(axis=1)


def reconstruct(model: VaeOnly, images: jax.Array) -> jax.Array:
    """Posterior-mean reconstructions ``[N, H, W, C]`` (for image grids)."""
    mean, _ = model.vae.posterior(images)
    return model.vae.decoder(mean)


LATENT_SCALE_FILE = "latent_scale.json"


def fit_latent_scale(model: VaeOnly, images: np.ndarray, chunk: int = 32) -> dict[str, float]:
    """``{"scale_factor", "shift_factor", "images"}`` from the posterior means of ``images [N, H, W, C]``:
    after ``scale · (z − shift)`` the latents have mean 0 and std 1 (one scalar each, as FLUX's constants)."""
    encode = jax.jit(lambda x: model.vae.posterior(x)[0])
    means = np.concatenate([np.asarray(encode(jnp.asarray(images[i:i + chunk]))) for i in range(0, len(images), chunk)])
    means = means.astype(np.float64)
    std = float(means.std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"fit_latent_scale: latent std is {std}; the autoencoder's latents are degenerate")
    return {"scale_factor": 1.0 / std, "shift_factor": float(means.mean()), "images": int(len(images))}


def write_latent_scale_file(workdir: Path, stats: dict[str, float]) -> Path:
    """``workdir/latent_scale.json``, written atomically."""
    path = Path(workdir) / LATENT_SCALE_FILE
    write_atomic(path, json.dumps(stats, indent=1) + "\n")
    return path


def adopt_latent_scale(config) -> dict[str, float] | None:
    """Sets ``config.model.vae.scale_factor/shift_factor`` to those of the VAE weights the run starts from:
    ``vae_from``'s latent_scale.json when it has one, else (no ``vae_from``) the saved config of ``init_from``,
    whose VAE weights the run copies. Returns the values, or None when the config's constants stay."""
    from synermedgen_jax.training.checkpoint import read_model_config

    if not config.vae_from:
        if not config.init_from:
            return None
        saved = read_model_config(str(config.init_from)).vae
        scale, shift = float(saved.scale_factor), float(saved.shift_factor)
    else:
        # The file sits in the workdir; no step has to be read (or verified) for it.
        vae_from = Path(str(config.vae_from))
        workdir = vae_from.parent if vae_from.name.isdigit() else vae_from
        path = Path(workdir) / LATENT_SCALE_FILE
        if not path.exists():
            return None
        try:
            stats = json.loads(path.read_text())
            scale, shift = float(stats["scale_factor"]), float(stats["shift_factor"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: expected JSON with numbers scale_factor and shift_factor ({err})") from None
        if not (np.isfinite(scale) and np.isfinite(shift) and scale > 0):
            raise ValueError(f"{path}: scale_factor must be a positive finite number and shift_factor finite, "
                             f"got {scale}, {shift}")
    config.model.vae.scale_factor, config.model.vae.shift_factor = scale, shift
    return {"scale_factor": scale, "shift_factor": shift}
