"""Reading an ``eval`` report back (``results.json``) for the jobs that summarise several runs."""

from __future__ import annotations

import json
from pathlib import Path


def read_results(eval_dir: str | Path) -> dict:
    """``{"groups": {group: model SSIM}, "identity_groups": {...}, "understanding": {task: accuracy},
    "understanding_detail": {task: {accuracy, n, unparseable[, panel_accuracy]}}, "routes_better": n,
    "routes": total}`` from ``eval_dir/results.json`` (SSIM in the report's units)."""
    path = Path(eval_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no evaluation results (run the eval command first)")
    report = json.loads(path.read_text())
    synthesis = report.get("synthesis", {})
    groups = report.get("groups", {})
    return {
        "groups": dict(groups.get("model", {}).get("ssim", {})),
        "identity_groups": dict(groups.get("identity", {}).get("ssim", {})),
        "understanding": {task: r["accuracy"] for task, r in report.get("understanding", {}).items()},
        "understanding_detail": {task: dict(r) for task, r in report.get("understanding", {}).items()},
        "routes_better": sum(1 for r in synthesis.values() if r["model"]["ssim"] > r["identity"]["ssim"]),
        "routes": len(synthesis),
    }
