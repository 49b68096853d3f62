"""Orbax checkpoints of training runs, and ``load_model`` for the other commands.

A workdir holds ``<step>/`` folders written by an Orbax ``CheckpointManager`` (async, keep-last-N). Items:
  state     the train state pytree (training/step.py): step, params, frozen, opt, ema, rng
  data      the input iterator state, one JSON file per process (Grain's checkpoint handler)
  config    the full run config as JSON (never pickle)
  manifest  ``{section: {name: [shape, dtype]}}`` of params/frozen/ema, checked before any restore so an
            incompatible checkpoint fails with the mismatching names and shapes; and ``fingerprint``:
            ``{leaf path: uint32}`` of every array of the state (:func:`fingerprints`), compared after a restore
            so flipped bytes in the array data (which zstd and OCDBT do not checksum) are found, not trained on
Orbax writes a step into a temporary folder and renames it when every item is complete, so a save killed
half-way leaves no ``<step>/`` folder and is never restored (``cleanup_tmp_directories`` removes it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from typing import Any

import grain.checkpoint as grain_ckpt
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils.epath import Path  # local paths and gs:// (and other remote) workdirs alike
from flax import nnx

from synermedgen_jax.config import from_json, to_json
from synermedgen_jax.stages import Stage

SECTIONS = ("params", "frozen", "ema")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (missing, incomplete or incompatible)."""


class CheckpointContentError(CheckpointError):
    """A step whose arrays differ from the fingerprints saved with them (readers fall back past it)."""

    def __init__(self, message: str, workdir: Path, step: int):
        super().__init__(message)
        self.workdir, self.step = workdir, step


