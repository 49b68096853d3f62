"""The evaluation: synthesis routes present in a built data folder + understanding accuracy, and its report.

Synthesis. A route is *present* when the split's records hold both of its modalities for a registry task
``<dataset>/<anatomy>/<src>-><tgt>`` (data/routes.py); the registry's other tasks of that dataset are
listed as absent. Per route, the first ``max_slices`` records in record order are synthesized
(inference/sampler.py, the route's registry instruction, seed = record number so results do not depend on
batching) and compared with the real target at the record's resolution:

* SSIM × 100 and PSNR on the normalised images ([-1, 1], data range 2), whole slice;
* MAE in the target's native units (HU for CT, SUV for PET, the record's window for MR) after inverting the
  record's normalisation, inside the record's body mask.

An identity row (the source copied as the prediction) is always computed beside the model. Route values are
slice means; group averages follow the paper's grouping (``tasks.group_average``).

Understanding. The split's CTS / MI / TIA instances (first ``max_instances`` of each) are answered with
KV-cached greedy decoding (inference/understanding.py) and scored by ``answers.accuracy`` (unparseable
answers counted apart).

Report (``out``): ``results.json`` (everything), ``results.csv`` (one row per route and method),
``results.md`` (paper-style table), ``grids/<task>.png`` (source / target / prediction / |error| per slice),
tensorboard scalars under ``tb/``. Files are written atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from synermedgen_jax.data.records import RecordReader, write_json, write_png, write_text
from synermedgen_jax.data.routes import GROUPS, PAPER_GROUP_AVERAGES, Task, all_tasks, get_task, group_average
from synermedgen_jax.data.volumes import denormalise, resize_image
from synermedgen_jax.evaluation import metrics
from synermedgen_jax.evaluation.answers import UNDERSTANDING_TASKS, accuracy
from synermedgen_jax.inference.loading import Inference, InferenceError
from synermedgen_jax.inference.sampler import Sampler, SamplerConfig, inference_mesh

METHODS = ("model", "identity")
METRICS = ("ssim", "psnr", "mae")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    split: str = "test"
    tasks: tuple[str, ...] = ()  # task names or dataset names; empty: every present task
    max_slices: int = 16  # per route
    max_instances: int = 32  # per understanding task; 0 skips understanding
    batch_size: int = 8
    seed: int = 0
    sampler: SamplerConfig = SamplerConfig()
    max_new_tokens: int = 24  # at least; raised to fit the longest reference answer of the split
    devices: int = 1  # local devices each sampler batch is split over (inference/sampler.py inference_mesh)
    # The checkpoint family's inference settings (inference/family.py): UniMedVL answers each instruction about
    # the source first and edits on instruction + answer, with the image-first context.
    family: str = "synermedgen"
    mode: str = "edit"
    image_first: bool = False
    answer_tokens: int = 800


def _slice_metrics(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, params: dict) -> dict[str, np.ndarray]:
    """Per-slice SSIM×100, PSNR (normalised, range 2) and MAE (native units, in mask): ``{name: [N]}``."""
    native = lambda a: np.stack([denormalise(x, params[i]) for i, x in enumerate(a)])
    has_mask = mask.reshape(len(mask), -1).any(axis=1)
    mask = np.where(has_mask[:, None, None], mask, True)  # a slice without body: MAE over the whole slice
    return {
        "ssim": 100.0 * np.asarray(metrics.ssim(pred, target, data_range=2.0)),
        "psnr": np.asarray(metrics.psnr(pred, target, data_range=2.0)),
        "mae": np.asarray(metrics.mae(native(pred), native(target), mask=mask)),
    }


def present_tasks(reader: RecordReader, wanted: Sequence[str]) -> tuple[dict[str, list[int]], list[str]]:
    """``({task name: [record numbers]}, absent task names)`` for the records' datasets."""
    by_task: dict[str, list[int]] = {}
    datasets = set()
    for i in range(len(reader)):
        record = reader[i]
        datasets.add(record["dataset"])
        for src in record["modalities"]:
            for tgt in record["modalities"]:
                name = f"{record['dataset']}/{record['anatomy']}/{src}->{tgt}"
                if src != tgt and name in _NAMES:
                    by_task.setdefault(name, []).append(i)
    candidates = [t for t in all_tasks() if t.dataset in datasets]
    if wanted:
        for w in wanted:
            if w not in _NAMES and not any(t.dataset == w for t in all_tasks()):
                raise InferenceError(f"--tasks: unknown task or dataset {w!r}; e.g. {', '.join(sorted(_NAMES)[:3])}")
        # Requested tasks are listed as absent even when their dataset is not in this data.
        candidates = [t for t in all_tasks() if t.name in wanted or t.dataset in wanted]
        by_task = {n: r for n, r in by_task.items() if n in wanted or get_task(n).dataset in wanted}
    absent = [t.name for t in candidates if t.name not in by_task]
    return dict(sorted(by_task.items())), absent


