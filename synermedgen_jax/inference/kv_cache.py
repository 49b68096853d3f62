"""KV-cached forwards of the MoT decoder: prefill a context once, then run only new tokens against it.

BAGEL's inference (``NaiveCache`` + ``forward_inference``) keeps, per layer, the post-RoPE keys and values of
every context token. Our cache is the same idea in static shapes:

* :func:`prefill` runs the context tokens (instruction text, ViT tokens, clean VAE latents — every split that
  is not a noised target) through all layers, with the visibility rule of kernels/attention.py, and keeps
  ``k, v [L, B, Tc, Hkv, D]`` plus each key's metadata (sample, split, kind, order).
* :func:`forward_cached` runs new query tokens (the noised target's split: its two marker tokens on the
  understanding expert and its latent tokens on the generation expert; or one decoded text token) through
  the same layers. A query sees the cached keys its own visibility rule allows — every earlier non-noise
  split of its own sample — plus the new tokens themselves (whole split for ``noise``/``full``, up to itself
  for ``causal``). Layers, projections, norms, MLPs and RoPE are the model's own submodules: nothing is
  re-implemented except the loop over layers, which ``modeling/llm.py`` runs for whole packs.

Since no query changes a cached key (a context token never sees a later split), the cached result equals
the full uncached forward exactly up to floating point (tests/test_sampler.py checks 1e-4 in float32).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from synermedgen_jax.kernels.attention import CAUSAL, NOISE, packed_attention
from synermedgen_jax.modeling.layers import active_mesh, apply_rope, rope_cos_sin


class Meta(NamedTuple):
    """Per-token metadata ``[B, T]`` int32. ``order``: position along the sequence (for the causal rule)."""

    sample_id: jax.Array
    split_id: jax.Array
    split_kind: jax.Array
    rope_id: jax.Array
    order: jax.Array

    def take(self, index: jax.Array) -> Meta:
        """Columns ``index [T']`` (static or traced) of every field."""
        return Meta(*(jnp.take(f, index, axis=1) for f in self))

    @staticmethod
    def concat(parts: list[Meta]) -> Meta:
        return Meta(*(jnp.concatenate(fields, axis=1) for fields in zip(*parts)))


class KVCache(NamedTuple):
    """Keys/values after RoPE, ``[L, B, Tc, Hkv, D]``, and the keys' metadata (rope ids unused)."""

    k: jax.Array
    v: jax.Array
    meta: Meta

    @property
    def length(self) -> int:
        return self.k.shape[2]


def visible(q: Meta, k: Meta) -> jax.Array:
    """BAGEL's split rule between query and key tokens: ``[B, Tq, Tk]`` bool.

    Same sample (not padding) and either the same split (causal: key order ≤ query order) or an earlier
    split that is not a noised target.
    """
    same_sample = (q.sample_id[:, :, None] == k.sample_id[:, None, :]) & (q.sample_id[:, :, None] >= 0)
    same_split = q.split_id[:, :, None] == k.split_id[:, None, :]
    causal_ok = (q.split_kind[:, :, None] != CAUSAL) | (k.order[:, None, :] <= q.order[:, :, None])
    earlier = (k.split_id[:, None, :] < q.split_id[:, :, None]) & (k.split_kind[:, None, :] != NOISE)
    return same_sample & ((same_split & causal_ok) | earlier)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """GQA attention of ``q [B, Tq, Hq, D]`` over ``k, v [B, Tk, Hkv, D]`` with ``mask [B, Tq, Tk]``.

    Same arithmetic as kernels.attention.reference_attention (float32 scores and softmax, rows that see
    nothing give zeros) but Tq ≠ Tk, which the packed kernel does not take.
    """
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", grouped, k, preferred_element_type=jnp.float32) * dim**-0.5
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, length, heads, dim).astype(q.dtype)


