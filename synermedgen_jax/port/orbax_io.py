"""Our parameter checkpoint format (what ``import`` writes, ``export`` reads and the trainer's ``init_from`` uses).

Layout of a checkpoint folder ``DIR``::

  DIR/config.json        the model config (synermedgen_jax.config.to_json; JSON, never Python)
  DIR/params/            an Orbax checkpoint (OCDBT, zarr3) written with ``orbax.checkpoint.v1.partial.save``
                         in chunks so that no more than ~``chunk_bytes`` of arrays are in memory at once; the
                         PyTree is at ``DIR/params/state``: nested dicts with string keys mirroring
                         ``nnx.state(model)`` paths ("language_model" → "layers" → "0" → "self_attn" → "q_proj" →
                         "kernel"), numpy leaves, Params and the two frozen sin-cos tables
  DIR/port.json          optional: where the weights came from (source dtypes, the original llm/vit JSON files)
  DIR/tokenizer/         optional: tokenizer files copied from the BAGEL folder

Read it with :func:`load_params_checkpoint` (optionally onto abstract sharded arrays, so each device reads
only its shard), or plain Orbax: ``ocp.PyTreeCheckpointer().restore(DIR/"params"/"state")``.
The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from synermedgen_jax.config import to_json
from synermedgen_jax.port import keys as K
from synermedgen_jax.port.bagel import PortError, atomic_folder, commit_folder, flatten, nest

PARAMS = "params"
TREE = "state"  # where orbax.checkpoint.v1.partial puts the PyTree inside PARAMS
DEFAULT_CHUNK_BYTES = 256 * 2**20


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: slow to import

    return ocp


def write_params_checkpoint(out_dir: str | os.PathLike, config, leaves: Iterable[tuple[str, np.ndarray]], *,
                            chunk_bytes: int = DEFAULT_CHUNK_BYTES, port_info: dict | None = None,
                            tokenizer_src: Path | None = None) -> int:
    """Writes the checkpoint from a stream of ``(dotted path, array)``; returns the number of bytes of params."""
    from orbax.checkpoint.experimental.v1 import partial

    out = Path(out_dir)
    tmp = atomic_folder(out)
    total = 0
    try:
        chunk: dict[str, np.ndarray] = {}
        size = 0
        for name, array in leaves:
            if chunk and size + array.nbytes > chunk_bytes:  # a large tensor goes out alone, not on top of a chunk
                partial.save(tmp / PARAMS, nest(chunk))
                chunk, size = {}, 0
            chunk[name] = array
            size += array.nbytes
            total += array.nbytes
        if chunk or total == 0:  # the last chunk (or an empty tree)
            partial.save(tmp / PARAMS, nest(chunk))
        del chunk
        partial.finalize(tmp / PARAMS)
        (tmp / "config.json").write_text(to_json(config) + "\n")
        if port_info is not None:
            (tmp / "port.json").write_text(json.dumps(port_info, indent=2) + "\n")
        if tokenizer_src is not None:
            from synermedgen_jax.port.bagel import copy_tokenizer

            (tmp / "tokenizer").mkdir()
            copy_tokenizer(tokenizer_src, tmp / "tokenizer")
        commit_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return total


def save_params_checkpoint(params_state, config, out_dir: str | os.PathLike, *,
                           chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """Saves an ``nnx.State`` (or nested / flat params dict) and its config in our checkpoint format."""
    flat = flatten(params_state)
    expected = [rule.ours for rule in K.build_table(config)]
    missing = [name for name in expected if name not in flat]
    if missing:
        raise PortError(f"save_params_checkpoint: {len(missing)} params missing from the state: {', '.join(missing)}")
    leaves = ((name, np.asarray(jax.device_get(flat[name]))) for name in expected)
    write_params_checkpoint(out_dir, config, leaves, chunk_bytes=chunk_bytes)


def _tree_dir(folder: Path) -> Path:
    folder = folder.absolute()  # Orbax's metadata reader needs absolute paths
    tree = folder / PARAMS / TREE
    if not (folder / "config.json").is_file() or not tree.is_dir():
        raise PortError(f"{folder}: not a parameter checkpoint (expected config.json and {PARAMS}/{TREE}/)")
    return tree


def read_config(folder: str | os.PathLike):
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise PortError(f"{path}: file not found")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PortError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise PortError(f"{path}: expected a JSON object")
    return ml_collections.ConfigDict(_tuples(value))  # as synermedgen_jax.config.from_json, with tuples back


def _tuples(value):
    """JSON has no tuples; the model configs use them (e.g. vae.ch_mult)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def checkpoint_shapes(folder: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{dotted path: (shape, dtype)}`` from the Orbax metadata (reads no array)."""
    meta = _ocp().PyTreeCheckpointer().metadata(_tree_dir(Path(folder)))
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    return {name: (tuple(m.shape), np.dtype(m.dtype)) for name, m in flatten(tree).items()}


def read_leaves(folder: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named leaves as numpy arrays, in one partial restore (only those arrays are read)."""
    ocp = _ocp()
    shapes = checkpoint_shapes(folder)
    absent = [name for name in names if name not in shapes]
    if absent:
        raise PortError(f"{folder}: {len(absent)} params not in the checkpoint: {', '.join(absent)}")
    item = nest({n: np.zeros(0, shapes[n][1]) for n in names})  # only the structure matters
    args = nest({n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names})
    restored = flatten(ocp.PyTreeCheckpointer().restore(_tree_dir(Path(folder)), args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True)))
    return {n: restored[n] for n in names}


