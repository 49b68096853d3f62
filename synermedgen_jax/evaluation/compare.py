"""Several checkpoints on the same routes and slices in one table (``eval --checkpoint A --checkpoint B``).

Each checkpoint's report comes from ``evaluate.run_evaluation`` with the same data, split, routes, slice count
and seed; slice selection (``evaluate.pick_slices``) depends on the records only, so every checkpoint is scored
on the same slices (checked: a route whose record lists differ is refused). The copy baseline (the source
copied as the prediction) is the same for all and is listed once. Each checkpoint runs with its own family's
inference defaults (inference/family.py) unless flags override them; the table says which it used.

Writes ``comparison.md`` (route rows; SSIM×100 / PSNR / MAE of the copy baseline and of each checkpoint; group
averages; understanding accuracy), ``comparison.csv`` (one row per route and method) and ``comparison.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

from synermedgen_jax.data.records import write_json, write_text
from synermedgen_jax.data.routes import GROUPS, group_average
from synermedgen_jax.evaluation.evaluate import METRICS, routes_csv
from synermedgen_jax.inference.loading import InferenceError

BASELINE = "copy"


def compare(reports: dict[str, dict]) -> dict:
    """``{"methods": [copy, *labels], "routes": {task: {method: {metric: mean}, "slices": n}}, "groups":
    {method: {metric: {group: mean}}}, "understanding": {label: {task: accuracy}}, "settings": {label: {...}}}``
    from ``{label: report}`` (same routes and slices; refused in one line otherwise)."""
    labels = list(reports)
    first = reports[labels[0]]
    routes: dict[str, dict] = {}
    for name, row in first["synthesis"].items():
        entry = {"slices": row["slices"], BASELINE: row["identity"]}
        for label in labels:
            other = reports[label]["synthesis"].get(name)
            if other is None or other["records"] != row["records"]:
                raise InferenceError(f"{label}: route {name} was scored on other slices than {labels[0]}'s; "
                                     "run every checkpoint on the same --data, --split, --tasks and --max-slices")
            entry[label] = other["model"]
        routes[name] = entry
    methods = [BASELINE, *labels]
    groups = {m: {k: group_average({n: r[m][k] for n, r in routes.items()}) for k in METRICS} for m in methods}
    understanding = {label: {task: r["accuracy"] for task, r in reports[label]["understanding"].items()}
                     for label in labels}
    settings = {label: {"family": reports[label].get("family"), "mode": reports[label].get("mode"),
                        "cfg_text": reports[label]["sampler"]["cfg_text"],
                        "cfg_img": reports[label]["sampler"]["cfg_img"]} for label in labels}
    return {"methods": methods, "routes": routes, "groups": groups, "understanding": understanding,
            "settings": settings, "split": first["split"], "data": first["data"],
            "num_steps": first["sampler"]["num_steps"]}


def _fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(table: dict) -> str:
    methods = table["methods"]
    head = " | ".join(f"{m} {k}" for m in methods for k in ("SSIM×100", "PSNR", "MAE"))
    lines = [f"# Comparison ({table['split']} split of {table['data']}, {table['num_steps']} timesteps)", "",
             "| checkpoint | family | mode | guidance text / image |", "|---|---|---|---|"]
    for label, s in table["settings"].items():
        lines.append(f"| {label} | {s['family']} | {s['mode']} | {s['cfg_text']:g} / {s['cfg_img']:g} |")
    lines += ["", f"| task | slices | {head} |", "|---|---|" + "---|" * (3 * len(methods))]
    for name, r in table["routes"].items():
        cells = " | ".join(f"{_fmt(r[m]['ssim'])} | {_fmt(r[m]['psnr'])} | {_fmt(r[m]['mae'], 3)}" for m in methods)
        lines.append(f"| {name} | {r['slices']} | {cells} |")
    lines += ["", "Group averages (SSIM×100):", "", "| group | " + " | ".join(methods) + " |",
              "|---|" + "---|" * len(methods)]
    for g in GROUPS:
        if g in table["groups"][methods[0]]["ssim"]:
            lines.append(f"| {g} | " + " | ".join(_fmt(table["groups"][m]["ssim"][g]) for m in methods) + " |")
    tasks = sorted({t for per in table["understanding"].values() for t in per})
    if tasks:
        lines += ["", "| understanding accuracy | " + " | ".join(methods[1:]) + " |",
                  "|---|" + "---|" * len(methods[1:])]
        for t in tasks:
            lines.append(f"| {t.upper()} | " + " | ".join(
                _fmt(100 * table["understanding"][m][t]) + " %" if t in table["understanding"][m] else "-"
                for m in methods[1:]) + " |")
    lines += ["", f"'{BASELINE}' copies the source as the prediction. MAE in the target's native units inside the "
              "body mask; SSIM and PSNR on the normalised slices (data range 2). Every method is scored on the "
              "same slices.", ""]
    return "\n".join(lines)


def write_comparison(table: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", table)
    write_text(out / "comparison.csv", routes_csv(table["routes"], table["methods"]))
    write_text(out / "comparison.md", markdown(table))


def labels_for(checkpoints: list[str]) -> list[str]:
    """A short unique label per checkpoint: its folder name, with ``-2``, ``-3`` ... for repeats."""
    labels: list[str] = []
    for path in checkpoints:
        base = Path(path).resolve().name or str(path)
        label, n = base, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return labels
