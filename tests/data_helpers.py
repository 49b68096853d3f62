"""Helpers of the data tests."""

from __future__ import annotations

import json
from pathlib import Path

from synermedgen_jax.data.records import sha256_file


def verify_shards(data_dir: str | Path) -> list[str]:
    """Recomputes every shard checksum against ``manifest.json``; returns the problems found."""
    data_dir = Path(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    problems = []
    for split, shards in manifest["shards"].items():
        for shard in shards:
            path = data_dir / shard["file"]
            if not path.is_file():
                problems.append(f"{path}: missing ({split})")
            elif sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 mismatch")
    return problems
