"""Packed-split attention, the contract and its jnp reference: BAGEL's visibility rule over packed sequences.

Contract (docs/kernels.md)::

    packed_attention(q, k, v, sample_id, split_id, split_kind, *, impl="reference") -> [B, T, Hq, D]

q is ``[B, T, Hq, D]``, k and v are ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0`` (grouped-query attention).
The metadata arrays are ``[B, T]`` int32:

* ``sample_id``: which sample of the pack a token belongs to; ``< 0`` marks padding.
* ``split_id``: the split (a text span, an image block) inside its sample, increasing in sequence order.
* ``split_kind``: ``CAUSAL`` (0), ``FULL`` (1) or ``NOISE`` (2).

Visibility of key j from query i (same sample only, padding sees and is seen by nothing):

* ``split_j == split_i``: visible when the split is full/noise, or causal with ``j <= i``;
* ``split_j <  split_i``: visible unless split j is a noise split (noised targets are never context);
* ``split_j >  split_i``: never.

Only the *relative order inside a split* uses token positions; everything else uses the metadata, so a
pack may store its understanding and generation tokens in separate regions (see data/packing.py).

This module holds the dense-mask jnp reference (and ``xla_dense``, the same mask through
``jax.nn.dot_product_attention``); the rule itself is ``tile_math.visible_tile``. The package's other modules:
``__init__`` (``packed_attention``: validation and the dispatch to an implementation), ``chunked`` (jnp online
softmax over key chunks), ``pallas`` (the fused kernels' entry and custom VJP), ``triton_kernel`` /
``mosaic_kernel`` (the Pallas kernels for GPU / TPU), ``block_map`` (which key blocks a query block sees).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from synermedgen_jax.kernels.attention.tile_math import CAUSAL, FULL, NOISE, visible_tile

__all__ = ["CAUSAL", "FULL", "NOISE", "visibility_mask", "reference_attention", "xla_dense_attention"]


def visibility_mask(
    sample_id: jax.Array,
    split_id: jax.Array,
    split_kind: jax.Array,
    order: jax.Array | None = None,
    keys: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Dense visibility ``[B, Tq, Tk]`` (bool) by the rule of ``tile_math.visible_tile``.

    Query metadata ``[B, Tq]``; ``order`` is each token's position for the causal rule (None: the index
    along T). ``keys``: the keys' ``(sample_id, split_id, split_kind, order)`` ``[B, Tk]`` when they are not
    the queries themselves (a KV cache: Tk ≠ Tq), else None.
    """
    if order is None:
        order = jnp.broadcast_to(jnp.arange(sample_id.shape[-1]), sample_id.shape)
    k_sample, k_split, k_kind, k_order = keys if keys is not None else (sample_id, split_id, split_kind, order)
    return visible_tile(sample_id[:, :, None], split_id[:, :, None], split_kind[:, :, None], order[:, :, None],
                        k_sample[:, None, :], k_split[:, None, :], k_kind[:, None, :], k_order[:, None, :])


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sample_id: jax.Array,
    split_id: jax.Array,
    split_kind: jax.Array,
    *,
    order: jax.Array | None = None,
    keys: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Plain jnp attention with a dense mask. Rows that see nothing return zeros.

    ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]``, query metadata ``[B, Tq]``; ``order`` and ``keys`` as in
    :func:`visibility_mask` (``keys`` given: the keys' own metadata, so Tk may differ from Tq — the KV-cached
    forward of inference/kv_cache.py). Softmax statistics are computed in float32 whatever the input dtype.
    """
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    mask = visibility_mask(sample_id, split_id, split_kind, order, keys)  # [B, Tq, Tk]
    # [B, Tq, Hkv, G, D]: query heads grouped onto their shared K/V head, no K/V repetition.
    q_grouped = q.reshape(batch, seq_len, num_kv_heads, group, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q_grouped, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq_len, num_q_heads, head_dim).astype(q.dtype)


def xla_dense_attention(q, k, v, sample_id, split_id, split_kind):
    """``jax.nn.dot_product_attention`` with a dense mask (cuDNN on GPU); for comparison benchmarks."""
    mask = visibility_mask(sample_id, split_id, split_kind)[:, None]  # [B, 1, Tq, Tk]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    sees_something = jnp.any(mask, axis=-1)[:, 0, :, None, None]  # [B, T, 1, 1]
    return jnp.where(sees_something, out, 0).astype(q.dtype)
