"""The unified SynerMedGen / BAGEL model: ViT + connector, MoT language model, generation head, VAE.

A forward pass takes one packed batch (data/packing.py) plus the clean VAE latents of its image slots and
the flow-matching noise, and returns next-token logits at the CE positions and velocity predictions at every
generation token. Attribute names mirror BAGEL's checkpoint prefixes (``language_model``, ``vit_model``,
``connector``, ``vit_pos_embed``, ``vae2llm``, ``llm2vae``, ``time_embedder``, ``latent_pos_embed``) and
``vae`` holds the FLUX autoencoder (BAGEL's separate ``ae.safetensors``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from synermedgen_jax.kernels import flow_matching
from synermedgen_jax.modeling import generation
from synermedgen_jax.modeling.generation import TimestepEmbedder, patchify_latents
from synermedgen_jax.modeling.layers import BATCH_LENGTH_EMBED, Linear, active_mesh, constrain
from synermedgen_jax.modeling.llm import MoTLanguageModel
from synermedgen_jax.modeling.vae import AutoEncoder
from synermedgen_jax.modeling.vit import Connector, SiglipVisionModel, position_table

META_KEYS = ("sample_id", "split_id", "split_kind", "rope_id")


def freeze_config(config) -> ml_collections.FrozenConfigDict:
    """Models keep a hashable frozen copy of their config (it becomes part of the static graph)."""
    return config if isinstance(config, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(config)


class SynerMedGen(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        config = freeze_config(config)
        self.config = config
        hidden = config.llm.hidden_size
        compute_dtype = jnp.dtype(config.compute_dtype)
        token_dim = config.latent_patch_size**2 * config.vae.z_channels
        self.language_model = MoTLanguageModel(config, rngs=rngs)
        self.vit_model = SiglipVisionModel(config, rngs=rngs)
        self.connector = Connector(config, rngs=rngs)
        self.vit_pos_embed = position_table(config.vit.max_num_patch_per_side, hidden)
        # The generation head's weights are small and touch every generation token: they stay replicated, so
        # their gradients are partial sums reduced over devices instead of an all-gather of the batch's tokens.
        self.vae2llm = Linear(token_dim, hidden, axes=(None, None), rngs=rngs, compute_dtype=compute_dtype)
        self.llm2vae = Linear(hidden, token_dim, axes=(None, None), rngs=rngs, compute_dtype=compute_dtype,
                              zero_init=True)
        self.time_embedder = TimestepEmbedder(hidden, rngs=rngs, compute_dtype=compute_dtype)
        self.latent_pos_embed = position_table(config.max_latent_size, hidden,
                                               *generation.latent_pos_frequencies(config))
        self.vae = AutoEncoder(config, rngs=rngs)

    # ------------------------------------------------------------------------------------------------------
    def latent_tokens(self, vae_images: jax.Array, key: jax.Array | None) -> jax.Array:
        """Clean latent tokens of every image slot, ``vae_images [B, S, H, W, C]`` → ``[B, S·L, p·p·z]``.

        The VAE is frozen: no gradient flows into it from here. Images are encoded ``vae.encode_chunk`` at a
        time (``lax.map``), so the encoder's full-resolution activations never exist for a whole pack at once.
        """
        batch, slots = vae_images.shape[:2]
        chunk = int(self.config.vae.get("encode_chunk", 0) or 0)
        if chunk and slots > chunk:
            # Map over groups of slots, keeping the batch axis (sharded over devices) inside every group.
            pad = (-slots) % chunk
            padded = jnp.pad(vae_images, ((0, 0), (0, pad)) + ((0, 0),) * (vae_images.ndim - 2))
            groups = jnp.moveaxis(padded.reshape(batch, -1, chunk, *vae_images.shape[2:]), 1, 0)  # [G, B, c, ...]
            keys = (jax.random.split(key, groups.shape[0]) if key is not None
                    else jnp.zeros((groups.shape[0],), jnp.uint32))

            def encode(args):
                images, group_key = args
                flat = images.reshape(batch * chunk, *images.shape[2:])
                latents = self.vae.encode(flat, group_key if key is not None else None)
                return latents.reshape(batch, chunk, *latents.shape[1:])

            latents = jnp.moveaxis(jax.lax.map(encode, (groups, keys)), 0, 1)  # [B, G, c, h, w, z]
            latents = latents.reshape(batch, -1, *latents.shape[3:])[:, :slots]
            latents = latents.reshape(batch * slots, *latents.shape[2:])
        else:
            latents = self.vae.encode(vae_images.reshape(batch * slots, *vae_images.shape[2:]), key)
        latents = jax.lax.stop_gradient(latents)
        tokens = patchify_latents(latents, self.config.latent_patch_size)
        return tokens.reshape(batch, slots * tokens.shape[1], tokens.shape[2])

    def embed_understanding(self, batch: dict) -> jax.Array:
        """Text embeddings with the ViT tokens scattered in: ``[B, Tu, E]``."""
        x = self.language_model.embed(batch["token_ids"])
        if batch["vit_patches"].shape[1] == 0:
            return x
        features = self.vit_model(batch["vit_patches"], batch["vit_pos_id"], batch["vit_image_id"])
        vit_embeds = self.connector(features)
        vit_embeds = vit_embeds + jnp.take(self.vit_pos_embed.value, batch["vit_pos_id"], axis=0)
        rows = jnp.arange(x.shape[0])[:, None]
        # Padding patches point one past the region and are dropped.
        return x.at[rows, batch["vit_dest"]].set(vit_embeds.astype(x.dtype), mode="drop")

    def embed_generation(self, noised_tokens: jax.Array, t: jax.Array, latent_pos_id: jax.Array) -> jax.Array:
        """``vae2llm(x_t) + time_embedder(t) + latent_pos_embed[pos]``: ``[B, Tg, E]``."""
        pos = jnp.take(self.latent_pos_embed.value, latent_pos_id, axis=0)
        return self.vae2llm(noised_tokens) + self.time_embedder(t) + pos.astype(self.vae2llm.compute_dtype)

    def __call__(self, batch: dict, clean_latents: jax.Array, noise: jax.Array) -> dict:
        """One packed forward.

        Args:
          batch: pack arrays (see packing.PackBuilder.build) with a leading ``[B]`` axis.
          clean_latents: ``[B, S·L, p·p·z]`` from :meth:`latent_tokens`.
          noise: ``[B, Tg, p·p·z]`` standard normal, one row per generation token.
        Returns:
          ``logits [B, C, V]`` at the CE positions (float32), ``velocity [B, Tg, p·p·z]``, the flow-matching
          pair ``clean`` (x0) and ``noise`` (ε) of every generation token (the target is ε − x0), ``hidden``.
        """
        und_tokens = batch["token_ids"].shape[1]
        x_und = constrain(self.embed_understanding(batch), BATCH_LENGTH_EMBED)
        index = batch["latent_index"][..., None]
        # Row-local gathers: pinning their operands and results to the batch split keeps XLA from gathering
        # the whole global batch onto every device.
        clean_latents = constrain(clean_latents, BATCH_LENGTH_EMBED)
        clean = constrain(jnp.take_along_axis(clean_latents, index, axis=1), BATCH_LENGTH_EMBED)
        t = generation.timesteps_from_logits(batch["timestep_logit"], self.config.timestep_shift)
        token_dim = clean.shape[-1]
        noised = flow_matching.noised_latents(clean.reshape(-1, token_dim), noise.reshape(-1, token_dim).astype(
            clean.dtype), t.reshape(-1), impl=self.config.flow_matching_impl, mesh=active_mesh()).reshape(clean.shape)
        x_gen = constrain(self.embed_generation(noised, t, batch["latent_pos_id"]), BATCH_LENGTH_EMBED)
        x = jnp.concatenate([x_und, x_gen.astype(x_und.dtype)], axis=1)
        meta = {key: batch[key] for key in META_KEYS}
        hidden = constrain(self.language_model(x, und_tokens, meta), BATCH_LENGTH_EMBED)
        ce_hidden = constrain(jnp.take_along_axis(hidden[:, :und_tokens], batch["ce_index"][..., None], axis=1),
                              BATCH_LENGTH_EMBED)
        return {
            "logits": self.language_model.logits(ce_hidden),
            "velocity": self.llm2vae(hidden[:, und_tokens:]).astype(jnp.float32),
            "clean": clean.astype(jnp.float32),
            "noise": noise.astype(jnp.float32),
            "hidden": hidden,
        }


def compute_losses(outputs: dict, batch: dict, *, ce_weight: float = 1.0, mse_weight: float = 1.0,
                   flow_impl: str = "reference") -> dict:
    """BAGEL's losses: CE summed over labelled tokens / their global count; MSE averaged over the latent
    dims, summed over noised tokens / their global count; ``loss = ce_weight·CE + mse_weight·MSE``.

    Under ``jit`` over a sharded batch the sums are global, so the counts are the global token counts.
    ``flow_impl`` picks the velocity-MSE implementation (kernels/flow_matching.py: the fused kernel never
    materialises the target ε − x0).
    """
    ce_mask = batch["ce_mask"].astype(jnp.float32)
    token_ce = optax.softmax_cross_entropy_with_integer_labels(outputs["logits"], batch["ce_label"])
    ce_count = jnp.sum(ce_mask)
    ce = jnp.sum(token_ce * ce_mask) / jnp.maximum(ce_count, 1.0)
    mse_mask = batch["mse_mask"].astype(jnp.float32)
    token_dim = outputs["velocity"].shape[-1]
    rows = lambda x: x.reshape(-1, token_dim)
    mse_sum = flow_matching.velocity_mse_sum(rows(outputs["velocity"]), rows(outputs["clean"]),
                                             rows(outputs["noise"]), mse_mask.reshape(-1), impl=flow_impl,
                                             mesh=active_mesh())
    mse_count = jnp.sum(mse_mask)
    mse = mse_sum / jnp.maximum(mse_count, 1.0)
    correct = (jnp.argmax(outputs["logits"], axis=-1) == batch["ce_label"]).astype(jnp.float32)
    return {
        "loss": ce_weight * ce + mse_weight * mse,
        "ce": ce,
        "mse": mse,
        "ce_tokens": ce_count,
        "mse_tokens": mse_count,
        "token_accuracy": jnp.sum(correct * ce_mask) / jnp.maximum(ce_count, 1.0),
    }


def build_model(config, seed: int = 0) -> SynerMedGen:
    """A randomly initialised model (``config`` is a model ConfigDict, e.g. configs/models.py:tiny)."""
    return SynerMedGen(config, rngs=nnx.Rngs(params=seed))


def count_params(model: nnx.Module) -> dict[str, int]:
    """Trainable parameter counts per top-level part (frozen sin-cos tables excluded)."""
    counts: dict[str, int] = {}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        counts[str(path[0])] = counts.get(str(path[0]), 0) + int(value.value.size)
    counts["total"] = sum(counts.values())
    return counts
