"""The unified SynerMedGen / BAGEL model: ViT + connector, MoT language model, generation head, VAE.

A forward pass takes one batch of packs (``data/packing.Pack``) with the input of every generation token
(``x_t`` and its time ``t``: already noised; clean conditioning latents have ``t = 0``) and returns next-token
logits at the CE positions and velocity predictions at every generation token. The loss (timesteps, noise,
noising, target, reduction) is training/objective.py's; the sampler runs this same forward (uncached) or its
layers with a KV cache. Attribute names mirror BAGEL's checkpoint prefixes (``language_model``, ``vit_model``,
``connector``, ``vit_pos_embed``, ``vae2llm``, ``llm2vae``, ``time_embedder``, ``latent_pos_embed``) and
``vae`` holds the FLUX autoencoder (BAGEL's separate ``ae.safetensors``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from synermedgen_jax.data.packing import Pack
from synermedgen_jax.modeling import generation
from synermedgen_jax.modeling.generation import TimestepEmbedder, patchify_latents
from synermedgen_jax.modeling.layers import BATCH_LENGTH_EMBED, Linear, constrain
from synermedgen_jax.modeling.llm import MoTLanguageModel
from synermedgen_jax.modeling.vae import AutoEncoder
from synermedgen_jax.modeling.vit import Connector, SiglipVisionModel, position_table


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

    def embed_understanding(self, pack: Pack) -> jax.Array:
        """Text embeddings with the ViT tokens scattered in: ``[B, Tu, E]``."""
        x = self.language_model.embed(pack.token_ids)
        if pack.vit_patches.shape[1] == 0:
            return x
        features = self.vit_model(pack.vit_patches, pack.vit_pos_id, pack.vit_image_id)
        vit_embeds = self.connector(features)
        vit_embeds = vit_embeds + jnp.take(self.vit_pos_embed.value, pack.vit_pos_id, axis=0)
        rows = jnp.arange(x.shape[0])[:, None]
        # Padding patches point one past the region and are dropped.
        return x.at[rows, pack.vit_dest].set(vit_embeds.astype(x.dtype), mode="drop")

    def embed_generation(self, noised_tokens: jax.Array, t: jax.Array, latent_pos_id: jax.Array) -> jax.Array:
        """``vae2llm(x_t) + time_embedder(t) + latent_pos_embed[pos]``: ``[B, Tg, E]``."""
        pos = jnp.take(self.latent_pos_embed.value, latent_pos_id, axis=0)
        return self.vae2llm(noised_tokens) + self.time_embedder(t) + pos.astype(self.vae2llm.compute_dtype)

    def __call__(self, pack: Pack, noised: jax.Array, t: jax.Array, *, x_und: jax.Array | None = None) -> dict:
        """One packed forward.

        Args:
          pack: a batch of packs (leading ``[B]`` axis).
          noised: ``[B, Tg, p·p·z]`` the input latent token of every generation token: ``x_t`` of a noised
            image, the clean latent of a conditioning one (training/objective.flow_matching_inputs builds it).
          t: ``[B, Tg]`` float32 time of every generation token (0 for clean latents).
          x_und: ``[B, Tu, E]`` :meth:`embed_understanding` of ``pack`` when the caller already has it (the
            uncached sampler embeds its context once for all steps).
        Returns:
          ``logits [B, C, V]`` at the CE positions (float32), ``velocity [B, Tg, p·p·z]`` (float32) and the
          final ``hidden [B, Tu+Tg, E]``.
        """
        und_tokens = pack.und_tokens
        x_und = constrain(self.embed_understanding(pack) if x_und is None else x_und, BATCH_LENGTH_EMBED)
        x_gen = constrain(self.embed_generation(noised, t, pack.latent_pos_id), BATCH_LENGTH_EMBED)
        x = jnp.concatenate([x_und, x_gen.astype(x_und.dtype)], axis=1)
        hidden = constrain(self.language_model(x, und_tokens, pack.meta()), BATCH_LENGTH_EMBED)
        ce_hidden = constrain(jnp.take_along_axis(hidden[:, :und_tokens], pack.ce_index[..., None], axis=1),
                              BATCH_LENGTH_EMBED)
        return {
            "logits": self.language_model.logits(ce_hidden),
            "velocity": self.llm2vae(hidden[:, und_tokens:]).astype(jnp.float32),
            "hidden": hidden,
        }


def build_model(config, seed: int = 0) -> SynerMedGen:
    """A randomly initialised model (``config`` is a model ConfigDict, e.g. configs/models.py:tiny)."""
    return SynerMedGen(config, rngs=nnx.Rngs(params=seed))


def expert_twin_names(model: SynerMedGen) -> dict[str, str]:
    """``{generation-expert variable: its understanding twin}`` by dotted nnx path (the train state's names),
    from the decoder's declared module pairs (``MoTLanguageModel.expert_pairs``); ``model`` may be abstract."""
    where = {id(node): path for path, node in nnx.iter_graph(model)}
    name = lambda path: ".".join(str(part) for part in path)  # noqa: E731
    twins = {}
    for und, gen in model.language_model.expert_pairs():
        und_leaves, gen_leaves = nnx.to_flat_state(nnx.state(und)), nnx.to_flat_state(nnx.state(gen))
        for (und_path, _), (gen_path, _) in zip(und_leaves, gen_leaves, strict=True):
            if und_path != gen_path:
                raise ValueError(f"expert twins differ in structure: {und_path} vs {gen_path}")
            twins[name(where[id(gen)] + gen_path)] = name(where[id(und)] + und_path)
    return twins


def count_params(model: nnx.Module) -> dict[str, int]:
    """Trainable parameter counts per top-level part (frozen sin-cos tables excluded)."""
    counts: dict[str, int] = {}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        counts[str(path[0])] = counts.get(str(path[0]), 0) + int(value.value.size)
    counts["total"] = sum(counts.values())
    return counts
