"""Staging folders beside an output: ``.<name>.<tag>-<pid>``, renamed into place only when complete.

Builds (``build-data``) and conversions (``import``, ``export``) write into such a folder, so a failed or killed
run never leaves a half-written output; the next run clears the folders of processes that no longer exist.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
