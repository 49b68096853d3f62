"""Triton-style (GPU) Pallas kernels for packed-split attention: forward, dq and dk/dv.

Layout stays the model's ``[B, T, H, D]``: Triton addresses strided blocks directly, so no transpose.
One program handles one (batch, head, block) and walks its list of visible blocks with a loop whose trip
count is read from the precomputed block lists (see ``block_map.py``) — skipped blocks are never loaded.
GQA: a query head's BlockSpec points at its K/V head (``h // group``), K/V are never repeated; the dk/dv
program of a K/V head loops over the ``group`` query heads that share it and sums their contributions.

The same kernels run on CPU with ``interpret=True``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from synermedgen_jax.kernels.attention.tile_math import (
    NEG,
    dot_nn,
    dot_nt,
    finalize,
    online_softmax_update,
    visible_tile,
)


def _meta(meta_ref, start, size, column: bool):
    """(sample, split, kind, position) tiles of ``size`` tokens from ``start``: ``[size, 1]`` or ``[1, size]``."""
    rows = [meta_ref[r, pl.ds(start, size)] for r in range(3)]
    pos = start + jnp.arange(size, dtype=jnp.int32)
    rows.append(pos)
    return [x[:, None] if column else x[None, :] for x in rows]


def _fwd_kernel(kv_index_ref, kv_count_ref, q_ref, k_ref, v_ref, meta_ref, o_ref, lse_ref, *, scale, bq, bk):
    q_start = pl.program_id(2) * bq
    q = q_ref[...]
    q_meta = _meta(meta_ref, q_start, bq, column=True)

    def body(j, carry):
        k_start = pl.multiple_of(kv_index_ref[j] * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        visible = visible_tile(*q_meta, *_meta(meta_ref, k_start, bk, column=False))
        return online_softmax_update(dot_nt(q, k) * scale, visible, *carry, v)

    init = (
        jnp.full((bq, 1), NEG, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros((bq, q.shape[-1]), jnp.float32),
    )
    out, lse = finalize(*jax.lax.fori_loop(0, kv_count_ref[...], body, init))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(
    kv_index_ref, kv_count_ref, q_ref, k_ref, v_ref, meta_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, bq, bk
):
    q_start = pl.program_id(2) * bq
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq, 1]
    q_meta = _meta(meta_ref, q_start, bq, column=True)

    def body(j, dq):
        k_start = pl.multiple_of(kv_index_ref[j] * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        visible = visible_tile(*q_meta, *_meta(meta_ref, k_start, bk, column=False))
        probs = jnp.where(visible, jnp.exp(dot_nt(q, k) * scale - lse), 0.0)
        dscores = probs * (dot_nt(do, v) - delta)
        return dq + dot_nn(dscores.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, kv_count_ref[...], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_index_ref, q_count_ref, q_ref, k_ref, v_ref, meta_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    *, scale, bq, bk, group,
):
    # Transposed formulation: [bk, bq] tiles, so dk = dsT @ q and dv = pT @ do need no transposed operands.
    k_start = pl.program_id(2) * bk
    k, v = k_ref[...], v_ref[...]
    k_meta = _meta(meta_ref, k_start, bk, column=True)
    count = q_count_ref[...]

    def head_body(g, carry):
        def block_body(j, carry):
            dk, dv = carry
            q_start = pl.multiple_of(q_index_ref[j] * bq, bq)
            q = q_ref[pl.ds(q_start, bq), g, :]
            do = do_ref[pl.ds(q_start, bq), g, :]
            lse = lse_ref[g, :, pl.ds(q_start, bq)]  # [1, bq]
            delta = delta_ref[g, :, pl.ds(q_start, bq)]
            q_sample, q_split, q_kind, q_pos = _meta(meta_ref, q_start, bq, column=False)
            k_sample, k_split, k_kind, k_pos = k_meta
            visible_t = visible_tile(q_sample, q_split, q_kind, q_pos, k_sample, k_split, k_kind, k_pos)
            probs_t = jnp.where(visible_t, jnp.exp(dot_nt(k, q) * scale - lse), 0.0)
            dv = dv + dot_nn(probs_t.astype(do.dtype), do)
            dscores_t = probs_t * (dot_nt(v, do) - delta)
            dk = dk + dot_nn(dscores_t.astype(q.dtype), q)
            return dk, dv

        return jax.lax.fori_loop(0, count, block_body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, group, head_body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(interpret: bool, num_warps: int, num_stages: int):
    # Explicit Triton params select the Triton backend over Mosaic GPU (the default GPU backend in jax 0.10).
    return None if interpret else pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def forward(q, k, v, meta, lists, *, scale, bq, bk, num_warps, num_stages, interpret):
    """``(out [B, T, Hq, D], lse [B, Hq, T, 1] float32)``; ``meta`` is ``[B, 3, T]`` int32."""
    batch, seq_len, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    grid = (batch, num_heads, seq_len // bq)
    kernel = functools.partial(_fwd_kernel, scale=scale, bq=bq, bk=bk)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, None, lists.kv_index.shape[-1]), lambda b, h, i: (b, i, 0)),
            pl.BlockSpec((None, None), lambda b, h, i: (b, i)),
            pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h, i: (b, 0, h // group, 0)),
            pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h, i: (b, 0, h // group, 0)),
            pl.BlockSpec((None, 3, seq_len), lambda b, h, i: (b, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, seq_len, 1), jnp.float32),
        ],
        compiler_params=_params(interpret, num_warps, num_stages),
        interpret=interpret,
        name="packed_attention_fwd",
    )(lists.kv_index, lists.kv_count, q, k, v, meta)


def backward(q, k, v, meta, lists, do, lse, delta, *, scale, bq, bk, num_warps, num_stages, interpret):
    """``(dq, dk, dv)`` shaped like q, k, v. ``lse``/``delta`` are ``[B, Hq, T, 1]`` float32."""
    batch, seq_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    params = _params(interpret, num_warps, num_stages)
    full_kv = pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h, i: (b, 0, h // group, 0))
    q_block = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
    stat_block = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
    meta_spec = pl.BlockSpec((None, 3, seq_len), lambda b, h, i: (b, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, bq=bq, bk=bk),
        grid=(batch, num_heads, seq_len // bq),
        in_specs=[
            pl.BlockSpec((None, None, lists.kv_index.shape[-1]), lambda b, h, i: (b, i, 0)),
            pl.BlockSpec((None, None), lambda b, h, i: (b, i)),
            q_block, full_kv, full_kv, meta_spec, q_block, stat_block, stat_block,
        ],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="packed_attention_dq",
    )(lists.kv_index, lists.kv_count, q, k, v, meta, do, lse, delta)

    # dk/dv: one program per (batch, K/V head, key block); the `group` query heads of that K/V head are the
    # block [h * group, (h + 1) * group) of the head axis. Statistics are read as rows: [B, Hq, 1, T].
    group_q = pl.BlockSpec((None, seq_len, group, head_dim), lambda b, h, j: (b, 0, h, 0))
    group_stat = pl.BlockSpec((None, group, 1, seq_len), lambda b, h, j: (b, h, 0, 0))
    kv_block = pl.BlockSpec((None, bk, None, head_dim), lambda b, h, j: (b, j, h, 0))
    lse_row = lse.reshape(batch, num_heads, 1, seq_len)
    delta_row = delta.reshape(batch, num_heads, 1, seq_len)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bq=bq, bk=bk, group=group),
        grid=(batch, num_kv_heads, seq_len // bk),
        in_specs=[
            pl.BlockSpec((None, None, lists.q_index.shape[-1]), lambda b, h, j: (b, j, 0)),
            pl.BlockSpec((None, None), lambda b, h, j: (b, j)),
            group_q, kv_block, kv_block, meta_spec, group_q, group_stat, group_stat,
        ],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="packed_attention_dkv",
    )(lists.q_index, lists.q_count, q, k, v, meta, do, lse_row, delta_row)
    return dq, dk, dv
