"""Scores of PNG pairs per route: ``eval --metadata metadata.json --predictions OUT --targets DIR``.

One tool for our outputs and the official script's: for each metadata key, the prediction ``OUT/<key>.png``
is compared with its target — ``--targets DIR/<key>.png``, or the entry's ``target`` / ``gt`` path under
``--image-root`` — as 8-bit grey pictures (RGB-converted then grey). Metrics (evaluation/metrics.py): SSIM×100
(scikit-image's Gaussian SSIM, data range 255), PSNR in dB and MAE in grey levels (0-255), per key, then averaged
per route. The route is recovered from the prompt (data/route_text.py ``parse_route``), or its source from the
``id`` path's modality folder; keys whose route is not named go to ``unknown``. Keys without a prediction or a
target are listed (``missing``), not scored.

Alignment — a prediction is never stretched onto its target. With the target ``th × tw`` and the prediction
``ph × pw``, "R fits P within d" means the official inference rule's generation map takes the region
``R = rh × rw`` onto ``P`` within ``d`` target pixels per axis (``G = geometry.INFERENCE_VAE.size_for(th, tw)``,
``|ph·th/Gh - rh| <= d`` and ``|pw·tw/Gw - rw| <= d``: the official script generates at ``G``, uniform up to its
stride-16 rounding), or one factor ``s`` does (``|ph/s - rh| <= d`` and ``|pw/s - rw| <= d``). Then, in order:

- ``as-is``: ``P == T`` in shape: scored as is;
- ``rescaled``: the target fits P within 1 px (an uncropped output at the generated size, rounded): P is
  resized to ``th × tw``;
- ``bbox``: the target's bounding box fits P within 2 px, i.e. each edge of the predicted box within 1 target
  pixel of the target's (an official output cropped with ``getbbox()``, compared with the
  box of the target's nonzero grey pixels, i.e. ``getbbox()`` of the target rendered as the official script
  renders a picture: grey replicated to RGB): P is shrunk by the fitted factor (anti-aliased, bilinear) and
  placed centred on the box's centre on a zero canvas of the target's shape (the crop removed only zero pixels;
  centring halves the edges' disagreement instead of shifting it all to one side, see ``_place``). The factor
  is exact when the generation map fits; a uniform factor fitted from the crop's shape alone is only known to
  the edges' tolerance (about 1 % for a 200 px box), so such scores are approximate;
- anything else is skipped: not scored, its reason recorded per key (``skipped`` in scores.json, counted in
  ``counts`` and in the printed summary).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from synermedgen_jax.data.images import grey_array
from synermedgen_jax.data.route_text import mentions, modality_from_path, parse_route, route_name
from synermedgen_jax.inference.loading import InferenceError
from synermedgen_jax.inference.metadata import getbbox, output_path

SIZE_TOLERANCE = 1.0  # target pixels: rounding of a generated size (rule "rescaled")
EDGE_TOLERANCE = 1.0  # target pixels per edge of a predicted bounding box (rule "bbox"): a box size within ±2
ALIGNMENTS = ("as-is", "rescaled", "bbox")


def route_of(entry: dict) -> str:
    route = parse_route(entry.get("prompt", ""))
    if route:
        return route_name(*route)
    names = [m for m, _ in mentions(entry.get("prompt", ""))]
    source = modality_from_path(entry.get("id", ""))
    target = next((m for m in names if m != source), None)
    return route_name(source, target)


def _target_path(key: str, entry: dict, targets: str | Path | None, image_root: str | Path | None) -> Path | None:
    if targets:
        return output_path(targets, key)
    for field in ("target", "gt", "target_id"):
        if isinstance(entry.get(field), str):
            return Path(image_root or ".") / entry[field]
    return None


def _grey_u8(path: Path) -> np.ndarray:
    return np.round((grey_array(path.read_bytes()) + 1.0) * 127.5).astype(np.float32)


def _scale(pred_shape: tuple[int, int], region: tuple[int, int], target_shape: tuple[int, int],
           tol: float) -> tuple[float, float] | None:
    """The factors ``(sh, sw)`` (prediction pixels per target pixel) that map ``region`` (``rh × rw`` target
    pixels) onto ``pred_shape`` within ±``tol`` target pixels per axis, or ``None``: the official generation map
    of a ``target_shape`` input when it fits (exact), else one uniform factor (the mean of the two axis ratios,
    kept inside the interval of factors that fit)."""
    from synermedgen_jax.data.geometry import INFERENCE_VAE

    (ph, pw), (rh, rw), (th, tw) = pred_shape, region, target_shape
    if min(rh, rw) <= tol:  # a region this thin fixes no scale
        return None
    gh, gw = INFERENCE_VAE.size_for(th, tw)
    if abs(ph * th / gh - rh) <= tol and abs(pw * tw / gw - rw) <= tol:
        return gh / th, gw / tw
    # Uniform: s with |ph/s - rh| <= tol and |pw/s - rw| <= tol, i.e. s in [p/(r+tol), p/(r-tol)] per axis.
    lo = max(ph / (rh + tol), pw / (rw + tol))
    hi = min(ph / (rh - tol), pw / (rw - tol))
    if lo > hi:
        return None
    s = min(max((ph / rh + pw / rw) / 2, lo), hi)
    return s, s


def _place(pred: np.ndarray, scale: tuple[float, float], center: tuple[float, float],
           shape: tuple[int, int]) -> np.ndarray:
    """``pred`` ``[ph, pw]`` shrunk by ``scale`` (anti-aliased as ``resize_image``) with its centre at ``center``
    (target coordinates, continuous: pixel ``i`` spans ``[i, i+1)``) on a zero canvas ``[*shape]``. Placing by
    the centre keeps the sub-pixel offset that cropping a resampled picture leaves, which pasting at the box's
    integer corner would turn into a half-pixel shift."""
    from scipy import ndimage

    (sh, sw), (cy, cx), (ph, pw) = scale, center, pred.shape
    smooth = ndimage.gaussian_filter(pred, sigma=(max(0.0, (sh - 1) / 2), max(0.0, (sw - 1) / 2)), mode="nearest")
    rows, cols = np.mgrid[:shape[0], :shape[1]].astype(np.float64)
    # Target pixel centre (r + 0.5) sits (r + 0.5 - top) * sh prediction pixels below the prediction's top edge.
    top, left = cy - ph / (2 * sh), cx - pw / (2 * sw)
    coords = [(rows + 0.5 - top) * sh - 0.5, (cols + 0.5 - left) * sw - 0.5]
    placed = ndimage.map_coordinates(smooth, coords, order=1, mode="constant", cval=0.0)
    return np.clip(placed, 0, 255).astype(np.float32)


def align_prediction(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray | None, str]:
    """``(aligned [th, tw] float32 in 0..255, "as-is" | "rescaled" | "bbox")`` for a grey prediction ``[ph, pw]``
    and target ``[th, tw]`` (0..255), or ``(None, reason)`` when no rule of the module docstring applies."""
    from synermedgen_jax.data.volumes import resize_image

    if pred.shape == target.shape:
        return pred, "as-is"
    if _scale(pred.shape, target.shape, target.shape, SIZE_TOLERANCE) is not None:
        return np.clip(resize_image(pred, target.shape), 0, 255), "rescaled"
    box = getbbox(target)
    (ph, pw), (th, tw) = pred.shape, target.shape
    if box is not None and box != (0, 0, tw, th):
        left, upper, right, lower = box
        scale = _scale(pred.shape, (lower - upper, right - left), target.shape, 2 * EDGE_TOLERANCE)
        if scale is not None:
            return _place(pred, scale, ((upper + lower) / 2, (left + right) / 2), target.shape), "bbox"
        region = (f"(±{SIZE_TOLERANCE:g} px) nor of its bounding box {lower - upper}x{right - left} at row {upper}, "
                  f"column {left} (±{EDGE_TOLERANCE:g} px per edge)")
    else:
        region = f"(±{SIZE_TOLERANCE:g} px), and the target has no smaller bounding box"
    return None, (f"prediction {ph}x{pw} cannot be aligned with target {th}x{tw}: not a uniform scaling of the "
                  f"target {region}; not scored (never stretched)")


def score_pairs(metadata: dict[str, dict], predictions: str | Path, *, targets: str | Path | None = None,
                image_root: str | Path | None = None) -> dict:
    """``{"keys": [{key, route, ssim, psnr, mae, alignment}], "routes": {route: {n, ssim, psnr, mae}},
    "missing": [{key, reason}], "skipped": [{key, reason, prediction, target}], "counts": {scored, as_is,
    rescaled, bbox, skipped, missing}}``; alignment as the module docstring states."""
    from synermedgen_jax.data.volumes import DataError
    from synermedgen_jax.evaluation import metrics

    if not targets and not any(isinstance(e.get(f), str) for e in metadata.values() for f in ("target", "gt",
                                                                                                "target_id")):
        raise InferenceError("--targets DIR is needed (the metadata entries name no 'target' / 'gt' file)")
    pairs: dict[tuple, list] = defaultdict(list)
    missing, skipped = [], []
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
        aligned, how = align_prediction(pred, target)
        if aligned is None:
            skipped.append({"key": key, "reason": how, "prediction": list(pred.shape), "target": list(target.shape)})
            continue
        pairs[target.shape].append((key, route_of(entry), aligned, target, how))
    rows = []
    for shape, items in pairs.items():
        pred = np.stack([p for _, _, p, _, _ in items])
        target = np.stack([t for _, _, _, t, _ in items])
        if min(shape) >= metrics.WIN_SIZE:
            ssim = np.asarray(metrics.ssim(pred, target, data_range=255.0)) * 100.0
        else:
            ssim = np.full(len(items), np.nan)
        psnr = np.asarray(metrics.psnr(pred, target, data_range=255.0))
        mae = np.asarray(metrics.mae(pred, target))
        for (key, route, _, _, how), s, p, m in zip(items, ssim, psnr, mae):
            rows.append({"key": key, "route": route, "ssim": float(s), "psnr": float(p), "mae": float(m),
                         "alignment": how})
    rows.sort(key=lambda r: r["key"])
    routes: dict[str, dict] = {}
    for route in sorted({r["route"] for r in rows}):
        mine = [r for r in rows if r["route"] == route]
        means = {}
        for name in ("ssim", "psnr", "mae"):
            finite = [r[name] for r in mine if np.isfinite(r[name])]  # PSNR of identical pictures is inf
            means[name] = float(np.mean(finite)) if finite else float("nan")
        routes[route] = {"n": len(mine), **means}
    counts = {"scored": len(rows), **{how.replace("-", "_"): sum(r["alignment"] == how for r in rows)
                                      for how in ALIGNMENTS}, "skipped": len(skipped), "missing": len(missing)}
    return {"keys": rows, "routes": routes, "missing": missing, "skipped": skipped, "counts": counts}


def markdown(report: dict) -> str:
    lines = ["| route | n | SSIM×100 | PSNR (dB) | MAE (0-255) |", "|---|---|---|---|---|"]
    for route, r in report["routes"].items():
        lines.append(f"| {route} | {r['n']} | {r['ssim']:.2f} | {r['psnr']:.2f} | {r['mae']:.2f} |")
    counts = report.get("counts")
    if counts:
        lines.append(f"\nscored {counts['scored']} key(s): {counts['as_is']} as is, {counts['rescaled']} rescaled "
                     f"uniformly, {counts['bbox']} pasted at the target's bounding box; skipped (cannot be aligned) "
                     f"{counts['skipped']}; missing {counts['missing']}")
    if report.get("skipped"):
        lines.append(f"\nskipped: {len(report['skipped'])} key(s), e.g. {report['skipped'][0]['key']}: "
                     f"{report['skipped'][0]['reason']}")
    if report["missing"]:
        lines.append(f"\nnot scored: {len(report['missing'])} key(s), e.g. {report['missing'][0]['key']}: "
                     f"{report['missing'][0]['reason']}")
    return "\n".join(lines)


def write_report(report: dict, out: str | Path) -> None:
    from synermedgen_jax.data.records import write_json
    from synermedgen_jax.staging import atomic_path

    out = Path(out)
    write_json(out / "scores.json", report)
    with atomic_path(out / "scores.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["key", "route", "ssim", "psnr", "mae", "alignment"])
            writer.writeheader()
            writer.writerows(report["keys"])
    (out / "scores.md").write_text(markdown(report) + "\n")