def _layer(layer, x: jax.Array, und: int, meta: Meta, rope, keys) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One MoT decoder layer on ``x [B, T, E]`` whose first ``und`` tokens take the understanding expert.

    ``keys``: None (prefill: attend within ``x`` with the packed kernel) or ``(k_cache, v_cache, k_meta)``
    to prepend to this layer's own keys. Returns ``(x_out, k, v)`` with this layer's new (post-RoPE) keys.
    """
    attn = layer.self_attn
    x_und, x_gen = x[:, :und], x[:, und:]
    parts = []
    if und:
        parts.append(attn._project(layer.input_layernorm(x_und), "", False))
    if x_gen.shape[1]:
        parts.append(attn._project(layer.input_layernorm_moe_gen(x_gen), "_moe_gen", False))
    q, k, v = (jnp.concatenate(t, axis=1) for t in zip(*parts))
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if keys is None:
        out = packed_attention(q, k, v, meta.sample_id, meta.split_id, meta.split_kind, impl=attn.attention_impl,
                               mesh=active_mesh())
    else:
        k_cache, v_cache, k_meta = keys
        mask = visible(meta, Meta.concat([k_meta, meta]))
        out = masked_attention(q, jnp.concatenate([k_cache, k], axis=1), jnp.concatenate([v_cache, v], axis=1),
                               mask)
    out = out.reshape(*out.shape[:2], attn.num_heads * attn.head_dim)
    outs = []
    if und:
        outs.append(attn.o_proj(out[:, :und]))
    if x_gen.shape[1]:
        outs.append(attn.o_proj_moe_gen(out[:, und:]))
    x = x + jnp.concatenate(outs, axis=1).astype(x.dtype)
    mlps = []
    if und:
        mlps.append(layer.mlp(layer.post_attention_layernorm(x[:, :und])))
    if x_gen.shape[1]:
        mlps.append(layer.mlp_moe_gen(layer.post_attention_layernorm_moe_gen(x[:, und:])))
    return x + jnp.concatenate(mlps, axis=1).astype(x.dtype), k, v


def final_norm(language_model, hidden: jax.Array, und: int) -> jax.Array:
    """Per-expert final RMSNorm: ``norm`` on the first ``und`` tokens, ``norm_moe_gen`` on the rest."""
    parts = []
    if und:
        parts.append(language_model.norm(hidden[:, :und]))
    if hidden.shape[1] > und:
        parts.append(language_model.norm_moe_gen(hidden[:, und:]))
    return jnp.concatenate(parts, axis=1)


def prefill(language_model, x: jax.Array, und: int, meta: Meta) -> tuple[jax.Array, KVCache]:
    """Context pass. ``x [B, Tc, E]`` embedded context (first ``und`` tokens understanding), ``meta`` its
    metadata. Returns the final hidden states ``[B, Tc, E]`` (after the per-expert norm) and the cache."""
    llm = language_model.config.llm
    rope = rope_cos_sin(meta.rope_id, llm.head_dim, llm.rope_theta)
    ks, vs = [], []
    for layer in language_model.layers:
        x, k, v = _layer(layer, x, und, meta, rope, None)
        ks.append(k)
        vs.append(v)
    return final_norm(language_model, x, und), KVCache(jnp.stack(ks), jnp.stack(vs), meta)


def forward_cached(language_model, x: jax.Array, und: int, meta: Meta, cache: KVCache
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """New tokens against a cache. ``x [B, Tq, E]`` (first ``und`` understanding), ``meta`` their metadata
    (``order`` after the cache's). Returns hidden ``[B, Tq, E]`` (normed) and the new keys/values
    ``[L, B, Tq, Hkv, D]`` (for callers that extend the cache, e.g. text decoding)."""
    llm = language_model.config.llm
    rope = rope_cos_sin(meta.rope_id, llm.head_dim, llm.rope_theta)
    ks, vs = [], []
    for i, layer in enumerate(language_model.layers):
        x, k, v = _layer(layer, x, und, meta, rope, (cache.k[i], cache.v[i], cache.meta))
        ks.append(k)
        vs.append(v)
    return final_norm(language_model, x, und), jnp.stack(ks), jnp.stack(vs)


def extend(cache: KVCache, k: jax.Array, v: jax.Array, meta: Meta, at: jax.Array) -> KVCache:
    """Writes new keys ``[L, B, Tn, Hkv, D]`` and their metadata into a preallocated cache at ``at``."""
    write = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), at, axis)
    new_meta = Meta(*(write(old, new, 1) for old, new in zip(cache.meta, meta)))
    return KVCache(write(cache.k, k, 2), write(cache.v, v, 2), new_meta)


def empty_slots(cache: KVCache, slots: int) -> KVCache:
    """The cache with ``slots`` invisible (sample −1) positions appended, to be filled by :func:`extend`."""
    pad = lambda a, value: jnp.concatenate(
        [a, jnp.full((*a.shape[:2], slots, *a.shape[3:]) if a.ndim == 5 else (a.shape[0], slots), value, a.dtype)],
        axis=2 if a.ndim == 5 else 1)
    meta = Meta(*(pad(f, -1 if name == "sample_id" else 0) for name, f in zip(Meta._fields, cache.meta)))
    return KVCache(pad(cache.k, 0), pad(cache.v, 0), meta)
