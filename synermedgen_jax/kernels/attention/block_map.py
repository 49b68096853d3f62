"""Block maps for packed-split attention: which key blocks a query block may see.

The fused kernels tile the ``[T, T]`` score matrix into ``block_q × block_k`` blocks. Before the kernel runs,
this module summarises each block of the per-token metadata (min/max of sample and split ids over its valid
tokens, and the split ranges of its non-noise and non-causal tokens) and decides from those summaries alone
whether *any* query of a query block can see *any* key of a key block. The decision is conservative (it never
drops a block that holds a visible pair). Each block is summarised in up to three parts (the tokens of its
lowest sample, of its highest sample, of the samples in between); the test is exact whenever each part lies
inside one split — the usual case, as blocks straddle at most a sample boundary. Middle parts (a block
holding three or more samples) fall back to the sample-range test.

The kernels consume the map as compacted lists: for every query block the ascending indices of its visible
key blocks and their count (forward, dq), and for every key block the list of query blocks that see it (dk,
dv). List entries past the count repeat the last valid index so a TPU pipeline re-uses the block already in
VMEM instead of issuing a DMA for a step it skips.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from synermedgen_jax.kernels.attention.tile_math import CAUSAL, NOISE

# Sentinels for empty min/max reductions; metadata ids are int32 and far from these in practice.
_BIG = jnp.iinfo(jnp.int32).max
_SMALL = jnp.iinfo(jnp.int32).min


class BlockSummary(NamedTuple):
    """Per-block metadata summaries, each ``[B, num_blocks]``."""

    any_valid: jax.Array
    sample_min: jax.Array
    sample_max: jax.Array
    split_min: jax.Array
    split_max: jax.Array
    context_split_min: jax.Array  # min split over non-noise tokens (what later splits may see)
    noncausal_split_min: jax.Array  # split range of full/noise tokens (seen whole, in either direction)
    noncausal_split_max: jax.Array


class VisibleLists(NamedTuple):
    """Compacted block lists for the kernels.

    ``kv_index [B, nq, nk]`` / ``kv_count [B, nq]``: key blocks visible to each query block (forward, dq).
    ``q_index [B, nk, nq]`` / ``q_count [B, nk]``: query blocks that see each key block (dk, dv).
    """

    kv_index: jax.Array
    kv_count: jax.Array
    q_index: jax.Array
    q_count: jax.Array


def _masked_min(values: jax.Array, keep: jax.Array) -> jax.Array:
    return jnp.min(jnp.where(keep, values, _BIG), axis=-1)


def _masked_max(values: jax.Array, keep: jax.Array) -> jax.Array:
    return jnp.max(jnp.where(keep, values, _SMALL), axis=-1)


def summarize_blocks(
    sample_id: jax.Array, split_id: jax.Array, split_kind: jax.Array, block: int, part: str = "all"
) -> BlockSummary:
    """Summaries of ``[B, T]`` metadata over blocks of ``block`` tokens (``T % block == 0``).

    ``part`` restricts each block to some of its valid tokens: ``"all"``, ``"first"`` (those of the block's
    lowest sample id), ``"last"`` (its highest, when it differs from the lowest) or ``"middle"`` (the rest).
    """
    batch, seq_len = sample_id.shape
    if seq_len % block:
        raise ValueError(f"summarize_blocks: T={seq_len} is not a multiple of the block size {block}")
    shape = (batch, seq_len // block, block)
    sample, split, kind = (x.reshape(shape) for x in (sample_id, split_id, split_kind))
    valid = sample >= 0
    if part != "all":
        lowest = _masked_min(sample, valid)[..., None]
        highest = _masked_max(sample, valid)[..., None]
        keep = {
            "first": sample == lowest,
            "last": (sample == highest) & (highest != lowest),
            "middle": (sample != lowest) & (sample != highest),
        }[part]
        valid = valid & keep
    noncausal = valid & (kind != CAUSAL)
    return BlockSummary(
        any_valid=jnp.any(valid, axis=-1),
        sample_min=_masked_min(sample, valid),
        sample_max=_masked_max(sample, valid),
        split_min=_masked_min(split, valid),
        split_max=_masked_max(split, valid),
        context_split_min=_masked_min(split, valid & (kind != NOISE)),
        noncausal_split_min=_masked_min(split, noncausal),
        noncausal_split_max=_masked_max(split, noncausal),
    )


def _overlap(lo_a, hi_a, lo_b, hi_b):
    return (lo_a <= hi_b) & (lo_b <= hi_a)


def _pair_map(qs: BlockSummary, ks: BlockSummary, key_after: jax.Array) -> jax.Array:
    """Block-pair test for one part of the query blocks against one part of the key blocks."""
    q = jax.tree.map(lambda x: x[:, :, None], qs)  # [B, nq, 1]
    k = jax.tree.map(lambda x: x[:, None, :], ks)  # [B, 1, nk]
    same_sample_possible = q.any_valid & k.any_valid & _overlap(q.sample_min, q.sample_max, k.sample_min, k.sample_max)
    single_sample = (q.sample_min == q.sample_max) & (k.sample_min == k.sample_max)
    earlier_context = k.context_split_min < q.split_max
    same_split_any = _overlap(q.split_min, q.split_max, k.split_min, k.split_max)
    same_split_noncausal = _overlap(
        q.noncausal_split_min, q.noncausal_split_max, k.noncausal_split_min, k.noncausal_split_max
    )
    # A key block lying strictly after the query block holds same-split visible pairs only in a full/noise
    # split (causal needs key <= query).
    same_split = jnp.where(key_after[None], same_split_noncausal, same_split_any)
    # Split ids are only comparable inside one sample: parts mixing samples keep the sample test alone.
    return same_sample_possible & (~single_sample | earlier_context | same_split)


_PARTS = ("first", "last", "middle")


def block_map(
    sample_id: jax.Array, split_id: jax.Array, split_kind: jax.Array, block_q: int, block_k: int
) -> jax.Array:
    """``[B, T/block_q, T/block_k]`` bool: True where the key block may hold a key visible to the query block.

    Never False for a block pair that holds a visible pair. Each block is split into the tokens of its lowest
    sample, of its highest sample and of the samples between; every part pair is tested on its own, so blocks
    straddling a sample boundary keep exact split tests (see the module docstring).
    """
    num_q, num_k = sample_id.shape[1] // block_q, sample_id.shape[1] // block_k
    key_after = (jnp.arange(num_k)[None, :] * block_k) >= ((jnp.arange(num_q)[:, None] + 1) * block_q)
    q_parts = [summarize_blocks(sample_id, split_id, split_kind, block_q, p) for p in _PARTS]
    k_parts = [summarize_blocks(sample_id, split_id, split_kind, block_k, p) for p in _PARTS]
    visible = jnp.zeros((sample_id.shape[0], num_q, num_k), bool)
    for qs in q_parts:
        for ks in k_parts:
            visible = visible | _pair_map(qs, ks, key_after)
    return visible


def block_skip_fraction(
    sample_id: jax.Array, split_id: jax.Array, split_kind: jax.Array, block_q: int, block_k: int
) -> jax.Array:
    """Fraction (scalar float32) of the ``block_q × block_k`` blocks the kernels compute for this pack.

    ``sample_id`` etc. are ``[B, T]`` with ``T`` a multiple of both block sizes (pad with ``sample_id = -1``).
    1.0 means dense work; the skipped fraction is ``1 - block_skip_fraction(...)``.
    """
    return jnp.mean(block_map(sample_id, split_id, split_kind, block_q, block_k).astype(jnp.float32))


def _compact(visible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[..., n, m]`` bool → ascending indices of the True entries (padded with the last one), counts."""
    m = visible.shape[-1]
    count = jnp.sum(visible, axis=-1, dtype=jnp.int32)
    # A stable sort on "not visible" puts visible indices first, in ascending order.
    order = jnp.argsort(jnp.logical_not(visible).astype(jnp.int32), axis=-1, stable=True).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    last = jnp.where(count[..., None] > 0, last, 0)
    index = jnp.where(jnp.arange(m) < count[..., None], order, last)
    return index, count


def visible_lists(visible: jax.Array) -> VisibleLists:
    """Compacted lists of a ``[B, nq, nk]`` block map for the forward/dq and the dk/dv kernels."""
    kv_index, kv_count = _compact(visible)
    q_index, q_count = _compact(jnp.swapaxes(visible, 1, 2))
    return VisibleLists(kv_index, kv_count, q_index, q_count)