def read_leaves_onto(folder: str | os.PathLike, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """The named leaves, each restored straight onto its target's sharding and cast to its dtype (a process
    reads only the shards its devices hold), in one partial restore."""
    ocp = _ocp()
    if not targets:
        return {}
    item = nest(dict(targets))
    args = nest({n: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype) for n, t in targets.items()})
    restored = flatten(ocp.PyTreeCheckpointer().restore(_tree_dir(Path(folder)), args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True)))
    return {n: restored[n] for n in targets}


def chunk_names(names: Sequence[str], shapes: dict, chunk_bytes: int) -> list[list[str]]:
    """Consecutive groups of ``names`` of about ``chunk_bytes`` each (a group holds at least one name)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        if groups[-1] and size >= chunk_bytes:
            groups.append([])
            size = 0
        shape, dtype = shapes[name]
        groups[-1].append(name)
        size += int(np.prod(shape)) * dtype.itemsize
    return [group for group in groups if group]


def load_params_checkpoint(folder: str | os.PathLike, target: nnx.State | None = None):
    """``(config, state)``: the checkpoint as an ``nnx.State`` ready for ``nnx.update(model, state)``.

    ``target``: an abstract state (leaves ``jax.ShapeDtypeStruct`` with shardings, e.g. from
    ``nnx.state(nnx.eval_shape(...))`` after applying the trainer's shardings): each array is then restored
    directly onto its sharding and cast to its dtype. Without it, leaves come back as numpy arrays as stored.
    """
    ocp = _ocp()
    folder = Path(folder)
    config = read_config(folder)
    tree_dir = _tree_dir(folder)
    state = target if target is not None else K.abstract_state(config)
    flat_target = {K.dotted(path): var for path, var in nnx.to_flat_state(state)}
    stored = checkpoint_shapes(folder)
    problems = [f"{n}: missing" for n in flat_target if n not in stored]
    problems += [f"{n}: unexpected" for n in stored if n not in flat_target]
    for name, var in flat_target.items():
        if name in stored and tuple(var.get_value().shape) != stored[name][0]:
            problems.append(f"{name}: checkpoint {list(stored[name][0])}, model {list(var.get_value().shape)}")
    if problems:
        raise PortError(f"{folder}: checkpoint does not match the target state:\n  " + "\n  ".join(problems))
    checkpointer = ocp.PyTreeCheckpointer()
    if target is None:
        item = nest({n: np.zeros(0, stored[n][1]) for n in flat_target})
        args = nest({n: ocp.RestoreArgs(restore_type=np.ndarray) for n in flat_target})
    else:
        item = nest({n: v.get_value() for n, v in flat_target.items()})
        args = nest({n: ocp.ArrayRestoreArgs(sharding=getattr(v.get_value(), "sharding", None),
                                             dtype=v.get_value().dtype) for n, v in flat_target.items()})
    restored = flatten(checkpointer.restore(tree_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args)))
    leaves = [(path, var.replace(restored[K.dotted(path)])) for path, var in nnx.to_flat_state(state)]
    return config, nnx.from_flat_state(leaves)
