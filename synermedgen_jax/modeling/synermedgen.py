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

from synermedgen_jax.axes import BATCH_LENGTH_EMBED
from synermedgen_jax.data.packing import Pack
from synermedgen_jax.kernels.partition import over_rows
from synermedgen_jax.modeling import generation
from synermedgen_jax.modeling.generation import TimestepEmbedder, patchify_latents
from synermedgen_jax.modeling.layers import Linear, active_mesh, constrain
from synermedgen_jax.modeling.llm import MoTLanguageModel
from synermedgen_jax.modeling.vae import AutoEncoder
from synermedgen_jax.modeling.vit import Connector, SiglipVisionModel, position_table


def freeze_config(config) -> ml_collections.FrozenConfigDict:
    """Models keep a hashable frozen copy of their config (it becomes part of the static graph)."""
    return config if isinstance(config, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(config)


def encode_real_slots(vae: AutoEncoder, images: jax.Array, real: jax.Array, keys: jax.Array | None,
                      chunk: int) -> jax.Array:
    """Scaled latents ``[b, S, h, w, z]`` of ``images [b, S, H, W, C]``, encoding only the ``real [b, S]`` slots.

    The slots are ordered real-first (a stable sort, so each image keeps its key) and encoded ``chunk`` at a
    time; a chunk without a real slot is skipped by ``lax.cond`` (real control flow on one device's data), and
    its latents stay zero. ``keys [b, S, ...]``: one PRNG key per slot (None: the posterior mean); a chunk draws
    its noise from its first slot's key.
    """
    count = images.shape[0] * images.shape[1]
    flat = images.reshape(count, *images.shape[2:])
    order = jnp.argsort(jnp.logical_not(real.reshape(count)), stable=True)
    chunk = min(chunk or count, count)
    groups = -(-count // chunk)
    pad = groups * chunk - count
    ordered = jnp.pad(flat[order], ((0, pad),) + ((0, 0),) * (flat.ndim - 1))
    ordered = ordered.reshape(groups, chunk, *flat.shape[1:])
    any_real = jnp.pad(real.reshape(count)[order], (0, pad)).reshape(groups, chunk).any(axis=1)
    if keys is None:
        group_keys = jnp.zeros((groups,), jnp.uint32)
    else:
        group_keys = keys.reshape(count, *keys.shape[2:])[order][jnp.arange(groups) * chunk]
    latent = jax.eval_shape(lambda x: vae.encode(x, sample=False), ordered[0])

    def encode(args):
        group, has_real, group_key = args
        return jax.lax.cond(has_real,
                            lambda: vae.encode(group, None if keys is None else group_key).astype(latent.dtype),
                            lambda: jnp.zeros(latent.shape, latent.dtype))

    encoded = jax.lax.map(encode, (ordered, any_real, group_keys)).reshape(groups * chunk, *latent.shape[1:])
    out = jnp.zeros((count, *latent.shape[1:]), latent.dtype).at[order].set(encoded[:count])
    out = jnp.where(real.reshape(count, *([1] * (out.ndim - 1))), out, 0)  # an empty slot beside real ones
    return out.reshape(*images.shape[:2], *latent.shape[1:])


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
    def latent_tokens(self, vae_images: jax.Array, key: jax.Array | None, real: jax.Array | None = None
                      ) -> jax.Array:
        """Clean latent tokens of the image slots, ``vae_images [B, S, H, W, C]`` → ``[B, S·L, p·p·z]``.

        ``real [B, S]`` bool marks the slots that hold an image (None: all of them). The frozen encoder runs on
        those only: each device orders its own rows' slots real-first and encodes ``vae.encode_chunk`` of them at
        a time (``lax.map``; the full-resolution activations never exist for a whole pack at once), skipping a
        chunk with no real slot (``lax.cond``); empty slots get zero tokens, which no real token reads. On a mesh
        this runs under ``shard_map`` over the batch axes (kernels/partition.py), so one device's empty slots are
        skipped whatever the others hold. No gradient flows into the VAE from here.
        """
        batch, slots = vae_images.shape[:2]
        if real is None:
            real = jnp.ones((batch, slots), bool)
        sample = key is not None
        keys = (jax.random.split(key, batch * slots) if sample else jnp.zeros((batch * slots, 2), jnp.uint32))
        keys = keys.reshape(batch, slots, *keys.shape[1:])
        chunk = int(self.config.vae.get("encode_chunk", 0) or 0)
        graph, state = nnx.split(self.vae)

        def encode_rows(images, real_slots, slot_keys, vae_state):
            return (encode_real_slots(nnx.merge(graph, vae_state), images, real_slots,
                                      slot_keys if sample else None, chunk),)

        mesh = active_mesh()
        if mesh is None:
            (latents,) = encode_rows(vae_images, real, keys, state)
        else:
            (latents,) = over_rows(encode_rows, mesh, batch, 3, 1, "frozen VAE encoder")(vae_images, real, keys, state)
        latents = jax.lax.stop_gradient(latents.reshape(batch * slots, *latents.shape[2:]))
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