class _QuietReadOnly(logging.Filter):
    """Orbax warns "Given directory is read only" (and about its save interval) on every read-only manager, and
    "Metadata file does not exist" on every read of a parameter checkpoint (``partial.save`` writes none): that
    is how loads open a checkpoint, not a problem, so those lines are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Given directory is read only", "CheckpointManagerOptions.read_only",
                                               "Metadata file does not exist"))


logging.getLogger("absl").addFilter(_QuietReadOnly())


def manager(workdir: str | Path, train, *, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(train.keep) if train is not None else None,
        enable_async_checkpointing=bool(train.async_checkpoint) if train is not None else False,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    host_gb = int(train.get("checkpoint_host_gb", 0)) if train is not None else 0
    # Bounds the host buffers a save or restore stages at once (per process), so it does not grow with the state.
    limits = dict(save_concurrent_gb=host_gb, restore_concurrent_gb=host_gb,
                  save_device_host_concurrent_gb=host_gb) if host_gb > 0 else {}
    handlers = {"state": ocp.PyTreeCheckpointHandler(**limits), "data": grain_ckpt.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(), "manifest": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(workdir).absolute(), options=options, item_handlers=handlers)


def manifest_of(state: dict) -> dict:
    return {section: {name: [list(np.shape(v)), str(np.dtype(v.dtype))] for name, v in state[section].items()}
            for section in SECTIONS}


def check_compatible(saved: dict, expected: dict, *, what: str, sections=SECTIONS) -> None:
    """Raises CheckpointError naming every parameter whose presence or shape differs."""
    problems = []
    for section in sections:
        have, want = saved.get(section, {}), expected.get(section, {})
        for name in sorted(set(have) | set(want)):
            if name not in have:
                problems.append(f"{section}.{name}: missing in checkpoint (expected shape {want[name][0]})")
            elif name not in want:
                problems.append(f"{section}.{name}: in checkpoint (shape {have[name][0]}) but not in this model")
            elif list(have[name][0]) != list(want[name][0]):
                problems.append(f"{section}.{name}: checkpoint shape {have[name][0]} != model shape {want[name][0]}")
    if problems:
        shown = "\n  ".join(problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise CheckpointError(f"{what} does not match this config ({len(problems)} mismatches):\n  {shown}{more}")


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_iter: Any, config, *, force: bool = False
         ) -> bool:
    """Saves ``state`` (with its fingerprints in the manifest), the iterator and the config as ``step``. A
    failed write (a full disk, a read-only file system) raises an OSError naming the step folder and the errno;
    Orbax writes into a temporary folder, so the steps already saved stay as they were."""
    manifest = {**manifest_of(state), "fingerprint": fingerprints(state)}
    args = {"state": ocp.args.PyTreeSave(state), "config": ocp.args.JsonSave(json.loads(to_json(config))),
            "manifest": ocp.args.JsonSave(manifest)}
    if data_iter is not None:
        args["data"] = grain_ckpt.CheckpointSave(data_iter)
    with _naming_write_errors(mngr, step):
        return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def free_space_problem(workdir: str | Path, state: Any) -> str | None:
    """Whether the disk of a local ``workdir`` lacks room for one more checkpoint of ``state`` (arrays or
    ``ShapeDtypeStruct``s; Orbax removes the oldest step only after a save completes), with 5 % + 64 MiB to
    spare for metadata and logs: a one-line reason, found before any work, or None."""
    import shutil

    if "://" in str(workdir):
        return None  # remote storage has no disk to ask
    need = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
    need = int(need * 1.05) + 64 * 2**20
    folder = Path(workdir).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    free = shutil.disk_usage(str(folder)).free
    if free >= need:
        return None
    return (f"{workdir}: only {free / 2**20:.0f} MiB free on its disk; a checkpoint of this state needs about "
            f"{need / 2**20:.0f} MiB (a save would fail with ENOSPC): free space or use another --workdir")


def wait_until_finished(mngr: ocp.CheckpointManager) -> None:
    """Waits for an async save; its failed write raises an OSError naming the workdir and the errno."""
    with _naming_write_errors(mngr, None):
        mngr.wait_until_finished()


@contextlib.contextmanager
def _naming_write_errors(mngr: ocp.CheckpointManager, step: int | None):
    """Re-raises an OSError of a save that has no path (Orbax and TensorStore drop it) with the step folder, and
    a TensorStore error that wraps one (``... [OS error 28: No space left on device]``) as that OSError."""
    where = str(mngr.directory) + ("" if step is None else f"/{step}")
    try:
        yield
    except OSError as err:
        if err.filename:
            raise
        raise OSError(err.errno, err.strerror or str(err), where) from err
    except Exception as err:
        number = _wrapped_errno(err)
        if number is None:
            raise
        raise OSError(number, os.strerror(number), where) from err


def _wrapped_errno(err: BaseException) -> int | None:
    """The errno of the OS error a TensorStore/Orbax exception reports in its text (``OS error 28``,
    ``[Errno 28]``, ``No space left on device``), else None."""
    import re

    text = str(err)
    match = re.search(r"(?:OS error|Errno)[^0-9]{0,3}(\d+)", text)
    if match:
        return int(match.group(1))
    for number in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES):
        if os.strerror(number) in text:
            return number
    return None


# ------------------------------------------------------------------------------------------------------------
# Content fingerprints: one uint32 per array, from its bits, computed on device (no host copy of the state).
_GOLDEN = 2654435761  # Knuth's multiplicative hash constant: odd, so every element's weight below is odd


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """``uint32 []``: sum over elements of ``bits(x[i]) * (i * GOLDEN | 1)`` modulo 2**32, for an array of any
    shape and dtype. Each weight is odd, so any change of one element changes the sum; a change of several
    cancels with probability ~2**-32. Integer arithmetic modulo 2**32 is associative, so the value does not
    depend on the sharding or the order of the reduction. The flat index is built from per-axis iotas (no
    reshape, which would move a sharded array)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = x.dtype.itemsize
    if width > 4:  # 64-bit values (with x64): their two 32-bit halves, a trailing axis of 2
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width])
        bits = bits.astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    weight = (index * jnp.uint32(_GOLDEN)) | jnp.uint32(1)
    return jnp.sum(bits * weight, dtype=jnp.uint32)


@jax.jit
def _fingerprint_leaves(leaves: list) -> list:
    return [_leaf_fingerprint(x) for x in leaves]