_NAMES = {t.name for t in all_tasks()}


def evaluate_synthesis(inference: Inference, reader: RecordReader, tasks: dict[str, list[int]], config: EvalConfig,
                       grids_dir: Path | None, progress: Callable[[str, int], None] | None = None) -> dict:
    """``{task: {"model": {metric: mean}, "identity": {...}, "slices": n}}`` (+ PNG grids)."""
    mesh = inference_mesh(config.devices)
    samplers: dict[tuple, Sampler] = {}  # per (image size, ViT size): the checkpoint's sizes for the slices
    results = {}
    content = ContentIndex(reader)
    for name, records in tasks.items():
        task = get_task(name)
        records, data = pick_slices(reader, records, task, config.max_slices, content)
        if not records:
            continue
        sources = np.stack([np.asarray(r["images"][task.source], np.float32) for r in data])
        targets = np.stack([np.asarray(r["images"][task.target], np.float32) for r in data])
        masks = np.stack([np.asarray(r["mask"], bool) for r in data])
        params = [r["norm"][task.target] for r in data]
        sizes = tuple(tuple(int(v) for v in size) for size in inference.sizes_for(*sources.shape[1:3]))
        if sizes not in samplers:
            samplers[sizes] = Sampler(inference.model, inference.special, sizes[0], sizes[1], config.sampler,
                                      mesh=mesh, image_first=config.image_first)
        sampler = samplers[sizes]
        # No larger batch than the route has slices: the sampler pads a short batch with copies it then computes.
        batch = min(config.batch_size, len(records))
        report = (lambda n, _name=name: progress(_name, n)) if progress else None
        if config.mode == "edit":
            generated = sampler.generate(sources, inference.tokenizer.encode(task.instruction), seed=config.seed,
                                         batch_size=batch, indices=records, progress=report)
        else:
            from synermedgen_jax.inference.family import Settings, edit_instructions, generate_edits

            settings = Settings(config.family, config.sampler.cfg_text, config.sampler.cfg_img, config.mode,
                                config.answer_tokens, config.image_first)
            texts = edit_instructions(inference, settings, task.instruction, sources, seed=config.seed,
                                      batch_size=batch)
            generated = generate_edits(sampler, sources, [inference.tokenizer.encode(t) for t in texts],
                                       seed=config.seed, batch_size=batch, indices=records, progress=report)
        preds = np.stack([resize_image(g, targets.shape[1:]) for g in generated])
        row = {"slices": len(records), "records": records}
        for method, pred in (("model", preds), ("identity", sources)):
            values = _slice_metrics(pred, targets, masks, params)
            # A slice predicted perfectly has infinite PSNR; route means use the finite slices.
            row[method] = {k: float(np.mean(np.asarray(v)[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")
                           for k, v in values.items()}
            row[method + "_per_slice"] = {k: [float(x) for x in v] for k, v in values.items()}
        results[name] = row
        if grids_dir is not None:
            write_grid(grids_dir / f"{name.replace('/', '_').replace('->', '-to-')}.png", sources, targets, preds)
    return results


def _has_content(image: np.ndarray, fraction: float = 0.05) -> bool:
    """Slices are normalised to [-1, 1] with background at -1: enough pixels above it means anatomy."""
    return float(np.mean(image > -0.95)) >= fraction


def bin_centres(n: int, count: int) -> np.ndarray:
    """Indices of the centres of ``min(count, n)`` equal bins over ``0..n-1`` (stratified, distinct, sorted).

    Centres, not ``linspace`` end points: the end points are the first and last candidates, the edges of the
    anatomy, which hold the least of it.
    """
    bins = min(count, n)
    if bins <= 0:
        return np.zeros((0,), np.int64)
    return np.floor((np.arange(bins) + 0.5) * n / bins).astype(np.int64)


class ContentIndex:
    """Which (record, modality) slices show anatomy, read once and shared by every route of an evaluation."""

    def __init__(self, reader: RecordReader):
        self.reader = reader
        self._content: dict[int, dict[str, bool]] = {}

    def has(self, record: int, modality: str) -> bool:
        if record not in self._content:
            images = self.reader[record]["images"]
            self._content[record] = {m: _has_content(np.asarray(x)) for m, x in images.items()}
        return self._content[record].get(modality, False)


def pick_slices(reader: RecordReader, records: list[int], task: Task, count: int,
                content: ContentIndex | None = None) -> tuple[list[int], list[dict]]:
    """The slices a route is scored on: ``(picked record indices, their records)``.

    Up to ``count`` slices spread evenly over the route's slices (``records``, indices into ``reader``) that
    show anatomy in both the task's source and target: the centres of ``count`` equal bins over them, in
    record (slice) order (:func:`bin_centres`). ``content``: a :class:`ContentIndex` shared by the routes of
    one evaluation (None: a new one). ``evaluate_synthesis`` and evaluation/ceiling.py pick with it, so the
    model, the identity baseline and the ceilings are scored on the same slices.

    Slices without anatomy (e.g. skull-only slices of a skull-stripped MR) are left out first: an identity
    copy of empty MR is perfect and would flatter the baseline; so are the nearly empty edge slices, where a
    copy of the source scores almost perfectly on the background (hence bin centres, not end points).
    """
    content = content or ContentIndex(reader)
    usable = [r for r in records if content.has(r, task.source) and content.has(r, task.target)]
    picked = [usable[i] for i in bin_centres(len(usable), count)]
    return picked, [reader[r] for r in picked]


def write_grid(path: Path, sources: np.ndarray, targets: np.ndarray, preds: np.ndarray, rows: int = 4) -> None:
    """PNG: one row per slice (up to ``rows``), columns source / target / prediction / |error| (error ×2)."""
    to_u8 = lambda a: (np.clip((a + 1.0) * 127.5, 0, 255)).astype(np.uint8)
    lines = []
    for s, t, p in list(zip(sources, targets, preds))[:rows]:
        error = np.clip(np.abs(p - t), 0.0, 1.0) * 2.0 - 1.0  # |error| of 1 (half the range) is white
        lines.append(np.concatenate([to_u8(resize_image(s, t.shape)), to_u8(t), to_u8(p), to_u8(error)], axis=1))
    write_png(path, np.concatenate(lines, axis=0))


def evaluate_understanding(inference: Inference, data_dir: str, config: EvalConfig) -> dict:
    """``{cts|mi|tia: accuracy dict}`` for the split's instances (first ``max_instances`` of each)."""
    from synermedgen_jax.data.prompts import mi_answer
    from synermedgen_jax.data.understanding import load_instances, render
    from synermedgen_jax.data.volumes import MODALITY_NAMES
    from synermedgen_jax.inference.understanding import Answerer, DecodeConfig

    path = Path(data_dir) / "instances" / f"{config.split}.npz"
    if config.max_instances <= 0 or not path.exists():
        return {}
    tables = load_instances(path)
    reader = RecordReader(data_dir, config.split)
    rendered_by_task = {}
    for task in UNDERSTANDING_TASKS:
        cols = tables.get(task)
        if cols is not None and len(cols["task"]) > 0:
            rendered_by_task[task] = [render(cols, i) for i in range(min(config.max_instances, len(cols["task"])))]
    # Room for the longest answer the model could give and its end token: a shorter cap would cut answers off
    # and count them as unparseable. A wrong MI answer can be longer than every reference (four panels named
    # with the longest modality name), so the cap covers that too.
    longest = max((len(inference.tokenizer.encode(r.answer)) for rows in rendered_by_task.values() for r in rows),
                  default=0)
    if "mi" in rendered_by_task:
        longest = max(longest, *(len(inference.tokenizer.encode(mi_answer([name] * 4))) for name in MODALITY_NAMES))
    answerer = Answerer(inference.model, inference.tokenizer, inference.image_size, inference.vit_image_size,
                        DecodeConfig(max_new_tokens=max(config.max_new_tokens, longest + 2)),
                        image_first=config.image_first)
    out = {}
    for task, rendered in rendered_by_task.items():
        prompts = [(r.question, [np.asarray(reader[rec]["images"][mod], np.float32) for rec, mod in r.images],
                    r.labels) for r in rendered]
        predictions = answerer.answer(prompts, seed=config.seed, batch_size=config.batch_size)
        result = accuracy(task, predictions, [r.answer for r in rendered])
        result["examples"] = [{"prediction": p, "answer": r.answer} for p, r in list(zip(predictions, rendered))[:3]]
        out[task] = result
    return out


def summarize(synthesis: dict) -> dict:
    """Group averages per method and metric: ``{method: {metric: {group: mean}}}``."""
    return {method: {metric: group_average({n: r[method][metric] for n, r in synthesis.items()})
                     for metric in METRICS} for method in METHODS}


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    """The paper-style table (SSIM×100 / PSNR / MAE per route, model and identity) and the other sections."""
    sampler = report["sampler"]
    lines = [f"# Evaluation ({report['split']} split, {sampler['num_steps']} timesteps, guidance text "
             f"{sampler['cfg_text']:g} / image {sampler['cfg_img']:g})", "",
             "| task | group | slices | SSIM×100 | PSNR | MAE | identity SSIM×100 | identity PSNR | identity MAE |"
             " paper SSIM×100 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["synthesis"].items():
        task: Task = get_task(name)
        m, b = r["model"], r["identity"]
        lines.append(f"| {name} | {task.group} | {r['slices']} | {_fmt(m['ssim'])} | {_fmt(m['psnr'])} | "
                     f"{_fmt(m['mae'], 3)} | {_fmt(b['ssim'])} | {_fmt(b['psnr'])} | {_fmt(b['mae'], 3)} | "
                     f"{_fmt(task.paper_ssim) if task.paper_ssim else '-'} |")
    lines += ["", "Group averages (as the paper groups routes):", "",
              "| group | SSIM×100 | PSNR | MAE | identity SSIM×100 | paper SSIM×100 |", "|---|---|---|---|---|---|"]
    groups = report["groups"]
    for g in GROUPS:
        if g in groups["model"]["ssim"]:
            lines.append(f"| {g} | {_fmt(groups['model']['ssim'][g])} | {_fmt(groups['model']['psnr'][g])} | "
                         f"{_fmt(groups['model']['mae'][g], 3)} | {_fmt(groups['identity']['ssim'][g])} | "
                         f"{_fmt(PAPER_GROUP_AVERAGES[g])} |")
    lines += ["", "MAE is in the target's native units (HU for CT/CBCT, SUV for PET) inside the body mask; SSIM "
              "and PSNR on the normalised slices ([-1, 1], data range 2). The identity row copies the source.", ""]
    if report["absent"]:
        lines += [f"Absent from this data ({len(report['absent'])}): " + ", ".join(report["absent"]), ""]
    if report["understanding"]:
        lines += ["| understanding task | n | accuracy | unparseable |", "|---|---|---|---|"]
        for task, r in report["understanding"].items():
            lines.append(f"| {task.upper()} | {r['n']} | {_fmt(100 * r['accuracy'])} % | {r['unparseable']} |")
        lines.append("")
    return "\n".join(lines)


def routes_csv(routes: dict[str, dict], methods: Sequence[str]) -> str:
    """CSV text, a row per route and method: task, group, method, slices, SSIM×100, PSNR, MAE (results.csv of
    an evaluation, comparison.csv of several)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["task", "group", "method", "slices", "ssim_x100", "psnr", "mae"])
    for name, r in routes.items():
        for method in methods:
            writer.writerow([name, get_task(name).group, method, r["slices"],
                             *(f"{r[method][k]:.6g}" for k in METRICS)])
    return buffer.getvalue()


def write_report(report: dict, out: Path) -> None:
    """results.json / results.csv / results.md and tensorboard scalars under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", report)
    write_text(out / "results.csv", routes_csv(report["synthesis"], METHODS))
    write_text(out / "results.md", markdown(report))
    from tensorboardX import SummaryWriter

    tb = SummaryWriter(str(out / "tb"))
    try:
        step = int(report.get("step") or 0)
        for name, r in report["synthesis"].items():
            for method in METHODS:
                for k in METRICS:
                    tb.add_scalar(f"eval/{method}/{k}/{name}", r[method][k], step)
        for method, per_metric in report["groups"].items():
            for k, groups in per_metric.items():
                for g, v in groups.items():
                    tb.add_scalar(f"eval/{method}/{k}/group/{g}", v, step)
        for task, r in report["understanding"].items():
            tb.add_scalar(f"eval/understanding/{task}/accuracy", r["accuracy"], step)
    finally:
        tb.close()


def run_evaluation(inference: Inference, data_dir: str, config: EvalConfig, out: Path | None,
                   progress: Callable[[str, int], None] | None = None) -> dict:
    """Everything above; returns the report dict (and writes it when ``out`` is given)."""
    try:
        reader = RecordReader(data_dir, config.split)
    except (OSError, ValueError, KeyError) as err:
        raise InferenceError(f"--data {data_dir}: no readable {config.split} records ({err})") from None
    tasks, absent = present_tasks(reader, config.tasks)
    if not tasks and config.tasks:
        raise InferenceError(f"--tasks {', '.join(config.tasks)}: none present in {data_dir} ({config.split})")
    synthesis = evaluate_synthesis(inference, reader, tasks, config, out / "grids" if out else None, progress)
    report = {
        "data": str(data_dir), "split": config.split, "sampler": dataclasses.asdict(config.sampler),
        "family": config.family, "mode": config.mode,
        "max_slices": config.max_slices, "seed": config.seed, "synthesis": synthesis,
        "groups": summarize(synthesis), "absent": absent,
        "understanding": evaluate_understanding(inference, data_dir, config),
    }
    if out is not None:
        write_report(report, out)
    return report
