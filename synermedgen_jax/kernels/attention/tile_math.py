"""Tile-level math of packed-split attention: BAGEL's visibility rule and the online-softmax steps.

``visible_tile`` is the one statement of the visibility rule (the contract is in reference.py): the dense
mask of reference.py, the chunks of chunked.py and the Triton / Mosaic kernels evaluate it, and block_map.py
bounds it per block.

Everything here runs *inside* a kernel on small tiles, so it uses only elementwise jnp ops that both
Pallas backends lower. Orientation is decided by the caller's shapes: pass query metadata as a column
``[bq, 1]`` and key metadata as a row ``[1, bk]`` for a ``[bq, bk]`` score tile, or the other way round for
the transposed ``[bk, bq]`` tile of the dk/dv kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CAUSAL, FULL, NOISE = 0, 1, 2
# Masked scores use a large finite value rather than -inf: it keeps the running-max arithmetic free of
# inf - inf, while the explicit `where` on the probabilities makes masked entries exactly zero.
NEG = -1e30


def visible_tile(q_sample, q_split, q_kind, q_pos, k_sample, k_split, k_kind, k_pos) -> jax.Array:
    """BAGEL's visibility rule on broadcastable tiles of per-token metadata (same as ``visibility_mask``)."""
    same_sample = (q_sample == k_sample) & (q_sample >= 0)
    same_split = q_split == k_split
    causal_ok = (q_kind != CAUSAL) | (k_pos <= q_pos)
    earlier_context = (k_split < q_split) & (k_kind != NOISE)
    return same_sample & ((same_split & causal_ok) | earlier_context)


def online_softmax_update(scores, visible, m_prev, l_prev, acc_prev, v):
    """One flash-attention step for a ``[bq, bk]`` float32 score tile: returns the new (m, l, acc).

    ``m_prev``/``l_prev`` are ``[bq, 1]`` float32, ``acc_prev`` is ``[bq, D]`` float32, ``v`` is ``[bk, D]``.
    """
    scores = jnp.where(visible, scores, NEG)
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=-1, keepdims=True))
    correction = jnp.exp(m_prev - m_next)
    probs = jnp.where(visible, jnp.exp(scores - m_next), 0.0)
    l_next = correction * l_prev + jnp.sum(probs, axis=-1, keepdims=True)
    acc_next = correction * acc_prev + dot_nn(probs.astype(v.dtype), v)
    return m_next, l_next, acc_next


def finalize(m, denom, acc):
    """Output tile and log-sum-exp from the running stats; rows that saw nothing give zeros and lse 0."""
    seen = denom > 0.0
    out = acc / jnp.where(seen, denom, 1.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), 0.0)
    return out, lse


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` with float32 accumulation (``[m, d] x [n, d] -> [m, n]``)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` with float32 accumulation (``[m, d] x [d, n] -> [m, n]``)."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