def fingerprints(tree: Any) -> dict[str, int]:
    """``{jax.tree_util.keystr(path): uint32}`` of every array leaf of ``tree`` (one jitted pass on the arrays'
    own devices; a scalar per leaf comes back)."""
    flat = [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(leaf, "dtype")]
    if not flat:
        return {}
    values = jax.device_get(_fingerprint_leaves([jnp.asarray(leaf) for _, leaf in flat]))
    return {name: int(value) for (name, _), value in zip(flat, values, strict=True)}


def content_problem(restored: Any, saved_manifest: dict, *, prefix: str = "") -> str | None:
    """Which restored arrays differ from the fingerprints saved with them (None: all equal, or a checkpoint
    saved before fingerprints existed). ``prefix``: the key path of ``restored`` inside the saved state."""
    expected = saved_manifest.get("fingerprint") or {}
    if not expected:
        return None
    got = fingerprints(restored)
    bad = [name for name, value in got.items() if prefix + name in expected and expected[prefix + name] != value]
    if not bad:
        return None
    return (f"{len(bad)} restored array(s) differ from the checksums saved with them (flipped bytes in the array "
            f"data), e.g. {', '.join(prefix + n for n in bad[:3])}")


def _abstract(tree: Any) -> Any:
    def leaf(x):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(leaf, tree)


def _restore_args(target: dict, data_iter: Any) -> dict:
    """Composite restore arguments: ``state`` onto ``target``'s shapes and shardings, and the iterator if given."""
    abstract = _abstract(target)
    args = {"state": ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
        abstract))}
    if data_iter is not None:
        args["data"] = grain_ckpt.CheckpointRestore(data_iter)
    return args


def restore(mngr: ocp.CheckpointManager, step: int, target: dict, data_iter: Any) -> dict:
    """Restores ``state`` (onto ``target``'s shardings, so a different mesh reshards) and the iterator."""
    saved = mngr.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))["manifest"]
    check_compatible(saved, manifest_of(target), what=f"checkpoint {mngr.directory}/{step}")
    args = _restore_args(target, data_iter)
    return mngr.restore(step, args=ocp.args.Composite(**args))["state"]


def restore_newest(mngr: ocp.CheckpointManager, target: dict, data_iter: Any, *, log=None
                   ) -> tuple[int, dict, list[tuple[int, str]]]:
    """``(step, state, [(newer damaged step, problem), ...])``: the newest step of ``mngr``'s workdir that passes
    :func:`step_problem`, restores without error and whose arrays equal their saved fingerprints. Each damaged
    step is reported through ``log`` (default stderr) naming the step and what failed, and the next older one
    is tried (the iterator is restored again from it). A config mismatch is not damage: a CheckpointError at
    once. None restorable: a CheckpointError naming every step."""
    import sys

    workdir = Path(mngr.directory)
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    damaged: list[tuple[int, str]] = []
    for step in _steps(workdir):
        problem = step_problem(workdir, step)
        state = None
        if problem is None:
            state, problem = _try_restore(mngr, step, target, data_iter)
        if problem is None:
            if damaged:
                log(f"warning: using checkpoint step {step} of {workdir} (newer step(s) "
                    f"{', '.join(str(s) for s, _ in damaged)} damaged)")
            return step, state, damaged
        damaged.append((step, problem))
        log(f"warning: checkpoint step {step} of {workdir} is damaged: {problem}")
    raise CheckpointError(f"{workdir}: no readable checkpoint; "
                          + "; ".join(f"step {s}: {p}" for s, p in damaged))


def _try_restore(mngr: ocp.CheckpointManager, step: int, target: dict, data_iter: Any
                 ) -> tuple[dict | None, str | None]:
    """``(state, None)`` or ``(None, what failed)`` for one step (see :func:`restore_newest`)."""
    folder = Path(mngr.directory) / str(step)
    try:
        saved = mngr.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))["manifest"]
        failure = None
    except Exception as err:  # noqa: BLE001 (whatever the reader raises, the step cannot be used)
        saved, failure = None, f"{folder / 'manifest'}: unreadable ({type(err).__name__}: {_first_line(err)})"
    if not _everywhere(failure is None):
        return None, failure or "another process could not read this step's manifest"
    check_compatible(saved, manifest_of(target), what=f"checkpoint {folder}")
    args = _restore_args(target, data_iter)
    try:
        state, failure = mngr.restore(step, args=ocp.args.Composite(**args))["state"], None
    except Exception as err:  # noqa: BLE001 (TensorStore, zstd, Grain and Orbax errors alike)
        state, failure = None, f"{folder}: restore failed ({type(err).__name__}: {_first_line(err)})"
    if not _everywhere(failure is None):  # every process takes the same step (fingerprints are collectives)
        return None, failure or "another process could not restore this step"
    problem = content_problem(state, saved)
    return (None, f"{folder}/state: {problem}") if problem else (state, None)


