"""Record schema, ArrayRecord shard writer/reader, the per-split slice index and atomic JSON files.

One record = one (case, axial slice) with that slice in every modality of the case. Payload: msgpack of
plain types; numpy arrays are ``{"__nd__": [dtype, shape], "b": raw bytes}`` and bit masks are
``{"__bits__": shape, "b": packbits bytes}``. Nothing is pickled: decoding never runs code.

Fields: ``schema``, ``dataset``, ``anatomy``, ``group``, ``case_id``, ``patient_id``, ``split``,
``slice_index``, ``depth`` (slices in the volume), ``spacing`` [3] mm, ``geometry`` (see
``volumes.SliceGeometry``), ``modalities`` [names], ``norm`` {modality: {kind, lo, hi}}, ``images``
{modality: float16/float32 [S, S] in [-1, 1]}, ``mask`` bool [S, S], ``foreground`` (fraction),
``routes`` [[source, target], ...].

Files of a build (``out/``): ``records/<split>-NNNNN.array_record`` shards, ``records/<split>.index.json``
(per-record metadata without images, the input of the understanding instances), ``instances/``,
``tokenizer.json``, ``manifest.json``, ``skipped.jsonl``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import grain
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image

from synermedgen_jax.staging import StagedFile, atomic_path, write_atomic

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
SHARD_SUFFIX = ".array_record"


def _pack_default(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype == np.bool_:
            return {"__bits__": list(obj.shape), "b": np.packbits(obj.ravel()).tobytes()}
        if obj.dtype.kind not in "fiu":
            raise TypeError(f"cannot store numpy dtype {obj.dtype} in a record")
        arr = np.ascontiguousarray(obj)
        return {"__nd__": [arr.dtype.str, list(arr.shape)], "b": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a record")


def _unpack_hook(obj: dict):
    if "__nd__" in obj:
        dtype, shape = obj["__nd__"]
        return np.frombuffer(obj["b"], dtype=np.dtype(dtype)).reshape(shape)
    if "__bits__" in obj:
        shape = obj["__bits__"]
        n = int(np.prod(shape))
        return np.unpackbits(np.frombuffer(obj["b"], np.uint8), count=n).astype(bool).reshape(shape)
    return obj


def encode_record(record: Mapping) -> bytes:
    return msgpack.packb(dict(record), default=_pack_default, use_bin_type=True)


def decode_record(payload: bytes) -> dict:
    record = msgpack.unpackb(payload, object_hook=_unpack_hook, raw=False, strict_map_key=False)
    if not isinstance(record, dict) or record.get("schema") != SCHEMA_VERSION:
        found = record.get("schema") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"record schema {found!r} is not the supported version {SCHEMA_VERSION}")
    return record


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | Path, obj, *, indent: int | None = 2) -> None:
    """``obj`` as JSON, written atomically (``staging.write_atomic``); missing parent folders are made."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """``text`` written atomically (``staging.write_atomic``); missing parent folders are made."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


def write_png(path: str | Path, pixels: np.ndarray) -> None:
    """``pixels``: ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB) uint8, written atomically as a PNG (parents made)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG")


class ShardWriter:
    """Writes records of one split to rolling ArrayRecord shards ``<split>-NNNNN.array_record``.

    Each shard is written under a temporary name and renamed when complete, so a crash never leaves a
    truncated shard under a final name. ``close()`` returns ``[{"file", "records", "sha256"}]``.
    """

    def __init__(self, directory: str | Path, split: str, records_per_shard: int = 1000):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.records_per_shard = int(records_per_shard)
        self.shards: list[dict] = []
        self.count = 0
        self._writer = None
        self._staged: StagedFile | None = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}{SHARD_SUFFIX}"
        self._staged = StagedFile(self.directory / name)
        # group_size:1 keeps every record its own chunk: cheapest random access.
        self._writer = ArrayRecordWriter(str(self._staged.tmp), "group_size:1")
        self._in_shard = 0

    def _finish(self) -> None:
        self._writer.close()
        self._staged.commit()
        final = self._staged.path
        self.shards.append({"file": f"{self.directory.name}/{final.name}", "records": self._in_shard,
                            "sha256": sha256_file(final)})
        self._writer, self._staged = None, None

    def write(self, payload: bytes) -> int:
        """Appends one encoded record; returns its index within the split."""
        if self._writer is None:
            self._open()
        self._writer.write(payload)
        self._in_shard += 1
        self.count += 1
        if self._in_shard >= self.records_per_shard:
            self._finish()
        return self.count - 1

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._staged.discard()
            self._writer, self._staged = None, None


def shard_paths(data_dir: str | Path, split: str) -> list[Path]:
    """The split's shards in index order (record ``i`` of the split is in the concatenation)."""
    manifest_path = Path(data_dir) / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        return [Path(data_dir) / s["file"] for s in manifest["shards"].get(split, [])]
    return sorted((Path(data_dir) / "records").glob(f"{split}-*{SHARD_SUFFIX}"))


