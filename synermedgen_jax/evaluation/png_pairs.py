"""Scores of PNG pairs per route: ``eval --metadata metadata.json --predictions OUT --targets DIR``.

One tool for our outputs and the official script's: for each metadata key, the prediction ``OUT/<key>.png``
is compared with its target — ``--targets DIR/<key>.png``, or the entry's ``target`` / ``gt`` path under
``--image-root`` — as 8-bit grey pictures (RGB-converted then grey; a prediction of another size is resized
to the target's). Metrics (evaluation/metrics.py): SSIM×100 (scikit-image's Gaussian SSIM, data range 255),
PSNR in dB and MAE in grey levels (0-255), per key, then averaged per route. The route is recovered from the
prompt (data/synermed.py ``parse_route``), or its source from the ``id`` path's modality folder; keys whose
route is not named go to ``unknown``. Keys without a prediction or a target are listed, not scored.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from synermedgen_jax.data import synermed
from synermedgen_jax.inference.loading import InferenceError
from synermedgen_jax.inference.metadata import output_path


def route_of(entry: dict) -> str:
    route = synermed.parse_route(entry.get("prompt", ""))
    if route:
        return synermed.route_name(*route)
    names = [m for m, _ in synermed.mentions(entry.get("prompt", ""))]
    source = synermed.modality_from_path(entry.get("id", ""))
    target = next((m for m in names if m != source), None)
    return synermed.route_name(source, target)


def _target_path(key: str, entry: dict, targets: str | Path | None, image_root: str | Path | None) -> Path | None:
    if targets:
        return output_path(targets, key)
    for field in ("target", "gt", "target_id"):
        if isinstance(entry.get(field), str):
            return Path(image_root or ".") / entry[field]
    return None


def _grey_u8(path: Path) -> np.ndarray:
    return np.round((synermed.grey_array(path.read_bytes()) + 1.0) * 127.5).astype(np.float32)


def score_pairs(metadata: dict[str, dict], predictions: str | Path, *, targets: str | Path | None = None,
                image_root: str | Path | None = None) -> dict:
    """``{"keys": [{key, route, ssim, psnr, mae}], "routes": {route: {n, ssim, psnr, mae}}, "missing": [...]}``."""
    from synermedgen_jax.data.volumes import DataError, resize_image
    from synermedgen_jax.evaluation import metrics

    if not targets and not any(isinstance(e.get(f), str) for e in metadata.values() for f in ("target", "gt",
                                                                                                "target_id")):
        raise InferenceError("--targets DIR is needed (the metadata entries name no 'target' / 'gt' file)")
    pairs: dict[tuple, list] = defaultdict(list)
    missing = []
    for key in sorted(metadata):
        entry = metadata[key]
        pred_path, tgt_path = output_path(predictions, key), _target_path(key, entry, targets, image_root)
        try:
            target = _grey_u8(tgt_path)
        except (OSError, DataError, TypeError) as err:
            missing.append({"key": key, "reason": f"target {tgt_path}: {getattr(err, 'strerror', None) or err}"})
            continue
        try:
            pred = _grey_u8(pred_path)
        except (OSError, DataError) as err:
            missing.append({"key": key, "reason": f"prediction {pred_path}: {getattr(err, 'strerror', None) or err}"})
            continue
        if pred.shape != target.shape:
            pred = np.clip(resize_image(pred, target.shape), 0, 255)
        pairs[target.shape].append((key, route_of(entry), pred, target))
    rows = []
    for shape, items in pairs.items():
        pred = np.stack([p for _, _, p, _ in items])
        target = np.stack([t for _, _, _, t in items])
        if min(shape) >= metrics.WIN_SIZE:
            ssim = np.asarray(metrics.ssim(pred, target, data_range=255.0)) * 100.0
        else:
            ssim = np.full(len(items), np.nan)
        psnr = np.asarray(metrics.psnr(pred, target, data_range=255.0))
        mae = np.asarray(metrics.mae(pred, target))
        for (key, route, _, _), s, p, m in zip(items, ssim, psnr, mae):
            rows.append({"key": key, "route": route, "ssim": float(s), "psnr": float(p), "mae": float(m)})
    rows.sort(key=lambda r: r["key"])
    routes: dict[str, dict] = {}
    for route in sorted({r["route"] for r in rows}):
        mine = [r for r in rows if r["route"] == route]
        means = {}
        for name in ("ssim", "psnr", "mae"):
            finite = [r[name] for r in mine if np.isfinite(r[name])]  # PSNR of identical pictures is inf
            means[name] = float(np.mean(finite)) if finite else float("nan")
        routes[route] = {"n": len(mine), **means}
    return {"keys": rows, "routes": routes, "missing": missing}


def markdown(report: dict) -> str:
    lines = ["| route | n | SSIM×100 | PSNR (dB) | MAE (0-255) |", "|---|---|---|---|---|"]
    for route, r in report["routes"].items():
        lines.append(f"| {route} | {r['n']} | {r['ssim']:.2f} | {r['psnr']:.2f} | {r['mae']:.2f} |")
    if report["missing"]:
        lines.append(f"\nnot scored: {len(report['missing'])} key(s), e.g. {report['missing'][0]['key']}: "
                     f"{report['missing'][0]['reason']}")
    return "\n".join(lines)


def write_report(report: dict, out: str | Path) -> None:
    from synermedgen_jax.data.records import atomic_path, write_json

    out = Path(out)
    write_json(out / "scores.json", report)
    with atomic_path(out / "scores.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["key", "route", "ssim", "psnr", "mae"])
            writer.writeheader()
            writer.writerows(report["keys"])
    (out / "scores.md").write_text(markdown(report) + "\n")