def _everywhere(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (a host all-gather when there are several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([ok], np.bool_))))


def resolve(path: str | Path, *, log=None) -> tuple[Path, int]:
    """A workdir (its newest readable step) or a step directory -> ``(workdir, step)``.

    A workdir's newest step is verified first (:func:`step_problem`); a damaged one is reported through
    ``log`` (default: a ``warning:`` line on stderr) naming the step and the file, and the next older readable
    step is used. A step directory that is damaged, or a workdir without any readable step, is a one-line
    :class:`CheckpointError` naming the step(s), never a silent fall back to step 0.
    """
    path = Path(path)
    if path.name.isdigit() and path.parent.is_dir() and ((path / "state").is_dir() or not _steps(path)):
        problem = step_problem(path.parent, int(path.name))
        if problem:
            raise CheckpointError(f"checkpoint step {path.name} is damaged: {problem}")
        return path.parent, int(path.name)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    steps = _steps(path)
    if not steps:
        raise CheckpointError(f"{path} holds no complete checkpoint")
    steps = [s for s in steps if (str(path), s) not in _BAD_CONTENT]
    if not steps:
        raise CheckpointError(f"{path}: no readable checkpoint; the arrays of step(s) "
                              f"{', '.join(str(s) for w, s in sorted(_BAD_CONTENT) if w == str(path))} differ "
                              "from the checksums saved with them")
    step, _ = newest_readable_step(path, steps, log=log)
    return path, step


# ------------------------------------------------------------------------------------------------------------
# Damaged checkpoints: a cheap verification (no array is read) of a step's metadata and of every byte range
# its OCDBT b-tree references, so a truncated or missing file is found before a restore and named.
_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "manifest/metadata", "config/metadata")
_REPORTED: set[tuple[str, int]] = set()
_BAD_CONTENT: set[tuple[str, int]] = set()  # (workdir, step) whose restored arrays failed their fingerprints


