"""Device mesh and the ONE table that maps logical parameter axes onto it.

Mesh axes are ``('data', 'fsdp', 'tensor')``, all ``AxisType.Auto`` (explicit axis types break ordinary
sharded code in this JAX version; docs/sharding.md). Batches are split over ``data × fsdp``; parameters are
split over ``fsdp`` on their ``embed``-like axis (ZeRO-3 style: gathered per use by XLA) and over ``tensor`` on
heads / mlp / vocab (Megatron style). A logical axis whose size does not divide the mesh axis is replicated
instead of failing, so odd small configs still run on any mesh. Every axis name, mesh and logical, is written once
in synermedgen_jax/axes.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from synermedgen_jax import axes
from synermedgen_jax.axes import BATCH_AXES
from synermedgen_jax.modeling.layers import mesh_context

MESH_AXES = (axes.DATA, axes.FSDP, axes.TENSOR)

# Logical axis name (synermedgen_jax/axes.py; modeling/layers.py metadata and activation constraints) -> mesh axis,
# a tuple of mesh axes, or None (replicated). The only such table.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    axes.ACTIVATION_BATCH: BATCH_AXES,
    axes.ACTIVATION_LENGTH: None,
    axes.ACTIVATION_EMBED: None,
    axes.VOCAB: axes.TENSOR,
    axes.EMBED: axes.FSDP,
    axes.EMBED_OUT: None,
    axes.HEADS: axes.TENSOR,
    axes.KV_HEADS: axes.TENSOR,
    axes.HEAD_DIM: None,
    axes.MLP: axes.TENSOR,
    axes.NORM: None,
    axes.VIT_EMBED: axes.FSDP,
    axes.VIT_HEADS: axes.TENSOR,
    axes.VIT_MLP: axes.TENSOR,
}


def mesh_shape(spec: Mapping[str, int], device_count: int) -> tuple[int, int, int]:
    """Resolves ``{data, fsdp, tensor}`` sizes where one may be ``-1`` (fills the remaining devices)."""
    sizes = [int(spec[axis]) for axis in MESH_AXES]
    fills = [i for i, size in enumerate(sizes) if size == -1]
    if len(fills) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(size for size in sizes if size != -1)
    if fills:
        if device_count % known:
            raise ValueError(f"config.mesh: {device_count} devices are not divisible by the fixed axes ({known})")
        sizes[fills[0]] = device_count // known
    if math.prod(sizes) != device_count:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{device_count} are available")
    return tuple(sizes)


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The training mesh over all (global) devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of one array from its logical axes (None or missing metadata: replicated)."""
    if not logical_axes:
        return PartitionSpec()
    out, used = [], set()
    for name, size in zip(logical_axes, shape):
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"logical axis {name!r} has no rule in synermedgen_jax/sharding.py LOGICAL_RULES")
        axis = LOGICAL_RULES.get(name) if name is not None else None
        mesh_axes = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        # A mesh axis may appear once per array; indivisible sizes are replicated.
        if not mesh_axes or used.intersection(mesh_axes) or size % ways:
            out.append(None)
            continue
        used.update(mesh_axes)
        out.append(axis)
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None] | None, shape: Sequence[int]) -> NamedSharding:
    """Where an array with these logical axes lives on ``mesh``."""
    return NamedSharding(mesh, logical_spec(logical_axes, shape, mesh))


def activation_sharder(mesh: Mesh):
    """The mapping modeling/layers.py ``constrain`` uses while the train step is traced on ``mesh``."""
    return lambda logical_axes, shape: NamedSharding(mesh, logical_spec(logical_axes, shape, mesh))


def traced_on_mesh(fn, mesh: Mesh):
    """``fn`` traced inside the mesh's :func:`~synermedgen_jax.modeling.layers.mesh_context`: the model's
    ``constrain`` calls keep rows on their batch shard and every Pallas kernel on the model's path runs under
    ``shard_map`` on per-device rows and heads (the train step, the eval step and the sampler jit this)."""
    def traced(*args):
        with mesh_context(mesh, activation_sharder(mesh)):
            return fn(*args)

    return traced


def batch_spec(ndim: int) -> PartitionSpec:
    return PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, batch: Mapping[str, np.ndarray | jax.ShapeDtypeStruct]) -> dict[str, NamedSharding]:
    return {key: NamedSharding(mesh, batch_spec(np.ndim(value) if not hasattr(value, "ndim") else value.ndim))
            for key, value in batch.items()}


def batch_divisor(mesh: Mesh) -> int:
    """Global batch rows must be a multiple of this (the product of the batch mesh axes)."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded over ``data × fsdp``.

    Process ``i`` holds rows ``[i·n, (i+1)·n)`` of the global batch (its data shards, in order).
    """
    shardings = batch_sharding(mesh, local)
    return {key: jax.make_array_from_process_local_data(shardings[key], np.asarray(value))
            for key, value in local.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