class RecordReader:
    """Random access to the decoded records of one split (``grain`` ``ArrayRecordDataSource`` underneath)."""

    def __init__(self, data_dir: str | Path, split: str):
        paths = shard_paths(data_dir, split)
        if not paths:
            raise FileNotFoundError(f"{data_dir}: no record shards for split {split!r}")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{data_dir}: manifest lists missing shards: {', '.join(missing)}")
        self.source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return decode_record(self.source[int(index)])

    def raw(self, index: int) -> bytes:
        return self.source[int(index)]


class ShardError(ValueError):
    """A record shard that the data pipeline would fail on; the message names the file and the problem."""


# Up to this many shard bytes in all, check_shards compares every shard's sha256 with the manifest (a full read,
# ~1-2 s per GB); above it, each shard is opened and its first and last records decoded (its footer, index and
# two chunks), which catches truncation and most damage without reading a large build at every start.
HASH_LIMIT_BYTES = 4 * 2**30


def check_shards(data_dir: str | Path, *, hash_limit_bytes: int = HASH_LIMIT_BYTES) -> int:
    """Checks every shard ``manifest.json`` lists, at the start of a run rather than at the step that would read
    the damaged record: present, its record count as recorded, and its content (sha256 against the manifest when
    the build is small enough, else its first and last records decoded). Returns the shards checked; raises
    :class:`ShardError` naming the first bad file. A folder without a manifest is left to its reader."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        return 0
    try:
        manifest = json.loads(manifest_path.read_text())
        shards = [dict(s) for group in (manifest.get("shards") or {}).values() for s in group]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as err:
        raise ShardError(f"{manifest_path}: unreadable ({err})") from None
    paths = []
    for shard in shards:
        path = data_dir / str(shard.get("file", ""))
        if not path.is_file():
            raise ShardError(f"{path}: listed in {manifest_path.name} but missing; rebuild the data with build-data")
        paths.append(path)
    full = sum(p.stat().st_size for p in paths) <= hash_limit_bytes
    for shard, path in zip(shards, paths, strict=True):
        if full and shard.get("sha256"):
            if sha256_file(path) != shard["sha256"]:
                raise ShardError(f"{path}: corrupted (its sha256 differs from {manifest_path.name}); rebuild the data "
                                 "with build-data --overwrite")
            continue
        _check_shard_ends(path, shard.get("records"))
    return len(paths)


def _check_shard_ends(path: Path, expected: int | None) -> None:
    """Opens one shard and decodes its first and last records (ShardError naming it on any failure)."""
    try:
        reader = ArrayRecordReader(str(path))
    except Exception as err:  # noqa: BLE001 (the C++ reader raises RuntimeError/ValueError for damage)
        raise ShardError(f"{path}: unreadable record shard ({str(err).splitlines()[0][:160]})") from None
    try:
        count = reader.num_records()
        if expected is not None and count != int(expected):
            raise ShardError(f"{path}: holds {count} records, the manifest says {expected}; rebuild the data")
        for payload in reader.read(sorted({0, count - 1})) if count else ():
            decode_record(payload)
    except ShardError:
        raise
    except Exception as err:  # noqa: BLE001 (Riegeli hash mismatches are RuntimeErrors; msgpack has many types)
        raise ShardError(f"{path}: corrupted record shard ({str(err).splitlines()[0][:160]})") from None
    finally:
        with contextlib.suppress(Exception):  # closing a damaged reader re-raises its damage: reported above
            reader.close()


def load_index(data_dir: str | Path, split: str) -> dict:
    """The per-split slice index written by the builder: columnar lists, one entry per record."""
    path = Path(data_dir) / "records" / f"{split}.index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing slice index (was the build finished?)")
    return json.loads(path.read_text())