def _steps(workdir: Path) -> list[int]:
    return sorted((int(p.name) for p in workdir.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True)


def _first_line(err: BaseException) -> str:
    """The innermost cause's message, one line (TensorStore's names the array and the file)."""
    seen = err
    while (seen.__cause__ or seen.__context__) is not None and seen not in (seen.__cause__, seen.__context__):
        seen = seen.__cause__ or seen.__context__
    text = (str(seen).strip().splitlines() or [type(seen).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _strings(node):
    """Every string inside a JSON-like value (an OCDBT ``dump`` result)."""
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _kvstore_spec(folder: Path) -> dict | str:
    """TensorStore's view of a folder: the file driver here, the URL itself (``gs://…``) for remote storage."""
    text = str(folder)
    return text.rstrip("/") + "/" if "://" in text else {"driver": "file", "path": str(folder.absolute()) + "/"}


def _ocdbt_problem(state_dir: Path) -> str | None:
    """Walks the OCDBT b-tree of ``state_dir`` and checks each referenced file holds the referenced bytes."""
    import re

    import tensorstore as ts

    ref = re.compile(r"^(btreenode|value):([^:]*):([^:]+):(\d+):(\d+)$")
    try:
        kvstore = ts.KvStore.open(_kvstore_spec(state_dir)).result()
        pending = [ts.ocdbt.dump(kvstore).result()]
        while pending:
            for text in _strings(pending.pop()):
                match = ref.match(text)
                if not match:
                    continue
                kind, prefix, name, offset, length = match.groups()
                file = state_dir / prefix / name
                size = file.stat().length if file.is_file() else None
                if size is None:
                    return f"{file}: missing (referenced by the OCDBT index)"
                if size < int(offset) + int(length):
                    return f"{file}: truncated ({size} bytes, the index needs {int(offset) + int(length)})"
                if kind == "btreenode":
                    pending.append(ts.ocdbt.dump(kvstore, text).result())
    except Exception as err:  # TensorStore raises ValueError subclasses naming the file
        return f"{state_dir}: unreadable OCDBT index ({_first_line(err)})"
    return None


def step_problem(workdir: str | Path, step: int) -> str | None:
    """What makes ``workdir/step`` unreadable, naming the file (``None``: it can be restored). Cheap: reads the
    metadata JSON files and the OCDBT index, never an array."""
    folder = Path(workdir) / str(step)
    if not folder.is_dir():
        return f"{folder}: missing"
    for item in ("state", "manifest", "config"):
        if not (folder / item).is_dir():
            return f"{folder / item}/: missing"
    problem = _data_files_problem(folder)
    if problem:
        return problem
    files = [folder / name for name in _JSON_FILES] + sorted((folder / "data").glob("*.json"))
    for file in files:
        try:
            json.loads(file.read_text())
        except FileNotFoundError:
            return f"{file}: missing"
        except (OSError, ValueError) as err:
            return f"{file}: not readable JSON ({_first_line(err)})"
    if not (folder / "state" / "manifest.ocdbt").is_file():
        return f"{folder / 'state' / 'manifest.ocdbt'}: missing"
    return _ocdbt_problem(folder / "state")


def _data_files_problem(folder: Path) -> str | None:
    """The data-iterator item (one ``process_<i>-of-<n>.json`` per process, Grain's handler): present when the
    step's metadata lists it, with every process's file."""
    import re

    try:
        items = json.loads((folder / "_CHECKPOINT_METADATA").read_text()).get("item_handlers") or {}
    except (OSError, ValueError):
        items = {}  # reported by the JSON check that follows
    data = folder / "data"
    if "data" not in items and not data.is_dir():
        return None  # saved without an iterator
    if not data.is_dir():
        return f"{data}/: missing (the data-iterator state)"
    names = [p.name for p in data.iterdir()]
    counts = {int(m.group(2)) for m in (re.fullmatch(r"process_(\d+)-of-(\d+)\.json", n) for n in names) if m}
    if not counts:
        return f"{data}/process_<i>-of-<n>.json: missing (the data-iterator state)"
    count = max(counts)
    for index in range(count):
        if f"process_{index}-of-{count}.json" not in names:
            return f"{data / f'process_{index}-of-{count}.json'}: missing (the data-iterator state)"
    return None


def newest_readable_step(workdir: str | Path, steps: list[int] | None = None, *, log=None
                         ) -> tuple[int, list[tuple[int, str]]]:
    """``(newest step without a problem, [(newer damaged step, problem), ...])``; each damaged step is
    reported once per process through ``log`` (default: stderr). None readable: a CheckpointError."""
    import sys

    workdir = Path(workdir)
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    damaged = []
    for step in sorted(_steps(workdir) if steps is None else steps, reverse=True):
        problem = step_problem(workdir, step)
        if problem is None:
            if damaged and (str(workdir), step) not in _REPORTED:
                _REPORTED.add((str(workdir), step))
                log(f"warning: using checkpoint step {step} of {workdir} (newer step(s) "
                    f"{', '.join(str(s) for s, _ in damaged)} damaged)")
            return step, damaged
        damaged.append((step, problem))
        if (str(workdir), -step - 1) not in _REPORTED:
            _REPORTED.add((str(workdir), -step - 1))
            log(f"warning: checkpoint step {step} of {workdir} is damaged: {problem}")
    raise CheckpointError(f"{workdir}: no readable checkpoint; "
                          + "; ".join(f"step {s}: {p}" for s, p in damaged))


def set_aside_damaged(workdir: str | Path, steps: list[int], *, log=None) -> None:
    """Renames damaged step folders to ``damaged-<step>[-n]`` (kept for inspection, ignored by Orbax) so a
    resumed run can save those steps again."""
    workdir = Path(workdir)
    for step in steps:
        target = workdir / f"damaged-{step}"
        n = 1
        while target.exists():
            target, n = workdir / f"damaged-{step}-{n}", n + 1
        (workdir / str(step)).rename(target)
        if log:
            log(f"moved the damaged checkpoint {workdir / str(step)} to {target}")


def read_config(path: str | Path) -> ml_collections.ConfigDict:
    workdir, step = resolve(path)
    return from_json((workdir / str(step) / "config" / "metadata").read_text())


def _restore_sections(path: str | Path, targets: dict, sections: tuple[str, ...]) -> dict[str, dict]:
    """``{section: {name: array}}`` of a training checkpoint, each array restored onto its target (a
    ``jax.ShapeDtypeStruct`` with a sharding) and cast to its dtype; ``targets`` is ``{section: {name: target}}``."""
    workdir, step = resolve(path)
    mngr = manager(workdir, None, read_only=True)
    try:
        target = {section: dict(targets[section]) for section in sections if targets.get(section)}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=restore_args, partial_restore=True)))["state"] if target else {}
    finally:
        mngr.close()
    return {section: dict(state.get(section, {})) for section in sections}


