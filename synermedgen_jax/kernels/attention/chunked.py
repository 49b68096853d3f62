"""Memory-bounded packed-split attention in plain jnp: online softmax over key chunks, with a custom VJP that
recomputes each chunk's scores in the backward pass (FlashAttention-2's algorithm, written with ``lax.scan``).

It compiles on every XLA backend, and its temporaries are ``O(T · chunk)`` per head instead of ``O(T²)``: the
ahead-of-time memory planner uses it to size long-context steps on simulated CPU meshes, where the Pallas
kernels cannot be compiled, and it is a portable fallback. It computes every key chunk (no block skipping).
Visibility is the rule of tile_math.py (the contract: reference.py), evaluated per chunk from the metadata.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from synermedgen_jax.kernels.attention.tile_math import visible_tile

DEFAULT_CHUNK = 512


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """``[B, T, ...]`` → ``[T/chunk, B, chunk, ...]`` (scan axis first)."""
    batch, length = x.shape[:2]
    return jnp.moveaxis(x.reshape(batch, length // chunk, chunk, *x.shape[2:]), 1, 0)


def _chunk_mask(meta_q, meta_k, start):
    """Visibility ``[B, T, C]`` of one key chunk starting at position ``start``."""
    sample_q, split_q, kind_q = meta_q
    sample_k, split_k, kind_k = meta_k
    positions_q = jnp.arange(sample_q.shape[1])
    positions_k = start + jnp.arange(sample_k.shape[1])
    return visible_tile(sample_q[:, :, None], split_q[:, :, None], kind_q[:, :, None], positions_q[None, :, None],
                         sample_k[:, None, :], split_k[:, None, :], kind_k[:, None, :], positions_k[None, None, :])


def _scores(q, k_chunk, mask, scale):
    """``q [B, T, Hkv, G, D]``, ``k [B, C, Hkv, D]`` → masked scores ``[B, Hkv, G, T, C]`` (float32)."""
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k_chunk, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None], scores, -jnp.inf)


def _forward(q, k, v, meta, chunk):
    batch, length, kv_heads, group, head_dim = q.shape
    scale = head_dim**-0.5
    k_chunks, v_chunks = _chunks(k, chunk), _chunks(v, chunk)
    meta_chunks = tuple(_chunks(m, chunk) for m in meta)
    starts = jnp.arange(length // chunk) * chunk

    def step(carry, inputs):
        row_max, row_sum, acc = carry
        k_chunk, v_chunk, meta_k, start = inputs
        scores = _scores(q, k_chunk, _chunk_mask(meta, meta_k, start), scale)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        correction = jnp.exp(jnp.where(jnp.isfinite(row_max), row_max - safe_max, -jnp.inf))
        probs = jnp.exp(scores - safe_max[..., None])
        row_sum = row_sum * correction + jnp.sum(probs, axis=-1)
        update = jnp.einsum("bhgqk,bkhd->bhgqd", probs.astype(v.dtype), v_chunk, preferred_element_type=jnp.float32)
        return (new_max, row_sum, acc * correction[..., None] + update), None

    init = (jnp.full((batch, kv_heads, group, length), -jnp.inf, jnp.float32),
            jnp.zeros((batch, kv_heads, group, length), jnp.float32),
            jnp.zeros((batch, kv_heads, group, length, head_dim), jnp.float32))
    (row_max, row_sum, acc), _ = jax.lax.scan(step, init, (k_chunks, v_chunks, meta_chunks, starts))
    seen = row_sum > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, row_sum, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), -jnp.inf)
    return out, lse  # [B, Hkv, G, T, D], [B, Hkv, G, T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, meta, chunk):
    out, _ = _forward(q, k, v, meta, chunk)
    return out


def _attention_fwd(q, k, v, meta, chunk):
    out, lse = _forward(q, k, v, meta, chunk)
    return out, (q, k, v, meta, out, lse)


def _attention_bwd(chunk, residuals, d_out):
    q, k, v, meta, out, lse = residuals
    head_dim = q.shape[-1]
    scale = head_dim**-0.5
    delta = jnp.sum(d_out * out, axis=-1)  # [B, Hkv, G, T]
    safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    starts = jnp.arange(q.shape[1] // chunk) * chunk

    def step(dq, inputs):
        k_chunk, v_chunk, meta_k, start = inputs
        mask = _chunk_mask(meta, meta_k, start)
        scores = _scores(q, k_chunk, mask, scale)
        probs = jnp.where(mask[:, None, None], jnp.exp(scores - safe_lse[..., None]), 0.0)  # [B, H, G, T, C]
        dv = jnp.einsum("bhgqk,bhgqd->bkhd", probs, d_out)
        dp = jnp.einsum("bhgqd,bkhd->bhgqk", d_out, v_chunk.astype(jnp.float32))
        ds = probs * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bhgqk,bkhd->bqhgd", ds, k_chunk.astype(jnp.float32))
        dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32),
                                (_chunks(k, chunk), _chunks(v, chunk), tuple(_chunks(m, chunk) for m in meta), starts))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)
    zero_meta = jax.tree.map(lambda m: jnp.zeros(m.shape, jax.dtypes.float0), meta)
    return dq.astype(q.dtype), unchunk(dk).astype(k.dtype), unchunk(dv).astype(v.dtype), zero_meta


_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, sample_id: jax.Array, split_id: jax.Array,
                      split_kind: jax.Array, *, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """Same contract as ``packed_attention``: q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]`` → ``[B, T, Hq, D]``.

    T is padded to a multiple of ``chunk`` with invisible padding tokens (sample id −1).
    """
    batch, length, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    chunk = min(chunk, length)
    pad = (-length) % chunk
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        sample_id = jnp.pad(sample_id, ((0, 0), (0, pad)), constant_values=-1)
        split_id, split_kind = (jnp.pad(m, ((0, 0), (0, pad))) for m in (split_id, split_kind))
    grouped = q.reshape(batch, length + pad, kv_heads, q_heads // kv_heads, head_dim)
    out = _attention(grouped, k, v, (sample_id, split_id, split_kind), chunk)  # [B, Hkv, G, T, D]
    out = jnp.moveaxis(out, 3, 1).reshape(batch, length + pad, q_heads, head_dim)
    return out[:, :length].astype(q.dtype)
