"""How a Pallas kernel runs on a device mesh: under ``shard_map``, on per-device rows (and heads).

XLA cannot partition an opaque kernel call: given a sharded operand it gathers the global array onto every
device and runs the whole kernel there (Triton), or refuses to compile (Mosaic). So every kernel call on the
model's path is wrapped in ``shard_map``: rows (the batch, or token rows derived from it) are split over the
batch mesh axes ``data × fsdp``, attention heads over ``tensor``, and each device's kernel sees only its own
shard. Nothing inside a kernel talks across devices: rows and heads are independent.

When a size does not divide its mesh axes (an odd sampler batch, BAGEL's 28 query / 4 K/V heads on
``tensor=8``), the axes that do not divide are left out of the split (those devices compute the same shard):
correct on any mesh, and a warning names the shapes once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

from synermedgen_jax.axes import BATCH_AXES

_log = logging.getLogger(__name__)
_warned: set[tuple] = set()


def mesh_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def dividing_axes(mesh, axes: Sequence[str], size: int) -> tuple[str, ...]:
    """The axes of ``axes`` present in ``mesh``, in order, dropping each one whose size would not divide
    ``size`` together with those kept before it."""
    sizes, kept = mesh_sizes(mesh), []
    for axis in axes:
        if axis in sizes and size % (math.prod(sizes[a] for a in kept) * sizes[axis]) == 0:
            kept.append(axis)
    return tuple(kept)


def warn_partial(what: str, wanted: Sequence[str], got: Sequence[str], shape: tuple) -> None:
    """One warning per (call site, shape) when a kernel cannot use every mesh axis it should."""
    key = (what, tuple(wanted), tuple(got), shape)
    if key not in _warned:
        _warned.add(key)
        _log.warning("%s: shape %s does not divide over mesh axes %s; split over %s only (the rest compute the "
                     "same shard)", what, shape, tuple(wanted), tuple(got) or "none")


def row_axes(mesh, rows: int, what: str, batch_axes: Sequence[str] = BATCH_AXES) -> tuple[str, ...]:
    """Mesh axes the leading (row) axis of ``rows`` rows is split over."""
    wanted = tuple(a for a in batch_axes if a in mesh.axis_names)
    got = dividing_axes(mesh, wanted, rows)
    if got != wanted:
        warn_partial(what, wanted, got, (rows,))
    return got


def spec_axes(axes: Sequence[str]):
    """A PartitionSpec entry for ``axes``: None (replicated), one name, or a tuple of names."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def over_rows(fn: Callable, mesh, rows: int, num_row_args: int, num_outputs: int, what: str,
              batch_axes: Sequence[str] = BATCH_AXES) -> Callable:
    """``fn(*row_args, *replicated_args)`` under ``shard_map``: the first ``num_row_args`` arguments and every
    output have a leading axis of ``rows`` split over the batch axes; later arguments are replicated."""
    split = spec_axes(row_axes(mesh, rows, what, batch_axes))

    def specs(arrays):
        return tuple(P(split) if i < num_row_args else P() for i in range(len(arrays)))

    def call(*args):
        out_specs = tuple(P(split) for _ in range(num_outputs))
        wrapped = jax.shard_map(lambda *a: tuple(fn(*a)), mesh=mesh, in_specs=specs(args), out_specs=out_specs,
                                check_vma=False)
        return wrapped(*args)

    return call