def _manifest_and_config(path: str | Path) -> tuple[dict, dict]:
    workdir, step = resolve(path)
    mngr = manager(workdir, None, read_only=True)
    try:
        saved = mngr.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore(),
                                                             config=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    return saved["manifest"], saved["config"]


def read_model_config(path: str | Path) -> ml_collections.ConfigDict:
    """The model config of a training workdir / step directory or of what ``import`` writes."""
    if is_params_checkpoint(path):
        from synermedgen_jax.port import orbax_io

        return orbax_io.read_config(path)
    return read_config(path).model


def is_params_checkpoint(path: str | Path) -> bool:
    """A parameter checkpoint as ``import`` writes it (port/orbax_io.py), not a training workdir."""
    path = Path(path)
    return (path / "config.json").is_file() and (path / "params").is_dir()


def read_weights(path: str | Path, targets: dict[str, jax.ShapeDtypeStruct], *, ema: bool = False
                 ) -> dict[str, jax.Array]:
    """Weights by dotted name from a training workdir / step directory or from what ``import`` writes, each
    read straight onto its target's sharding and cast to its dtype (a process reads only its own shards).

    ``targets``: ``{name: jax.ShapeDtypeStruct(shape, dtype, sharding=...)}``. Names the checkpoint lacks are
    absent from the result; a shape that differs raises :class:`CheckpointError` naming every mismatch.
    ``ema``: from a training checkpoint that kept an EMA, take the EMA of the trained parameters.
    """
    if is_params_checkpoint(path):
        from synermedgen_jax.port import orbax_io

        stored = orbax_io.checkpoint_shapes(path)
        _check_shapes(path, {n: s for n, (s, _) in stored.items()}, targets)
        return orbax_io.read_leaves_onto(path, {n: t for n, t in targets.items() if n in stored})
    manifest, _ = _manifest_and_config(path)
    where: dict[str, dict] = {section: {} for section in SECTIONS}
    for name, target in targets.items():
        section = next((s for s in (("ema",) if ema else ()) + ("params", "frozen") if name in manifest.get(s, {})),
                       None)
        if section is not None:
            where[section][name] = target
    _check_shapes(path, {n: manifest[s][n][0] for s in SECTIONS for n in where[s]}, targets)
    restored = _restore_sections(path, where, SECTIONS)
    # Arrays read in their saved dtype are compared with the fingerprints saved with them (a cast one cannot be).
    same = {section: {name: value for name, value in restored[section].items()
                      if str(value.dtype) == manifest[section][name][1]} for section in SECTIONS}
    problem = content_problem(same, manifest)
    if problem:
        workdir, step = resolve(path)
        raise CheckpointContentError(f"checkpoint step {step} of {workdir} is damaged: {workdir / str(step)}/state: "
                                     f"{problem}", workdir, step)
    return {name: value for section in SECTIONS for name, value in restored[section].items()}


