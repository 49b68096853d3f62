"""SigLIP NaViT vision encoder (BAGEL's ``siglip_navit``) and the ViT → LLM connector.

Variable-resolution images are packed: ``[B, P, p·p·C]`` patches with a per-patch image id and a position id
``row * max_side + col`` into a learned table of ``max_side²`` rows. Attention is bidirectional inside an image
and never across images (the packed attention kernel with image id as sample id and one ``full`` split).
The patch embedding is a Linear over the (kh, kw, c)-ordered patch, equal to SigLIP's Conv2d.
BAGEL keeps ``config_num_layers - 1`` layers and applies ``post_layernorm``; ``vit.num_layers`` is that count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from synermedgen_jax import axes
from synermedgen_jax.kernels.attention import FULL, packed_attention
from synermedgen_jax.modeling.layers import (
    FrozenTable,
    Init,
    LayerNorm,
    Linear,
    active_mesh,
    gelu_tanh,
    make_param,
    sincos_2d_table,
)


class SiglipAttention(nnx.Module):
    def __init__(self, vit, *, rngs: nnx.Rngs, compute_dtype, attention_impl: str):
        hidden = vit.hidden_size
        kw = dict(rngs=rngs, compute_dtype=compute_dtype)
        self.q_proj = Linear(hidden, hidden, axes=(axes.VIT_EMBED, axes.VIT_HEADS), **kw)
        self.k_proj = Linear(hidden, hidden, axes=(axes.VIT_EMBED, axes.VIT_HEADS), **kw)
        self.v_proj = Linear(hidden, hidden, axes=(axes.VIT_EMBED, axes.VIT_HEADS), **kw)
        self.out_proj = Linear(hidden, hidden, axes=(axes.VIT_HEADS, axes.VIT_EMBED), **kw)
        self.num_heads = vit.num_heads
        self.attention_impl = attention_impl

    def __call__(self, x: jax.Array, image_id: jax.Array) -> jax.Array:
        """``x [B, P, E]``, ``image_id [B, P]`` (−1 = padding) → ``[B, P, E]``."""
        batch, length, hidden = x.shape
        shape = (batch, length, self.num_heads, hidden // self.num_heads)
        q, k, v = (proj(x).reshape(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        zeros = jnp.zeros_like(image_id)
        out = packed_attention(q, k, v, image_id, zeros, zeros + FULL, impl=self.attention_impl, mesh=active_mesh())
        return self.out_proj(out.reshape(batch, length, hidden))


class SiglipMLP(nnx.Module):
    def __init__(self, vit, *, rngs: nnx.Rngs, compute_dtype):
        kw = dict(rngs=rngs, compute_dtype=compute_dtype)
        self.fc1 = Linear(vit.hidden_size, vit.intermediate_size, axes=(axes.VIT_EMBED, axes.VIT_MLP), **kw)
        self.fc2 = Linear(vit.intermediate_size, vit.hidden_size, axes=(axes.VIT_MLP, axes.VIT_EMBED), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, vit, *, rngs: nnx.Rngs, compute_dtype, attention_impl: str):
        self.layer_norm1 = LayerNorm(vit.hidden_size, eps=vit.layer_norm_eps)
        self.self_attn = SiglipAttention(vit, rngs=rngs, compute_dtype=compute_dtype, attention_impl=attention_impl)
        self.layer_norm2 = LayerNorm(vit.hidden_size, eps=vit.layer_norm_eps)
        self.mlp = SiglipMLP(vit, rngs=rngs, compute_dtype=compute_dtype)

    def __call__(self, x: jax.Array, image_id: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), image_id).astype(x.dtype)
        return x + self.mlp(self.layer_norm2(x)).astype(x.dtype)


class SiglipEmbeddings(nnx.Module):
    def __init__(self, vit, *, rngs: nnx.Rngs, compute_dtype):
        patch_dim = vit.patch_size**2 * vit.num_channels
        self.patch_embedding = Linear(patch_dim, vit.hidden_size, axes=(None, axes.VIT_EMBED), rngs=rngs,
                                      compute_dtype=compute_dtype)
        # SigLIP's initialisation (std 1/√width, as transformers' SiglipPreTrainedModel draws it), not
        # nn.Embedding's N(0, 1): at unit scale the position signal swamps the patch embedding (std ≈ 0.4 for
        # [-1, 1] pixels) and a ViT trained from scratch sees nearly the same tokens for every image.
        self.position_embedding = make_param(rngs, (vit.max_num_patch_per_side**2, vit.hidden_size),
                                             (None, axes.VIT_EMBED), Init("normal", vit.hidden_size**-0.5))

    def __call__(self, patches: jax.Array, position_ids: jax.Array) -> jax.Array:
        table = self.position_embedding.value
        return self.patch_embedding(patches) + jnp.take(table, position_ids, axis=0).astype(patches.dtype)


class SiglipVisionModel(nnx.Module):
    """``embeddings`` → ``encoder.layers`` → ``post_layernorm`` (the ``vision_model`` of BAGEL's checkpoint)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        vit = config.vit
        compute_dtype = jnp.dtype(config.compute_dtype)
        self.embeddings = SiglipEmbeddings(vit, rngs=rngs, compute_dtype=compute_dtype)
        self.layers = nnx.List([
            SiglipEncoderLayer(vit, rngs=rngs, compute_dtype=compute_dtype, attention_impl=config.attention_impl)
            for _ in range(vit.num_layers)
        ])
        self.post_layernorm = LayerNorm(vit.hidden_size, eps=vit.layer_norm_eps)
        self.compute_dtype = compute_dtype

    def __call__(self, patches: jax.Array, position_ids: jax.Array, image_id: jax.Array) -> jax.Array:
        """``patches [B, P, p·p·C]``, ``position_ids/image_id [B, P]`` → ``[B, P, E_vit]``."""
        x = self.embeddings(patches.astype(self.compute_dtype), position_ids)
        for layer in self.layers:
            x = layer(x, image_id)
        return self.post_layernorm(x)


class Connector(nnx.Module):
    """``fc2(gelu_tanh(fc1(x)))``: ViT width → LLM width (BAGEL's ``MLPconnector``)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        vit_dim, llm_dim = config.vit.hidden_size, config.llm.hidden_size
        compute_dtype = jnp.dtype(config.compute_dtype)
        self.fc1 = Linear(vit_dim, llm_dim, axes=(axes.VIT_EMBED, axes.EMBED), rngs=rngs, compute_dtype=compute_dtype)
        self.fc2 = Linear(llm_dim, llm_dim, axes=(axes.EMBED, axes.EMBED_OUT), rngs=rngs, compute_dtype=compute_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_tanh(self.fc1(x)))


def position_table(side: int, dim: int, base: float = 10000.0, step: float = 1.0) -> FrozenTable:
    """A frozen 2-D sin-cos table ``[side², dim]`` (BAGEL's ``vit_pos_embed`` / ``latent_pos_embed``)."""
    return FrozenTable(jnp.asarray(sincos_2d_table(dim, side, base, step)), logical_axes=(None, axes.EMBED))
