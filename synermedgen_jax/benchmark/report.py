"""Run metadata, JSON output, console tables and ``--compare`` of two result files.

Every result file carries the environment (device kind and count, jax / flax / jaxlib versions, python,
git commit of the checkout, a hash of the resolved config) so two runs can be told apart and compared.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jaxlib

REPO_ROOT = Path(__file__).resolve().parents[2]


class BenchError(ValueError):
    """Bad input to bench / plan (the commands print it on one line and exit 2)."""


def git_commit() -> str:
    """The checkout's HEAD commit (``+dirty`` when tracked files differ), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_hash(config: Any) -> str:
    """Short stable hash of a ConfigDict (its JSON with sorted keys)."""
    text = config.to_json(sort_keys=True) if hasattr(config, "to_json") else json.dumps(config, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def environment() -> dict:
    devices = jax.devices()
    return {"device_kind": devices[0].device_kind, "platform": devices[0].platform, "device_count": len(devices),
            "process_count": jax.process_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "python": platform.python_version(), "git_commit": git_commit()}


def write_json(path: str | Path, payload: Mapping) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Fixed-width text table; ``columns`` are ``(key, header)``; numbers get 4 significant digits."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_cell(row.get(key)) for key, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,d}"
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return f"{value:g}"
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def gib(n: float | None) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (GiB at most)."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n):,d} B"


# ------------------------------------------------------------------------------------------------------------
def flatten_numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """``{"train.tokens_per_s": 1.2e4, ...}`` for every int/float leaf (bools and strings skipped); list
    items are keyed by their ``name`` field when they have one, else by index."""
    out: dict[str, float] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            out.update(flatten_numbers(value, f"{prefix}{key}."))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            label = value.get("name", i) if isinstance(value, Mapping) else i
            out.update(flatten_numbers(value, f"{prefix}{label}."))
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        out[prefix.rstrip(".")] = float(tree)
    return out


def load_result(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"--compare: no such file: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BenchError(f"--compare: {path} is not JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(data, dict):
        raise BenchError(f"--compare: {path} does not hold a bench or plan result object")
    return data


MISSING = "–"  # a field one of two compared results lacks (a file written before the field existed)


def compare(a: Mapping, b: Mapping, *, skip: Iterable[str] = ("environment.",),
            one_sided: bool = False) -> list[dict]:
    """Rows ``{name, a, b, ratio}`` (ratio = b / a) for the numeric fields both results share; with
    ``one_sided`` also the fields only one holds, the other side and the ratio ``None`` (A's order, then B's)."""
    flat_a, flat_b = flatten_numbers(a), flatten_numbers(b)
    rows = []
    for key in [*flat_a, *(k for k in flat_b if k not in flat_a)]:
        if any(key.startswith(s) for s in skip) or (not one_sided and not (key in flat_a and key in flat_b)):
            continue
        va, vb = flat_a.get(key), flat_b.get(key)
        if va is None or vb is None:
            ratio = None
        else:
            ratio = vb / va if va else (1.0 if vb == va else math.inf)
        rows.append({"name": key, "a": va, "b": vb, "ratio": ratio})
    return rows


def compare_text(path_a: str, path_b: str) -> str:
    a, b = load_result(path_a), load_result(path_b)
    # Fields only one file holds (e.g. mfu_real against a file written before it existed) are listed with
    # MISSING on the other side, so an old result still compares and shows what it lacks.
    rows = compare(a, b, one_sided=True)
    if not any(row["ratio"] is not None for row in rows):
        raise BenchError(f"--compare: {path_a} and {path_b} share no numeric fields")
    rows = [{k: MISSING if v is None else v for k, v in row.items()} for row in rows]
    env_a, env_b = a.get("environment", {}), b.get("environment", {})
    head = [f"A: {path_a}  ({env_a.get('device_kind', '?')} x{env_a.get('device_count', '?')}, "
            f"commit {str(env_a.get('git_commit', '?'))[:12]}, config {a.get('config_hash', '?')})",
            f"B: {path_b}  ({env_b.get('device_kind', '?')} x{env_b.get('device_count', '?')}, "
            f"commit {str(env_b.get('git_commit', '?'))[:12]}, config {b.get('config_hash', '?')})",
            "ratio = B / A (for times and bytes lower is better, for rates higher is better)", ""]
    return "\n".join(head) + table(rows, [("name", "field"), ("a", "A"), ("b", "B"), ("ratio", "B/A")])
