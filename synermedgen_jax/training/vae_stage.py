"""Stage 0: train the small FLUX-family autoencoder on the embedded data (no FLUX weights downloadable here).

Loss per image: ``l1·|x̂ − x| + l2·(x̂ − x)²`` averaged over pixels, plus ``kl·KL(q(z|x) ‖ N(0, I))`` summed
over latent elements and averaged over images (the usual VAE recipe at a small KL weight, which keeps the
latent close to Gaussian so flow matching's N(0, I) prior fits it). The model holds only ``vae`` so its
parameter names are those of the full model (``vae.encoder...``) and Stages I/II load them by name.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from synermedgen_jax.modeling.synermedgen import freeze_config
from synermedgen_jax.modeling.vae import AutoEncoder


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

    def prepare(self, model, batch, key):
        images = batch["image"]
        f = model.vae.downsample
        shape = (images.shape[0], images.shape[1] // f, images.shape[2] // f, model.config.vae.z_channels)
        return {"eps": jax.random.normal(key, shape, jnp.float32)}

    def totals(self, batch):
        return {"images": jnp.asarray(batch["image"].shape[0], jnp.float32)}

    def loss(self, model, micro, totals):
        images = micro["image"]
        mean, logvar = model.vae.posterior(images)
        z = mean + jnp.exp(0.5 * logvar) * micro["eps"]
        recon = model.vae.decoder(z)
        err = recon.astype(jnp.float32) - images
        l1 = jnp.sum(jnp.mean(jnp.abs(err), axis=(1, 2, 3)))
        l2 = jnp.sum(jnp.mean(jnp.square(err), axis=(1, 2, 3)))
        kl = jnp.sum(0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar))
        sums = {"l1": l1, "l2": l2, "kl": kl}
        loss = (self.l1_weight * l1 + self.l2_weight * l2 + self.kl_weight * kl) / totals["images"]
        return loss, sums

    def metrics(self, sums, totals):
        n = totals["images"]
        out = {key: value / n for key, value in sums.items()}
        out["loss"] = self.l1_weight * out["l1"] + self.l2_weight * out["l2"] + self.kl_weight * out["kl"]
        out["psnr"] = 10.0 * jnp.log10(4.0 / jnp.maximum(out["l2"], 1e-12))  # data range 2 ([-1, 1])
        return out


def reconstruct(model: VaeOnly, images: jax.Array) -> jax.Array:
    """Posterior-mean reconstructions ``[N, H, W, C]`` (for image grids)."""
    mean, _ = model.vae.posterior(images)
    return model.vae.decoder(mean)
