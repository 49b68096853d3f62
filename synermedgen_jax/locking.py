"""Output locks and writability checks, taken by ``__main__`` for every command before it runs.

A writer (train, build-data, import, export, synthesize, quickstart, ablate) holds ``.<name>.lock`` beside its
output (``runs/.s1.lock`` for ``--workdir runs/s1``): a file holding ``{pid, host, command, started}`` under an
exclusive ``flock``. The kernel drops the flock when its process dies, however it dies, so:
  * a second writer finds the flock taken and is refused in one line naming the holder (pid, host, command);
  * a lock file whose flock is free was left by a process that died without removing it; on this host, with
    that pid no longer running, it is taken over with a warning. One written on another host is refused (its
    host cannot be asked whether the process lives) with the file to delete named.
Every output (folders and files, locked or not) is also probed before any work: a temporary file created and
removed in the output (or its nearest existing parent) says whether writes will succeed, so a read-only path,
a full quota or an output under a file is one line, exit status 2, and nothing is created.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from synermedgen_jax.staging import pid_alive


class OutputError(Exception):
    """An output that cannot be written or is held by another writer: one line, exit status 2."""


@dataclass(frozen=True)
class Output:
    """One output argument of a command: ``attr`` on the parsed args, ``flag`` as the user typed it, ``lock``:
    whether a second writer must be refused."""

    attr: str
    flag: str
    lock: bool


# command -> its outputs (the command files own their writes; this table is the one place that names them)
OUTPUTS: dict[str, tuple[Output, ...]] = {
    "train": (Output("workdir", "--workdir", True),),
    "build-data": (Output("out", "--out", True), Output("contact_sheet", "--contact-sheet", False)),
    "import": (Output("out", "--out", True),),
    "export": (Output("out", "--out", True),),
    "synthesize": (Output("output", "--output", True), Output("output_dir", "--output-dir", True)),
    "quickstart": (Output("workdir", "--workdir", True),),
    "ablate": (Output("workdir", "--workdir", True),),
    "eval": (Output("out", "--out", False),),
    "bench": (Output("json", "--json", False),),
    "plan": (Output("json", "--json", False),),
}

_HELD: list[_Lock] = []  # this process's locks, innermost last (quickstart holds its workdir while train runs)
# Environment variables that give a process's rank under the launchers jax.distributed.initialize() reads.
_RANK_VARIABLES = ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID")


def lock_path(target: Path) -> Path:
    """The lock file of ``target``: a hidden sibling, so replacing the output by a rename keeps it."""
    return target.parent / f".{target.name}.lock"


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"({holder.get('command', '?')}, since {holder.get('started', '?')})")


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        holder = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@dataclass
class _Lock:
    target: Path
    path: Path
    fd: int
    depth: int = 1

    def release(self) -> None:
        try:
            self.path.unlink()  # while still holding the flock: nobody can have taken this inode meanwhile
        except OSError:
            pass
        os.close(self.fd)


def _try_flock(fd: int) -> str:
    """``held`` (this process now holds the flock), ``busy`` (another one does) or ``unsupported`` (a file
    system without flock, such as some network mounts: the holder recorded in the file then decides)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return "busy"
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return "unsupported"
        raise
    return "held"


