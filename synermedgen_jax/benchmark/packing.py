"""Packing report: how full the packs of a run really are, what the padding costs, and a budget that pads less.

``python -m synermedgen_jax plan --data DIR --config FILE.py[:variant] [--config.KEY=VALUE ...]``
(commands/plan.py). Three steps:

1. **Measure** (:func:`measure`): build data shard 0 of the run's stream exactly as training does (the config's
   budget from ``training/inputs.pack_budget``, its pipeline, CFG dropout, augmentation, the look-ahead packer
   of ``data/pipeline._PackIterator``) and read ``N`` rows; per row the real counts come from
   :func:`data.packing.real_counts`. The same stream's samples before packing are read too, in arrival order
   (:meth:`PackBuilder.need` of each): the packer's input.
2. **Cost** (:class:`RowFlops`): the FLOPs a step executes for one row (``accounting/flops.executed_step_flops``:
   the trained groups' executed count + the frozen VAE encoder's forward) at the budget's shapes, the encoder
   counted on the row's real VAE images only (it skips empty slots), vs the same formula at the row's real
   counts. The padding share is
   ``1 − Σ real / Σ slots`` over the rows.
3. **Suggest** (:func:`suggest`): replay the arrivals offline through the pipeline's packing rule
   (:func:`simulate`, :func:`data.packing.fill_row`; the replay at the config's budget must reproduce the
   measured rows) for each candidate split of the row length: a grid over the und/gen split and the ViT patch
   budget; ViT images, VAE slots and CE slots are then sized to the most a row reached (a smaller cap would
   only split rows, a larger one is pure padding). The candidate with the lowest simulated padding share wins;
   the config's own budget is one of the candidates, so the suggestion never pads more than it on these
   samples. Next-fit (look-ahead 1) is simulated at the config's budget as well, for comparison.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from synermedgen_jax.accounting.flops import executed_step_flops
from synermedgen_jax.benchmark.report import table
from synermedgen_jax.data.packing import (
    LOOKAHEAD,
    PackBudget,
    PackBuilder,
    SpecialTokens,
    fill_row,
    real_counts,
)
from synermedgen_jax.data.pipeline import packed_dataset, sample_dataset
from synermedgen_jax.data.tokenizer import load_tokenizer
from synermedgen_jax.stages import Stage
from synermedgen_jax.training.inputs import pack_budget, pipeline_config, shard_layout

# Per-sample / per-row capacities a sample takes, in PackBudget field order (``PackBuilder.need``).
SIZE_KEYS: tuple[str, ...] = ("und_tokens", "gen_tokens", "vit_patches", "vit_images", "vae_images", "ce_tokens")


class PackingReportError(ValueError):
    """Bad input to the packing report (one line, exit 2)."""


# ------------------------------------------------------------------------------------------------------------
def simulate(sizes: np.ndarray, caps: Sequence[float], lookahead: int = 1, drop_last: bool = True
             ) -> tuple[np.ndarray, np.ndarray] | None:
    """Packs ``sizes [n, 6]`` (:data:`SIZE_KEYS`) into rows of capacities ``caps`` (6 numbers, ``inf`` = no cap)
    with the pipeline's rule, :func:`data.packing.fill_row` over a ``lookahead``-sample window (1: next-fit).

    Returns ``(rows [R, 6], samples [R])`` (per-row totals and sample counts), dropping the last row when
    ``drop_last`` (the pipeline's repeating stream would have added to it); ``None`` when one sample alone
    exceeds the caps.
    """
    caps = [float(c) for c in caps]
    items = [tuple(int(v) for v in size) for size in np.asarray(sizes, np.int64).reshape(-1, len(caps))]
    if any(v > c for item in items for v, c in zip(item, caps)):
        return None
    stream = iter(items)
    window: list[tuple[int, ...]] = []
    rows: list[list[int]] = []
    counts: list[int] = []
    used = [0] * len(caps)  # the open row's totals (plain lists: the budget grid runs this thousands of times)

    def refill() -> bool:
        item = next(stream, None)
        if item is None:
            return False
        window.append(item)
        return True

    def fits(item: tuple[int, ...]) -> bool:
        return all(u + v <= c for u, v, c in zip(used, item, caps))

    def take(item: tuple[int, ...]) -> None:
        used[:] = [u + v for u, v in zip(used, item)]

    while True:
        used[:] = [0] * len(caps)
        taken = fill_row(window, refill, fits, take, lookahead)
        if taken == 0:
            break
        rows.append(list(used))
        counts.append(taken)
    if drop_last and len(rows) > 1:
        rows, counts = rows[:-1], counts[:-1]
    return np.asarray(rows, np.int64).reshape(-1, len(caps)), np.asarray(counts, np.int64)


# ------------------------------------------------------------------------------------------------------------
class RowFlops:
    """FLOPs one train step executes per pack row, at given region sizes (``accounting/flops.executed_step_flops``:
    the trained groups' forward/backward, remat and flash recomputation, lm_head at CE slots, ViT + connector,
    generation head, and the frozen VAE encoder per VAE image)."""

    def __init__(self, config: Any, budget: PackBudget):
        self.config, self.budget = config, budget
        self._memo: dict[tuple[int, ...], dict[str, float]] = {}

    def parts(self, und: int, gen: int, vit: int, vae: int, ce: int) -> dict[str, float]:
        """``{part: FLOPs}`` of one row holding these counts (tokens / patches / VAE images / CE slots)."""
        key = (int(und), int(gen), int(vit), int(vae), int(ce))
        if key not in self._memo:
            shapes = types.SimpleNamespace(und_tokens=key[0], gen_tokens=key[1], vit_patches=key[2],
                                           vae_images=key[3], ce_tokens=key[4], image_size=self.budget.image_size)
            self._memo[key] = executed_step_flops(self.config, shapes, 1)["parts"]
        return self._memo[key]

    def total(self, und: int, gen: int, vit: int, vae: int, ce: int) -> float:
        return float(sum(self.parts(und, gen, vit, vae, ce).values()))

    def of_budget(self, budget: Mapping[str, int] | PackBudget) -> float:
        b = _as_dict(budget)
        return self.total(b["und_tokens"], b["gen_tokens"], b["vit_patches"], b["vae_images"], b["ce_tokens"])

    def executed_parts(self, budget: Mapping[str, int] | PackBudget, row: Sequence[int]) -> dict[str, float]:
        """``{part: FLOPs}`` a step executes for a row of real counts ``row [6]`` (:data:`SIZE_KEYS`): every slot
        of the budget, except the frozen VAE encoder, which encodes the row's real images only
        (``modeling/synermedgen.encode_real_slots``; chunk rounding ignored)."""
        b = _as_dict(budget)
        parts = dict(self.parts(b["und_tokens"], b["gen_tokens"], b["vit_patches"], b["vae_images"], b["ce_tokens"]))
        if "vae_encoder_forward" in parts:
            parts["vae_encoder_forward"] = self.parts(0, 0, 0, int(row[4]), 0)["vae_encoder_forward"]
        return parts

    def padding_share(self, budget: Mapping[str, int] | PackBudget, rows: np.ndarray) -> float:
        """``1 − Σ_rows FLOPs(real counts) / Σ_rows FLOPs executed`` for ``rows [R, 6]`` (:data:`SIZE_KEYS`)."""
        if len(rows) == 0:
            return float("nan")
        real = sum(self.total(r[0], r[1], r[2], r[4], r[5]) for r in rows)
        return 1.0 - real / sum(sum(self.executed_parts(budget, r).values()) for r in rows)


def _as_dict(budget: Mapping[str, int] | PackBudget) -> dict[str, int]:
    if isinstance(budget, PackBudget):
        return {key: int(getattr(budget, key)) for key in SIZE_KEYS}
    return {key: int(budget[key]) for key in SIZE_KEYS}


# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Measurement:
    """``rows [R, 6]`` real counts per row and ``samples [R]`` (from :func:`real_counts`) of the pipeline's rows,
    ``sizes [n, 6]`` per sample in *arrival* order (what the packer was given: :meth:`PackBuilder.need` of each
    sample of the same stream), all in :data:`SIZE_KEYS` order."""

    rows: np.ndarray
    samples: np.ndarray
    sizes: np.ndarray


def need_vector(builder: PackBuilder, items: Any) -> np.ndarray:
    """``[6]`` capacities one sample takes (:meth:`PackBuilder.need`) in :data:`SIZE_KEYS` order."""
    need = builder.need(items)
    return np.asarray([need.und, need.gen, need.vit_patches, need.vit_images, need.vae_images, need.ce], np.int64)


def measure(batches: Iterable[Mapping[str, np.ndarray]], arrivals: Iterable[tuple[Any, str]], builder: PackBuilder,
            rows: int, lookahead: int, progress: bool = True) -> Measurement:
    """Reads ``rows`` pack rows from ``batches`` (the training stream) with a tqdm bar, then the same stream's
    samples before packing (``arrivals``: ``(items, tag)``) until they cover those rows plus the look-ahead."""
    counts: list[dict[str, np.ndarray]] = []
    seen = 0
    with tqdm(total=rows, desc="pack rows", unit="row", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            take = min(rows - seen, int(np.asarray(batch["sample_id"]).shape[0]))
            counts.append(real_counts({key: np.asarray(value)[:take] for key, value in batch.items()},
                                      builder.geometry))
            seen += take
            bar.update(take)
            if seen >= rows:
                break
    table = {key: np.concatenate([c[key] for c in counts]) for key in counts[0]}
    wanted = int(table["samples"].sum()) + lookahead
    sizes = [need_vector(builder, items) for items, _ in itertools.islice(arrivals, wanted)]
    return Measurement(rows=np.stack([table[key] for key in SIZE_KEYS], axis=1), samples=table["samples"],
                       sizes=np.stack(sizes) if sizes else np.zeros((0, len(SIZE_KEYS)), np.int64))


def region_table(budget: Mapping[str, int] | PackBudget, rows: np.ndarray) -> list[dict[str, Any]]:
    """``[{region, slots, mean_real, fill}]`` for :data:`SIZE_KEYS` (fill = mean real / slots; None: no slots)."""
    b = _as_dict(budget)
    out = []
    for i, key in enumerate(SIZE_KEYS):
        mean = float(rows[:, i].mean()) if len(rows) else float("nan")
        out.append({"region": key, "slots": b[key], "mean_real": mean, "fill": mean / b[key] if b[key] else None})
    return out


def flop_parts(flops: RowFlops, budget: Mapping[str, int] | PackBudget, rows: np.ndarray) -> dict[str, dict]:
    """Per FLOP part: ``{slots, real, padding_share}`` summed over ``rows`` (what each part spends on padding;
    ``slots`` is what the step executes, :meth:`RowFlops.executed_parts`)."""
    out: dict[str, dict] = {}
    for r in rows:
        real_parts = flops.parts(r[0], r[1], r[2], r[4], r[5])
        for name, value in flops.executed_parts(budget, r).items():
            part = out.setdefault(name, {"slots": 0.0, "real": 0.0})
            part["slots"] += value
            part["real"] += real_parts.get(name, 0.0)
    for part in out.values():
        part["padding_share"] = (1.0 - part["real"] / part["slots"]) if part["slots"] else None
    return out


def _grid(low: int, high: int, step: int, unit: int = 0, most: int = 16) -> list[int]:
    """Candidate sizes of one region in ``[low, high]``: both ends, the multiples of ``step``, and (``unit`` > 0)
    up to ``most`` evenly spaced multiples of ``unit``, the size samples come in (a region that is a whole
    number of samples wastes nothing)."""
    if high < low:
        return []
    values = {low, high, *range(math.ceil(low / step) * step, high + 1, step)}
    if unit > 0:
        multiples = list(range(math.ceil(low / unit) * unit, high + 1, unit))
        values.update(multiples[:: max(1, math.ceil(len(multiples) / most))])
    return sorted(v for v in values if low <= v <= high)


def _unit(column: np.ndarray) -> int:
    """The greatest common divisor of a region's non-zero per-sample sizes (0 when none)."""
    nonzero = column[column > 0]
    return int(np.gcd.reduce(nonzero)) if len(nonzero) else 0


def suggest(sizes: np.ndarray, budget: PackBudget, flops: RowFlops, tokens: int, lookahead: int = LOOKAHEAD
            ) -> dict[str, Any]:
    """The budget of ``tokens`` und+gen tokens per row that minimises the simulated padding FLOP share of
    packing ``sizes [n, 6]`` (arrival order) with the pipeline's packer (``lookahead``-sample window).

    Grid: the und/gen split (gen from the largest sample's gen need up to what leaves the largest sample's und
    need, in steps of ``tokens/32`` and in whole multiples of the size generation samples come in; und = tokens −
    gen; a stage without generation samples keeps gen 0), and a ViT patch budget from the largest sample's
    patches up to und, in steps of ``und/32`` and in multiples of the images' patch count. For each, the rows are
    simulated with ViT images, VAE slots and CE slots uncapped, then those are set to the most any row used
    (CE at least 1).
    The config's own budget (at the same row length) is a candidate too, so the result is never worse.
    """
    if len(sizes) == 0:
        raise PackingReportError("no samples were packed: nothing to suggest from")
    need = sizes.max(axis=0)
    inf = float("inf")
    candidates: list[dict[str, int]] = []
    if tokens == budget.und_tokens + budget.gen_tokens:
        candidates.append(_as_dict(budget))
    step = max(1, tokens // 32)
    gen_values = [0] if need[1] == 0 else _grid(int(need[1]), tokens - int(need[0]), step, _unit(sizes[:, 1]))
    for und in sorted({tokens - gen for gen in gen_values}):
        vit_values = [0] if need[2] == 0 else _grid(int(need[2]), und, max(1, und // 32), _unit(sizes[:, 2]))
        for vit in vit_values:
            sim = simulate(sizes, (und, tokens - und, vit, inf, inf, inf), lookahead)
            if sim is None:
                continue
            rows, _ = sim
            reach = rows.max(axis=0) if len(rows) else need
            candidates.append({"und_tokens": und, "gen_tokens": tokens - und, "vit_patches": vit,
                               "vit_images": int(max(reach[3], need[3])), "vae_images": int(max(reach[4], need[4])),
                               # >= 1: a zero-size CE array is a shape training never ran with; one slot costs
                               # one lm_head row.
                               "ce_tokens": int(max(reach[5], need[5], 1))})
    if not candidates:
        raise PackingReportError(f"--tokens {tokens}: no split of {tokens} tokens holds the largest sample "
                                 f"(und {need[0]} + gen {need[1]} tokens)")
    best, best_share, best_sim = None, inf, None
    for candidate in candidates:
        sim = simulate(sizes, [candidate[key] for key in SIZE_KEYS], lookahead)
        if sim is None:
            continue
        share = flops.padding_share(candidate, sim[0])
        if share < best_share - 1e-12:
            best, best_share, best_sim = candidate, share, sim
    assert best is not None and best_sim is not None
    return {"budget": best, "padding_flop_share": best_share, "rows": best_sim[0], "samples": best_sim[1],
            "candidates": len(candidates)}


def overrides(budget: Mapping[str, int]) -> list[str]:
    """``--config.data.pack.KEY=VALUE`` lines of a budget (what ``train`` accepts)."""
    return [f"--config.data.pack.{key}={int(budget[key])}" for key in SIZE_KEYS]


# ------------------------------------------------------------------------------------------------------------
def report(config: Any, measurement: Measurement, budget: PackBudget, tokens: int = 0,
           lookahead: int = LOOKAHEAD) -> dict[str, Any]:
    """All figures of the report (JSON-ready apart from numpy scalars, which ``report.write_json`` handles).
    ``lookahead``: the pipeline's packer window (``config.data.lookahead``)."""
    flops = RowFlops(config, budget)
    rows, sizes = measurement.rows, measurement.sizes
    tokens = tokens or budget.und_tokens + budget.gen_tokens
    caps = [getattr(budget, key) for key in SIZE_KEYS]
    # The recorded arrivals replayed through the pipeline's packer at the config's budget must give back the
    # measured rows: that is what makes the offline simulation of other budgets a faithful stand-in for it.
    replay = simulate(sizes, caps, lookahead, drop_last=False)
    replay_matches = replay is not None and np.array_equal(replay[0][: len(rows)], rows)
    packers = {}
    for name, window in (("next_fit", 1), ("lookahead", lookahead)):
        sim = simulate(sizes, caps, window)
        # On all the arrivals (the suggestion's basis), so the three shares below compare like with like.
        packers[name] = None if sim is None else {
            "lookahead": window, "padding_flop_share": flops.padding_share(budget, sim[0]),
            "samples_per_row": float(sim[1].mean())}
    best = suggest(sizes, budget, flops, tokens, lookahead)
    return {
        "rows_sampled": int(len(rows)),
        "samples_seen": int(len(sizes)),
        "lookahead": int(lookahead),
        "budget": _as_dict(budget),
        "image_size": list(budget.image_size),
        "regions": region_table(budget, rows),
        "samples_per_row": float(measurement.samples.mean()),
        "padding_flop_share": flops.padding_share(budget, rows),
        "flops_per_row_at_slots": flops.of_budget(budget),
        "flop_parts": flop_parts(flops, budget, rows),
        "flops_counted_as": "accounting/flops.executed_step_flops (executed model count + frozen VAE "
                            "encoder forward): executed = the budget's shapes with the encoder on the row's real "
                            "VAE images only, vs the same formula at each row's real counts",
        "replay_matches_pipeline": bool(replay_matches),
        "packers_simulated": packers,
        "largest_sample": {key: int(v) for key, v in zip(SIZE_KEYS, sizes.max(axis=0))},
        "row_tokens": int(tokens),
        "suggested": {"budget": best["budget"], "padding_flop_share": best["padding_flop_share"],
                      "regions": region_table(best["budget"], best["rows"]),
                      "samples_per_row": float(best["samples"].mean()), "overrides": overrides(best["budget"]),
                      "candidates": best["candidates"],
                      "packer": f"the pipeline's (look-ahead {lookahead}), simulated on the recorded arrivals"},
    }


def format_report(result: Mapping[str, Any]) -> str:
    """The console text: measured table, FLOP padding, the suggested budget as overrides."""
    cols = [("region", "region"), ("slots", "slots"), ("mean_real", "mean real"), ("fill", "fill")]
    lines = [f"measured on {result['rows_sampled']} rows of the training pipeline ({result['samples_seen']} samples):",
             table(result["regions"], cols),
             f"  samples / row: {result['samples_per_row']:.2f}",
             f"  padding FLOP share: {result['padding_flop_share']:.1%} "
             f"(of {result['flops_per_row_at_slots']:.4g} FLOPs per row at the budget's shapes)"]
    parts = ", ".join(f"{name} {p['padding_share']:.0%}" for name, p in result["flop_parts"].items()
                      if p["padding_share"] is not None)
    lines.append(f"  padding share by part: {parts}")
    lines.append(f"  replay of the recorded arrivals (look-ahead {result['lookahead']}) reproduces the rows: "
                 f"{result['replay_matches_pipeline']}")
    packers = ", ".join(f"look-ahead {v['lookahead']}{' (next-fit)' if v['lookahead'] == 1 else ''} "
                        f"{v['padding_flop_share']:.1%} ({v['samples_per_row']:.2f} samples/row)"
                        for v in result["packers_simulated"].values() if v)
    lines.append(f"  packers at this budget, simulated on the same arrivals: {packers}")
    suggested = result["suggested"]
    lines += ["", f"suggested budget for {result['row_tokens']} und+gen tokens per row "
                  f"(grid of {suggested['candidates']} budgets, {suggested['packer']}):",
              table(suggested["regions"], cols),
              f"  samples / row: {suggested['samples_per_row']:.2f}; padding FLOP share "
              f"{suggested['padding_flop_share']:.1%}",
              "  " + " ".join(suggested["overrides"])]
    return "\n".join(lines)


def run_report(config: Any, data: str, rows: int, tokens: int = 0, progress: bool = True) -> dict[str, Any]:
    """Measures ``rows`` rows of ``config``'s training stream over the build ``data`` and reports.

    Raises :class:`PackingReportError` (one line) for a folder that is not a build or a stage without packs.
    """
    folder = Path(data)
    if not (folder / "manifest.json").is_file() or not (folder / "records").is_dir():
        what = "does not exist" if not folder.exists() else "is not a built data folder (no manifest.json/records)"
        raise PackingReportError(f"--data {data}: {what}; build it with build-data")
    if "stage" not in config or "data" not in config:
        raise PackingReportError("the packing report needs a run config (configs/stage1_gau.py, stage2_ucg.py, ...)")
    if config.stage == Stage.VAE:
        raise PackingReportError(f"stage {config.stage!r} trains on single images: it has no packs to report")
    if rows < 1:
        raise PackingReportError(f"--rows-sampled must be >= 1, got {rows}")
    if tokens < 0:
        raise PackingReportError(f"--tokens must be >= 0, got {tokens}")
    config.data.dir = str(folder)
    try:
        budget = pack_budget(config)
        # Data shard 0 of the run's global batch: its packed rows, and its samples before packing.
        shards, _, per_shard = shard_layout(config.data, int(config.train.rows))
        stream = pipeline_config(config.data, shard=0, shards=shards, rows=per_shard)
        special = SpecialTokens.from_tokenizer(load_tokenizer(folder / "tokenizer.json"))
        builder = PackBuilder(budget, special, config.model)
        measurement = measure(packed_dataset(folder, budget, config.model, stream, special),
                              sample_dataset(folder, budget, stream, geometry=config.model), builder, rows,
                              stream.lookahead, progress)
    except (OSError, ValueError, KeyError) as err:
        raise PackingReportError(f"--data {data}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
                                 ) from None
    return report(config, measurement, budget, tokens, stream.lookahead)
