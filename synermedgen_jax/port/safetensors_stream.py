"""Streaming safetensors I/O: read one tensor at a time, write one tensor at a time.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the raw
little-endian buffers; offsets are relative to the end of the header. We read and write it ourselves because
(a) numpy has no bfloat16, so ``safetensors.numpy`` cannot hold the released bf16 weights, and (b) the
library's writers need every tensor in memory at once, while a 7B checkpoint is larger than many machines.
Nothing here unpickles or executes anything from the file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from synermedgen_jax.staging import atomic_path

# safetensors dtype names ↔ numpy dtypes (little-endian). BF16 comes from ml_dtypes (a JAX dependency).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("bool"),
}
_MAX_HEADER = 100 * 2**20  # the reference implementation refuses headers over 100 MB as well


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read; the message names the file and the problem."""


def dtype_name(dtype: np.dtype | str) -> str:
    """numpy dtype (or a name such as ``bf16``/``float32``) → safetensors dtype name."""
    aliases = {"bf16": "BF16", "bfloat16": "BF16", "f32": "F32", "float32": "F32", "f16": "F16", "float16": "F16"}
    if isinstance(dtype, str) and (dtype.lower() in aliases or dtype.upper() in DTYPES):
        return aliases.get(dtype.lower(), dtype.upper())
    dtype = np.dtype(dtype)
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"dtype {dtype} has no safetensors name")


FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int

    @property
    def is_float(self) -> bool:
        """Model weights are floating point; an integer or bool tensor under a weight's name is not one."""
        return self.dtype in FLOAT_DTYPES


class SafetensorsReader:
    """Lazy reader: the header is parsed at open; :meth:`read` loads a single tensor into a fresh array."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close()/__exit__)
        except OSError as err:
            raise SafetensorsError(f"{self.path}: cannot open ({err.strerror})") from err
        try:
            self.metadata, self.tensors = self._parse_header()
        except Exception:
            self._file.close()
            raise

    def _parse_header(self) -> tuple[dict, dict[str, TensorInfo]]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{self.path}: corrupt header length {header_len} (file has {size} bytes)")
        try:
            header = json.loads(self._file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsError(f"{self.path}: header is not valid JSON ({err})") from err
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype, shape = entry["dtype"], tuple(int(s) for s in entry["shape"])
                begin, end = (int(v) for v in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed header entry") from err
            if dtype not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            if end - begin != expected or begin < 0 or data_start + end > size:
                raise SafetensorsError(f"{self.path}: tensor {name!r} ({dtype} {list(shape)}) has byte range "
                                       f"[{begin}, {end}) that does not fit its shape or the file (truncated?)")
            tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, expected)
        self._check_disjoint(tensors)
        return metadata, tensors

    def _check_disjoint(self, tensors: dict[str, TensorInfo]) -> None:
        """Two tensors may not share bytes: the format lays buffers out one after another, and an overlap means
        a corrupt or crafted header whose tensors would alias each other's values."""
        spans = sorted((info.begin, info.begin + info.nbytes, name) for name, info in tensors.items() if info.nbytes)
        for (_, end, name), (begin, _, other) in zip(spans, spans[1:], strict=False):
            if begin < end:
                raise SafetensorsError(f"{self.path}: tensors {name!r} and {other!r} have overlapping byte ranges "
                                       f"(corrupt header)")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new numpy array (bf16 as ``ml_dtypes.bfloat16``)."""
        info = self.tensors[name]
        out = np.empty(info.shape, DTYPES[info.dtype])
        self._file.seek(info.begin)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = self._file.readinto(view)
        if got != info.nbytes:
            raise SafetensorsError(f"{self.path}: tensor {name!r} is truncated ({got} of {info.nbytes} bytes)")
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: name, safetensors dtype, shape and a zero-argument function producing its values."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]


def write_streaming(path: str | os.PathLike, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None,
                    ) -> None:
    """Writes a safetensors file one tensor at a time, atomically (temp file in the same folder + rename).

    Only one produced tensor is alive at a time. A produced array whose shape differs from its spec is an error
    (the header was already written from the specs).
    """
    specs = list(specs)
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        nbytes = int(np.prod(spec.shape, dtype=np.int64)) * DTYPES[spec.dtype].itemsize
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the reference writer pads so that the buffers start 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as out:  # closed before the rename (contexts exit in reverse)
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for spec in specs:
            array = np.asarray(spec.produce())
            if tuple(array.shape) != tuple(spec.shape):
                raise ValueError(f"{path.name}: tensor {spec.name!r} has shape {list(array.shape)}, "
                                 f"expected {list(spec.shape)}")
            array = np.ascontiguousarray(array.astype(DTYPES[spec.dtype], copy=False))
            out.write(memoryview(array.reshape(-1).view(np.uint8)))
            del array
        out.flush()
        os.fsync(out.fileno())
