"""Packed-split attention: BAGEL's visibility rule over packed multimodal sequences.

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

This module holds the jnp reference and the dispatch; the fused Pallas kernels live beside it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from synermedgen_jax.kernels import partition
from synermedgen_jax.kernels.tile_math import visible_tile

if TYPE_CHECKING:
    from synermedgen_jax.kernels.pallas_attention import BlockSizes

CAUSAL, FULL, NOISE = 0, 1, 2
IMPLS = ("reference", "chunked", "pallas", "pallas_interpret", "xla_dense", "auto")
KERNEL_IMPLS = ("pallas", "pallas_interpret")  # opaque to XLA: partitioned with shard_map on a mesh


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


def _validate(q, k, v, sample_id, split_id, split_kind) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"packed_attention: q/k/v must be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"packed_attention: shapes do not agree: q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"packed_attention: Hq={q.shape[2]} is not a multiple of Hkv={k.shape[2]}")
    for name, meta in (("sample_id", sample_id), ("split_id", split_id), ("split_kind", split_kind)):
        if meta.shape != q.shape[:2]:
            raise ValueError(f"packed_attention: {name} must be [B, T] = {q.shape[:2]}; got {meta.shape}")


def packed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sample_id: jax.Array,
    split_id: jax.Array,
    split_kind: jax.Array,
    *,
    impl: str = "reference",
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    head_axis: str | None = "tensor",
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """BAGEL packed-split attention; see the module docstring. Returns ``[B, T, Hq, D]``.

    ``impl``: one of ``IMPLS``. ``block_sizes``: Pallas tile sizes (None: per-platform defaults).

    ``mesh``: the device mesh the caller is traced for (the model passes ``layers.active_mesh()``). A Pallas
    kernel then runs under ``shard_map`` (kernels/partition.py): rows split over the mesh axes of
    ``batch_axes``, heads (q and K/V alike) over ``head_axis``; T stays whole on every device, so each device
    attends its own rows and heads and K/V are never gathered. When the heads do not divide over
    ``head_axis`` the rows are split over it too where they divide. The jnp implementations ignore ``mesh``:
    XLA partitions them from their operands' shardings.
    """
    _validate(q, k, v, sample_id, split_id, split_kind)
    if impl == "auto":
        impl = _auto_impl()
    if impl not in IMPLS:
        raise ValueError(f"packed_attention: unknown impl {impl!r}; expected one of {IMPLS}")
    local = functools.partial(_local_attention, impl=impl, block_sizes=block_sizes)
    if mesh is None or impl not in KERNEL_IMPLS:
        return local(q, k, v, sample_id, split_id, split_kind)
    return _sharded(local, mesh, tuple(batch_axes), head_axis, q.shape, k.shape)(
        q, k, v, sample_id, split_id, split_kind
    )


def _local_attention(q, k, v, sample_id, split_id, split_kind, *, impl, block_sizes):
    if impl == "reference":
        return reference_attention(q, k, v, sample_id, split_id, split_kind)
    if impl == "xla_dense":
        return xla_dense_attention(q, k, v, sample_id, split_id, split_kind)
    if impl == "chunked":
        from synermedgen_jax.kernels.chunked_attention import chunked_attention  # noqa: PLC0415

        return chunked_attention(q, k, v, sample_id, split_id, split_kind)
    from synermedgen_jax.kernels import pallas_attention  # noqa: PLC0415 (optional heavy import)

    return pallas_attention.pallas_packed_attention(
        q, k, v, sample_id, split_id, split_kind, interpret=(impl == "pallas_interpret"), block_sizes=block_sizes
    )


def _sharded(local, mesh, batch_axes, head_axis, q_shape, kv_shape):
    head = partition.dividing_axes(mesh, (head_axis,) if head_axis else (), math.gcd(q_shape[2], kv_shape[2]))
    wanted_rows = tuple(batch_axes) + ((head_axis,) if head_axis and not head else ())
    rows = partition.row_axes(mesh, q_shape[0], "packed_attention rows", wanted_rows)
    heads = P(partition.spec_axes(rows), None, partition.spec_axes(head), None)
    meta = P(partition.spec_axes(rows), None)
    # Contiguous head shards keep GQA groups together: shard r holds q heads [r*Hq/n, ...) and exactly the
    # K/V heads [r*Hkv/n, ...) they map to, so the local h // group is the right local K/V head.
    return jax.shard_map(
        local, mesh=mesh, in_specs=(heads, heads, heads, meta, meta, meta), out_specs=heads, check_vma=False
    )


def _auto_impl() -> str:
    """``impl="auto"``: the rule of kernels/dispatch.py for the platform being traced for."""
    from synermedgen_jax.kernels.dispatch import auto_attention  # noqa: PLC0415

    return auto_attention()