def acquire(target: str | os.PathLike, flag: str, command: str, *, warn=None) -> _Lock:
    """Locks ``target`` for this process (re-entrant within it) or raises :class:`OutputError` naming the
    holder. ``warn``: where the stale-lock warning goes (default stderr)."""
    target = Path(os.path.abspath(target))
    for held in _HELD:
        if held.target == target:
            held.depth += 1
            return held
    path = lock_path(target)
    host = socket.gethostname()
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"{flag} {target}: cannot create its lock file {path} ({describe_os_error(err)})"
                              ) from None
        try:
            state = _try_flock(fd)
            if state == "busy":
                holder = _read_holder(fd)
                raise OutputError(f"{flag} {target} is in use by {_describe(holder)}: one writer at a time "
                                  f"(lock file {path}); wait for it to finish or stop it")
            # Another process may have removed the file between our open and our flock: lock the new one then.
            try:
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            previous = _read_holder(fd)
            if previous and previous.get("pid") != os.getpid():
                if previous.get("host") != host:
                    raise OutputError(f"{flag} {target}: lock file {path} was left by {_describe(previous)}; this "
                                      f"host ({host}) cannot tell whether it still runs: delete the file if not")
                if state == "unsupported" and pid_alive(int(previous.get("pid", 0) or 0)):
                    raise OutputError(f"{flag} {target} is in use by {_describe(previous)}: one writer at a "
                                      f"time (lock file {path}); wait for it to finish or stop it")
                (warn or _stderr)(f"warning: {flag} {target}: took over the stale lock of {_describe(previous)}, "
                                  "which no longer runs (it stopped without releasing it)")
            stamp = {"pid": os.getpid(), "host": host, "command": command,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(stamp).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        lock = _Lock(target, path, fd)
        _HELD.append(lock)
        return lock


def release(lock: _Lock) -> None:
    lock.depth -= 1
    if lock.depth == 0:
        _HELD.remove(lock)
        lock.release()


atexit.register(lambda: release_above(0))  # a normal exit removes the lock files too (a kill leaves them: stale)


def held() -> int:
    """How many locks this process holds (``__main__`` releases those its command took)."""
    return len(_HELD)


def release_above(mark: int) -> None:
    """Releases the locks taken since ``held()`` returned ``mark``, innermost first."""
    while len(_HELD) > mark:
        release(_HELD[-1])


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def describe_os_error(err: OSError) -> str:
    """``No space left on device, errno 28 ENOSPC``: the reason and the errno by number and name."""
    name = errno.errorcode.get(err.errno or 0, "")
    reason = err.strerror or str(err)
    return f"{reason}, errno {err.errno} {name}".rstrip() if err.errno else reason


def writable_problem(target: str | os.PathLike) -> str | None:
    """Why ``target`` (an output file or folder, existing or not) cannot be written, or None. Probes by creating
    and removing a temporary file in it (a folder) or beside it, in its nearest existing parent; creates nothing
    that stays."""
    target = Path(os.path.abspath(target))
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing != target and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if existing == target and target.is_file():
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_APPEND))  # opening for append changes nothing
        except OSError as err:
            return f"not writable ({describe_os_error(err)})"
        existing = target.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".synermedgen-probe-", dir=existing)
    except OSError as err:
        return f"cannot write in {existing} ({describe_os_error(err)})"
    os.close(fd)
    os.unlink(probe)
    return None


def _rank(args: argparse.Namespace) -> int:
    """This process's rank in a multi-process train (0 alone): only rank 0 writes the workdir's shared files."""
    if getattr(args, "coordinator", None) and getattr(args, "process_id", None) is not None:
        return int(args.process_id)
    if getattr(args, "distributed", "off") == "auto":
        for name in _RANK_VARIABLES:
            if os.environ.get(name, "").isdigit():
                return int(os.environ[name])
    return 0


def claim_outputs(command: str, args: argparse.Namespace, *, warn=None) -> None:
    """Checks every output of ``command`` is writable and locks the ones a second writer must not share;
    raises :class:`OutputError` (one line) otherwise. Remote outputs (``gs://…``) are left to their store."""
    values = {output.attr: getattr(args, output.attr, None) for output in OUTPUTS.get(command, ())}
    claim(command, values, rank=_rank(args), warn=warn)


def claim(command: str, values: dict[str, object], *, rank: int = 0, warn=None) -> None:
    """``claim_outputs`` for a command called as a function: ``values`` maps each output's ``attr`` (OUTPUTS)
    to its path (missing or None: not written)."""
    for output in OUTPUTS.get(command, ()):
        value = values.get(output.attr)
        if not value or "://" in str(value):
            continue
        problem = writable_problem(value)
        if problem:
            raise OutputError(f"{output.flag} {value}: {problem}")
        if output.lock and rank == 0:
            acquire(value, output.flag, command, warn=warn)
