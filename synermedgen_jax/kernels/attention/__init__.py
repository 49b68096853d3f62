"""Packed-split attention: ``packed_attention``, the one entry point the model calls, and the dispatch to its
implementations (docs/kernels.md).

    packed_attention(q, k, v, sample_id, split_id, split_kind, *, impl="reference") -> [B, T, Hq, D]

The contract (shapes, metadata, the visibility rule) is written in ``reference.py`` beside the jnp reference.
``impl`` picks what computes (``IMPLS``, the names of kernels/dispatch.py):

* ``reference``: dense mask, plain jnp (``reference.py``);
* ``xla_dense``: the same mask through ``jax.nn.dot_product_attention`` (cuDNN on GPU; for comparisons);
* ``chunked``: jnp online softmax over key chunks with a custom backward (``chunked.py``);
* ``pallas`` / ``pallas_interpret``: the fused kernels (``pallas.py``: Triton on GPU, ``triton_kernel.py``;
  Mosaic on TPU, ``mosaic_kernel.py``; block skipping from ``block_map.py``), compiled or interpreted on CPU;
* ``auto``: what kernels/dispatch.py says for the platform being traced for.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec as P

from synermedgen_jax import axes
from synermedgen_jax.kernels import dispatch, partition
from synermedgen_jax.kernels.attention.chunked import chunked_attention
from synermedgen_jax.kernels.attention.pallas import BlockSizes, pallas_packed_attention
from synermedgen_jax.kernels.attention.reference import (
    CAUSAL,
    FULL,
    NOISE,
    reference_attention,
    visibility_mask,
    xla_dense_attention,
)
from synermedgen_jax.kernels.dispatch import ATTENTION_IMPLS as IMPLS
from synermedgen_jax.kernels.dispatch import KERNEL_IMPLS

__all__ = ["CAUSAL", "FULL", "NOISE", "IMPLS", "KERNEL_IMPLS", "packed_attention", "reference_attention",
           "visibility_mask", "xla_dense_attention"]

# The jnp implementations by name; the other names are the Pallas kernel (compiled or interpreted) and "auto".
JNP_IMPLS = {"reference": reference_attention, "xla_dense": xla_dense_attention, "chunked": chunked_attention}


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
    batch_axes: Sequence[str] = axes.BATCH_AXES,
    head_axis: str | None = axes.TENSOR,
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
        impl = dispatch.auto_attention()
    if impl not in IMPLS:
        raise ValueError(f"packed_attention: unknown impl {impl!r}; expected one of {IMPLS}")
    local = functools.partial(_local_attention, impl=impl, block_sizes=block_sizes)
    if mesh is None or impl not in KERNEL_IMPLS:
        return local(q, k, v, sample_id, split_id, split_kind)
    return _sharded(local, mesh, tuple(batch_axes), head_axis, q.shape, k.shape)(
        q, k, v, sample_id, split_id, split_kind
    )


def _local_attention(q, k, v, sample_id, split_id, split_kind, *, impl, block_sizes):
    if impl in JNP_IMPLS:
        return JNP_IMPLS[impl](q, k, v, sample_id, split_id, split_kind)
    return pallas_packed_attention(
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

