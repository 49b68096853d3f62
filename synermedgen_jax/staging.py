"""Atomic outputs: every file or folder the project writes appears whole or not at all.

- ``write_atomic(path, text_or_bytes)``: small files (JSON, CSV, reports) through a temp file and a rename.
- ``atomic_path(path)``: a temp name beside ``path`` for writers that need a file name (numpy, Pillow, nibabel,
  tensorboard images); renamed onto ``path`` when the block ends, removed if it raises. ``StagedFile``: the
  same for a writer that stays open across calls (rolling record shards).
- Staging folders ``.<name>.<tag>-<pid>``: builds (``build-data``) and conversions (``import``, ``export``)
  write into one and rename it into place when complete; the next run clears those of dead processes.

The temp names start with a dot and keep the file's suffixes, so a reader globbing ``*.json`` never sees
one and a writer that picks the format from the suffix (``.nii.gz``) still does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` so that a reader sees the old file or the new one, never a part of one."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


class StagedFile:
    """A temp file name beside ``path`` (``.tmp``) for a writer whose life is not one ``with`` block (rolling
    record shards): ``commit()`` renames it onto ``path``, ``discard()`` removes it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = _temp_beside(self.path)

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temp file name beside ``path``; renamed onto ``path`` when the block ends, removed on error."""
    staged = StagedFile(path)
    try:
        yield staged.tmp
        staged.commit()
    finally:
        staged.discard()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clear_stale(out: Path, tag: str) -> None:
    """Removes ``.<out.name>.<tag>-<pid>`` siblings of ``out`` left by dead processes (or by this one)."""
    for stale in out.parent.glob(f".{out.name}.{tag}-*"):
        pid = stale.name.rpartition("-")[2]
        if not pid.isdigit() or not pid_alive(int(pid)) or int(pid) == os.getpid():
            shutil.rmtree(stale, ignore_errors=True)


def staging_folder(out: Path, tag: str) -> Path:
    """The (not yet created) staging folder of this process for ``out``."""
    return out.parent / f".{out.name}.{tag}-{os.getpid()}"
