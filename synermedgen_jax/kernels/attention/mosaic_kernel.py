"""Mosaic-style (TPU) Pallas kernels for packed-split attention: forward, dq and dk/dv.

TPU blocks must be ``(8, 128)``-tiled in their last two dimensions, so the kernels work on head-major
``[B, H, T, D]`` copies (one transpose in and out, done by XLA). The key-block (forward, dq) or query-block
(dk/dv) axis of the grid walks the precomputed visible-block lists, which arrive through
``PrefetchScalarGridSpec`` in SMEM: the BlockSpec index maps read the list, so the pipeline only DMAs
visible blocks, and ``pl.when`` skips the compute of grid steps past the list's count (those steps repeat
the last index, so no new DMA is issued). Running statistics live in VMEM scratch across the reduction axis.

GQA: query head ``h`` reads K/V head ``h // group``; the dk/dv grid has a reduction axis over the ``group``
query heads of each K/V head. The same kernels run on CPU with ``interpret=True``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from synermedgen_jax.kernels.attention.tile_math import (
    NEG,
    dot_nn,
    dot_nt,
    finalize,
    online_softmax_update,
    visible_tile,
)


def _column_meta(meta_ref, start, size):
    """Tiles ``[size, 1]`` of (sample, split, kind, position) from a ``[size, 3]`` metadata block."""
    pos = start + jax.lax.broadcasted_iota(jnp.int32, (size, 1), 0)
    return [meta_ref[:, r : r + 1] for r in range(3)] + [pos]


def _row_meta(meta_ref, start, size):
    """Tiles ``[1, size]`` of (sample, split, kind, position) from a ``[3, size]`` metadata block."""
    pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, size), 1)
    return [meta_ref[r : r + 1, :] for r in range(3)] + [pos]


def _fwd_kernel(
    kv_index_ref, kv_count_ref, q_ref, k_ref, v_ref, q_meta_ref, k_meta_ref, o_ref, lse_ref,
    m_scratch, l_scratch, acc_scratch, *, scale, bq, bk, num_q, num_k,
):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, NEG, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    @pl.when(j < kv_count_ref[b * num_q + i])
    def _step():
        k_start = kv_index_ref[(b * num_q + i) * num_k + j] * bk
        visible = visible_tile(*_column_meta(q_meta_ref, i * bq, bq), *_row_meta(k_meta_ref, k_start, bk))
        scores = dot_nt(q_ref[...], k_ref[...]) * scale
        m, denom, acc = online_softmax_update(
            scores, visible, m_scratch[...], l_scratch[...], acc_scratch[...], v_ref[...]
        )
        m_scratch[...], l_scratch[...], acc_scratch[...] = m, denom, acc

    @pl.when(j == num_k - 1)
    def _finish():
        out, lse = finalize(m_scratch[...], l_scratch[...], acc_scratch[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _dq_kernel(
    kv_index_ref, kv_count_ref, q_ref, k_ref, v_ref, q_meta_ref, k_meta_ref, do_ref, lse_ref, delta_ref,
    dq_ref, dq_scratch, *, scale, bq, bk, num_q, num_k,
):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

    @pl.when(j < kv_count_ref[b * num_q + i])
    def _step():
        k_start = kv_index_ref[(b * num_q + i) * num_k + j] * bk
        visible = visible_tile(*_column_meta(q_meta_ref, i * bq, bq), *_row_meta(k_meta_ref, k_start, bk))
        k = k_ref[...]
        probs = jnp.where(visible, jnp.exp(dot_nt(q_ref[...], k) * scale - lse_ref[...]), 0.0)
        dscores = probs * (dot_nt(do_ref[...], v_ref[...]) - delta_ref[...])
        dq_scratch[...] += dot_nn(dscores.astype(k.dtype), k)

    @pl.when(j == num_k - 1)
    def _finish():
        dq_ref[...] = (dq_scratch[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_index_ref, q_count_ref, q_ref, k_ref, v_ref, q_meta_ref, k_meta_ref, do_ref, lse_ref, delta_ref,
    dk_ref, dv_ref, dk_scratch, dv_scratch, *, scale, bq, bk, num_q, num_k, group,
):
    # Transposed [bk, bq] tiles: dk = dsT @ q and dv = pT @ do are plain matmuls; lse/delta arrive as rows.
    b, j, g, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (t == 0))
    def _init():
        dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
        dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

    @pl.when(t < q_count_ref[b * num_k + j])
    def _step():
        q_start = q_index_ref[(b * num_k + j) * num_q + t] * bq
        visible_t = visible_tile(*_row_meta(q_meta_ref, q_start, bq), *_column_meta(k_meta_ref, j * bk, bk))
        q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
        probs_t = jnp.where(visible_t, jnp.exp(dot_nt(k, q) * scale - lse_ref[...]), 0.0)
        dv_scratch[...] += dot_nn(probs_t.astype(do.dtype), do)
        dscores_t = probs_t * (dot_nt(v, do) - delta_ref[...])
        dk_scratch[...] += dot_nn(dscores_t.astype(q.dtype), q)

    @pl.when((g == group - 1) & (t == num_q - 1))
    def _finish():
        dk_ref[...] = (dk_scratch[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _params(interpret: bool, semantics):
    return None if interpret else pltpu.CompilerParams(dimension_semantics=semantics)


def _head_major(x):
    return jnp.swapaxes(x, 1, 2)  # [B, T, H, D] <-> [B, H, T, D]


def forward(q, k, v, meta, lists, *, scale, bq, bk, num_warps, num_stages, interpret):
    """``(out [B, T, Hq, D], lse [B, Hq, T, 1] float32)``; ``meta`` is ``[B, 3, T]`` int32."""
    del num_warps, num_stages  # Triton-only
    batch, seq_len, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    num_q, num_k = seq_len // bq, seq_len // bk
    kv_index = lists.kv_index.reshape(-1)

    def kv_block(b, h, i, j, index, count):
        return (b, h // group, index[(b * num_q + i) * num_k + j], 0)

    def k_meta_block(b, h, i, j, index, count):
        return (b, 0, index[(b * num_q + i) * num_k + j])

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, num_heads, num_q, num_k),
        in_specs=[
            pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0)),
            pl.BlockSpec((None, None, bk, head_dim), kv_block),
            pl.BlockSpec((None, None, bk, head_dim), kv_block),
            pl.BlockSpec((None, bq, 3), lambda b, h, i, j, *_: (b, i, 0)),
            pl.BlockSpec((None, 3, bk), k_meta_block),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, *_: (b, h, i, 0)),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, head_dim), jnp.float32),
        ],
    )
    kernel = functools.partial(_fwd_kernel, scale=scale, bq=bq, bk=bk, num_q=num_q, num_k=num_k)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_heads, seq_len, head_dim), q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, seq_len, 1), jnp.float32),
        ],
        compiler_params=_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="packed_attention_fwd",
    )(kv_index, lists.kv_count.reshape(-1), _head_major(q), _head_major(k), _head_major(v),
      jnp.swapaxes(meta, 1, 2), meta)
    return _head_major(out), lse


def backward(q, k, v, meta, lists, do, lse, delta, *, scale, bq, bk, num_warps, num_stages, interpret):
    """``(dq, dk, dv)`` shaped like q, k, v. ``lse``/``delta`` are ``[B, Hq, T, 1]`` float32."""
    del num_warps, num_stages
    batch, seq_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    num_q, num_k = seq_len // bq, seq_len // bk
    qh, kh, vh, doh = (_head_major(x) for x in (q, k, v, do))
    meta_rows, meta_cols = meta, jnp.swapaxes(meta, 1, 2)  # [B, 3, T], [B, T, 3]

    def kv_block(b, h, i, j, index, count):
        return (b, h // group, index[(b * num_q + i) * num_k + j], 0)

    def q_stat(b, h, i, j, *_):
        return (b, h, i, 0)

    dq_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, num_heads, num_q, num_k),
        in_specs=[
            pl.BlockSpec((None, None, bq, head_dim), q_stat),
            pl.BlockSpec((None, None, bk, head_dim), kv_block),
            pl.BlockSpec((None, None, bk, head_dim), kv_block),
            pl.BlockSpec((None, bq, 3), lambda b, h, i, j, *_: (b, i, 0)),
            pl.BlockSpec((None, 3, bk), lambda b, h, i, j, index, c: (b, 0, index[(b * num_q + i) * num_k + j])),
            pl.BlockSpec((None, None, bq, head_dim), q_stat),
            pl.BlockSpec((None, None, bq, 1), q_stat),
            pl.BlockSpec((None, None, bq, 1), q_stat),
        ],
        out_specs=pl.BlockSpec((None, None, bq, head_dim), q_stat),
        scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
    )
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, bq=bq, bk=bk, num_q=num_q, num_k=num_k),
        grid_spec=dq_spec,
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="packed_attention_dq",
    )(lists.kv_index.reshape(-1), lists.kv_count.reshape(-1), qh, kh, vh, meta_cols, meta_rows, doh, lse, delta)

    # dk/dv grid: (batch, K/V head, key block, query head of the group, visible query block).
    def q_block(b, h, j, g, t, index, count):
        return (b, h * group + g, index[(b * num_k + j) * num_q + t], 0)

    def q_row(b, h, j, g, t, index, count):
        return (b, h * group + g, 0, index[(b * num_k + j) * num_q + t])

    def own_kv(b, h, j, g, t, *_):
        return (b, h, j, 0)

    dkv_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, num_kv_heads, num_k, group, num_q),
        in_specs=[
            pl.BlockSpec((None, None, bq, head_dim), q_block),
            pl.BlockSpec((None, None, bk, head_dim), own_kv),
            pl.BlockSpec((None, None, bk, head_dim), own_kv),
            pl.BlockSpec((None, 3, bq), lambda b, h, j, g, t, index, c: (b, 0, index[(b * num_k + j) * num_q + t])),
            pl.BlockSpec((None, bk, 3), lambda b, h, j, g, t, *_: (b, j, 0)),
            pl.BlockSpec((None, None, bq, head_dim), q_block),
            pl.BlockSpec((None, None, 1, bq), q_row),
            pl.BlockSpec((None, None, 1, bq), q_row),
        ],
        out_specs=[pl.BlockSpec((None, None, bk, head_dim), own_kv), pl.BlockSpec((None, None, bk, head_dim), own_kv)],
        scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)],
    )
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bq=bq, bk=bk, num_q=num_q, num_k=num_k, group=group),
        grid_spec=dkv_spec,
        out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
        compiler_params=_params(interpret, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="packed_attention_dkv",
    )(lists.q_index.reshape(-1), lists.q_count.reshape(-1), qh, kh, vh, meta_rows, meta_cols, doh,
      lse.reshape(batch, num_heads, 1, seq_len), delta.reshape(batch, num_heads, 1, seq_len))
    return _head_major(dq), _head_major(dk), _head_major(dv)