def _check_shapes(path, stored: dict[str, tuple], targets: dict[str, jax.ShapeDtypeStruct]) -> None:
    problems = [f"{name}: checkpoint {list(stored[name])} != model {list(target.shape)}"
                for name, target in targets.items() if name in stored and tuple(stored[name]) != tuple(target.shape)]
    if problems:
        raise CheckpointError(f"{path}: shape mismatches ({len(problems)}):\n  " + "\n  ".join(problems[:40]))


def model_targets(model: nnx.Module, mesh=None) -> dict[str, jax.ShapeDtypeStruct]:
    """``{name: ShapeDtypeStruct}`` of every variable of an (abstract) model, placed by the logical-axis rules
    on ``mesh`` or on this process's first device."""
    from synermedgen_jax import sharding as sharding_lib
    from synermedgen_jax.training.step import path_name

    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        where = single if mesh is None else sharding_lib.named_sharding(
            mesh, variable.get_metadata().get("logical_axes"), value.shape)
        targets[path_name(path)] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=where)
    return targets


def imported_run_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A run config for a parameter checkpoint (``import``'s output), which holds a model config only: no data
    folder, seed 0, and square slot sizes from the official inference rules fitted to the model's position
    tables (``inference/loading.py`` applies the rules themselves per input)."""
    from synermedgen_jax.data.geometry import inference_rules

    vae_rule, vit_rule = inference_rules(model_config)
    return ml_collections.ConfigDict({
        "stage": Stage.IMPORTED.value, "model": model_config, "train": {"seed": 0},
        "data": {"dir": "", "pack": {"image_size": vae_rule.size_for(1, 1), "vit_image_size": vit_rule.size_for(1, 1)}},
    })


def load_model(path: str, *, ema: bool = True, mesh=None) -> tuple[ml_collections.ConfigDict, Any]:
    """``(run config, SynerMedGen)`` from a workdir (latest checkpoint), a step directory or what ``import``
    writes (its run config is then :func:`imported_run_config`).

    The model is built abstractly and every weight is read straight onto its sharding (``mesh``: the logical
    rules' placement; default this process's first device), so no host copy of the whole model is made. With
    ``ema=True`` the EMA of the trained parameters replaces them when the run kept one. Stage-0 (VAE)
    checkpoints return a model whose ``vae`` holds the trained autoencoder and whose other parts are random.
    A workdir step whose arrays differ from their saved fingerprints is named in a warning and the next older
    step is read; a named step directory that does is a CheckpointError.
    """
    while True:
        try:
            return _load_model(path, ema=ema, mesh=mesh)
        except CheckpointContentError as err:
            named_step = Path(path).name.isdigit() and (Path(path) / "state").is_dir()
            if named_step:  # the user named this step: no other one will do
                raise
            import sys

            _BAD_CONTENT.add((str(err.workdir), err.step))  # resolve() now passes over it
            print(f"warning: {err}; trying the next older step", file=sys.stderr, flush=True)


def _load_model(path: str, *, ema: bool, mesh) -> tuple[ml_collections.ConfigDict, Any]:
    from synermedgen_jax.kernels.dispatch import resolve_kernels
    from synermedgen_jax.modeling.synermedgen import build_model

    config = imported_run_config(read_model_config(path)) if is_params_checkpoint(path) else read_config(path)
    # The run's kernel request ("auto") resolved for this machine, as train did for the machine that trained it.
    config.model = resolve_kernels(config.model, mesh_shape=None if mesh is None else dict(mesh.shape))
    make_model = lambda: build_model(config.model, seed=int(config.train.seed))  # noqa: E731
    model = make_model() if config.stage == Stage.VAE else nnx.eval_shape(make_model)
    targets = model_targets(model, mesh)
    if config.stage == Stage.VAE:
        targets = {n: t for n, t in targets.items() if n.startswith("vae.")}
    weights = read_weights(path, targets, ema=ema)
    missing = sorted(set(targets) - set(weights))
    if missing:
        raise CheckpointError(f"checkpoint {path} does not match this config: {len(missing)} weights missing, "
                              f"e.g. {missing[:5]}")
    state = nnx.state(model)
    for p, variable in nnx.to_flat_state(state):
        name = ".".join(str(part) for part in p)
        if name in weights:
            variable.set_value(weights[name])
    nnx.update(model, state)
    return config, model
