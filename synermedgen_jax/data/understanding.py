"""Understanding instances (CTS, TIA, MI, and the non-aligned VQA control) and Stage II pairs as index views.

An instance references records of one split by index; images are read from the records at load time, so no
image is stored twice. Instances are derived deterministically from the split's slice index and a seed.

Instance table (``InstanceTable``, int32 numpy columns, one row per instance):

* ``task`` [N]: 0 CTS, 1 TIA, 2 MI, 3 VQA;  ``template`` [N]: prompt template id;  ``answer`` [N]: the
  answer option (letter index; -1 for MI whose answer is the panel -> modality map);
  ``n_options`` [N];  ``qtype`` [N]: VQA question type (index into ``prompts.VQA_TYPES``), else -1.
* ``img_rec`` / ``img_mod`` [N, 5]: the images in prompt order as (record index, modality code); -1 unused.
  CTS: source then options A-D (target modality); TIA: x1, x2; MI: panels A-D; VQA: one or two images.
* ``opt_value`` [N, 4]: CTS slice offset of each option (0 = the true pair); TIA option route as
  ``src_code * 16 + tgt_code``; MI modality code of each panel; VQA index into the question's option list.
* ``opt_kind`` [N, 4]: TIA 0 true route, 1 reversed, 2 wrong modality pair, 3 the wrong pair reversed; else -1.
* ``opt_phrase`` [N, 4]: TIA phrasing index into ``prompts.description_pool``; else -1.

Stage II pairs (``pair_table``): ``rec``, ``src``, ``tgt``, ``template`` columns (int32).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from synermedgen_jax.data import prompts
from synermedgen_jax.data.volumes import MODALITY_NAMES, display_name
from synermedgen_jax.staging import atomic_path

TASKS = ("cts", "tia", "mi", "vqa")
CODE = {m: i for i, m in enumerate(MODALITY_NAMES)}
CONFUSABLE = (("ct", "cbct"), ("t1", "t1ce"), ("t2", "flair"), ("mr", "t1"))
DEFAULT_MIX = {"cts": 0.468, "tia": 0.381, "mi": 0.150}
COLUMNS_1D = ("task", "template", "answer", "n_options", "qtype")
COLUMNS_2D = {"img_rec": 5, "img_mod": 5, "opt_value": 4, "opt_kind": 4, "opt_phrase": 4}


@dataclasses.dataclass(frozen=True)
class InstanceConfig:
    neighbour_k: int = 3  # CTS distractors are slices ±1..±K of the same target volume
    instances_per_pair: float = 2.3  # released mix: ~2.3M instances over ~1M paired samples
    mix: tuple[tuple[str, float], ...] = tuple(DEFAULT_MIX.items())
    confusable_probability: float = 0.6  # MI: chance of forcing a confusable pair among the panels
    vqa_min_brightness_gap: float = 0.05  # "brighter" questions need a clear answer (normalised units)


def route_code(src: str, tgt: str) -> int:
    return CODE[src] * 16 + CODE[tgt]


def decode_route(code: int) -> tuple[str, str]:
    return MODALITY_NAMES[code // 16], MODALITY_NAMES[code % 16]


def _empty(n: int) -> dict[str, np.ndarray]:
    cols = {c: np.full(n, -1, np.int32) for c in COLUMNS_1D}
    cols.update({c: np.full((n, w), -1, np.int32) for c, w in COLUMNS_2D.items()})
    return cols


def _balanced_positions(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Answer positions with every letter used n/k times (±1), in random order: no leakage by position."""
    return rng.permutation(np.arange(n) % k).astype(np.int32)


class SliceIndex:
    """Lookups over the builder's per-split slice index (see ``build.py``)."""

    def __init__(self, index: Mapping):
        self.cases = index["cases"]
        self.case = np.asarray(index["case"], np.int64)
        self.slice_index = np.asarray(index["slice_index"], np.int64)
        self.foreground = np.asarray(index["foreground"], np.float64)
        self.mean = index["mean"]  # per record: list aligned with the case's modalities
        self.n = len(self.case)
        self.by_slice = {(int(c), int(s)): i for i, (c, s) in enumerate(zip(self.case, self.slice_index))}
        self.by_mod: dict[str, list[int]] = defaultdict(list)
        for i, c in enumerate(self.case):
            for m in self.cases[c]["modalities"]:
                self.by_mod[m].append(i)
        self.pairs = [(i, tuple(r)) for i, c in enumerate(self.case) for r in self.cases[c]["routes"]]
        self.routes = sorted({tuple(r) for c in self.cases for r in c["routes"]})

    def modalities(self, rec: int) -> list[str]:
        return self.cases[self.case[rec]]["modalities"]

    def mean_of(self, rec: int, modality: str) -> float:
        return float(self.mean[rec][self.modalities(rec).index(modality)])


def pair_table(index: SliceIndex, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 2])
    n = len(index.pairs)
    return {"rec": np.array([p[0] for p in index.pairs], np.int32).reshape(n),
            "src": np.array([CODE[p[1][0]] for p in index.pairs], np.int32).reshape(n),
            "tgt": np.array([CODE[p[1][1]] for p in index.pairs], np.int32).reshape(n),
            "template": rng.integers(0, len(prompts.GEN_TEMPLATES), n).astype(np.int32)}


def _counts(n_pairs: int, config: InstanceConfig) -> dict[str, int]:
    total = int(round(n_pairs * config.instances_per_pair))
    mix = dict(config.mix)
    unknown = set(mix) - set(DEFAULT_MIX)
    if unknown or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix {mix}: expected non-negative weights for {sorted(DEFAULT_MIX)}")
    weight = sum(mix.values())
    counts = {t: int(round(total * mix.get(t, 0.0) / weight)) for t in ("cts", "tia", "mi")}
    counts["vqa"] = sum(counts.values())  # the control set has the same data volume
    return counts


def _cts(index: SliceIndex, n: int, k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    cols = _empty(n)
    eligible = []
    for rec, route in index.pairs:
        c, s = int(index.case[rec]), int(index.slice_index[rec])
        offsets = [o for d in range(1, k + 1) for o in (-d, d) if (c, s + o) in index.by_slice]
        if len(offsets) >= 3:
            eligible.append((rec, route, offsets))
    if n and not eligible:
        raise ValueError("CTS: no slice has 3 neighbouring slices within ±K in its volume; raise --neighbour-k "
                         "or lower --min-foreground")
    order = rng.permutation(len(eligible)) if eligible else []
    answers = _balanced_positions(rng, n, 4)
    for j in range(n):
        rec, (src, tgt), offsets = eligible[order[j % len(eligible)]]
        c, s = int(index.case[rec]), int(index.slice_index[rec])
        chosen = list(rng.choice(offsets, size=3, replace=False))
        opts = chosen[:]
        opts.insert(int(answers[j]), 0)
        cols["img_rec"][j] = [rec] + [index.by_slice[(c, s + o)] for o in opts]
        cols["img_mod"][j] = [CODE[src]] + [CODE[tgt]] * 4
        cols["opt_value"][j] = opts
    cols["task"][:] = 0
    cols["answer"][:] = answers
    cols["n_options"][:] = 4
    cols["template"][:] = rng.integers(0, len(prompts.CTS_TEMPLATES), n)
    return cols


def _wrong_pair(src: str, tgt: str, routes: list[tuple[str, str]], rng: np.random.Generator) -> tuple[str, str]:
    """Replace one side of the route by a different modality: one that makes a route the data pairs both ways where
    there is one, so that a reader of the options who knows which routes exist cannot rule the wrong pair out (a
    confusable one 70 % of the time when there is one)."""
    side = int(rng.integers(2))
    swap = tgt if side == 1 else src

    def wrong(new: str) -> tuple[str, str]:
        return (src, new) if side == 1 else (new, tgt)

    others = [m for m in MODALITY_NAMES if m not in (src, tgt)]
    paired = ([m for m in others if wrong(m) in routes and wrong(m)[::-1] in routes]
              or [m for m in others if wrong(m) in routes] or others)
    confusable = [m for m in paired if (m, swap) in CONFUSABLE or (swap, m) in CONFUSABLE]
    pool = confusable if confusable and rng.random() >= 0.3 else paired
    return wrong(pool[int(rng.integers(len(pool)))])


def _tia(index: SliceIndex, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    cols = _empty(n)
    order = rng.permutation(len(index.pairs))
    answers = _balanced_positions(rng, n, 4)
    for j in range(n):
        rec, (src, tgt) = index.pairs[order[j % len(order)]]
        wrong = _wrong_pair(src, tgt, index.routes, rng)
        # The wrong pair's reverse closes the options under reversal: each option then has a reverse and shares a
        # modality with one other, so no option stands out by its text (docs/experiments.md, "TIA answered blind").
        routes = [(src, tgt), (tgt, src), wrong, wrong[::-1]]
        kinds = [0, 1, 2, 3]
        rest = rng.permutation(3) + 1  # distractor order is random as well
        order_opts = [int(x) for x in rest]
        order_opts.insert(int(answers[j]), 0)
        cols["img_rec"][j, :2] = rec
        cols["img_mod"][j, :2] = [CODE[src], CODE[tgt]]
        for pos, which in enumerate(order_opts):
            r = routes[which]
            cols["opt_value"][j, pos] = route_code(*r)
            cols["opt_kind"][j, pos] = kinds[which]
            cols["opt_phrase"][j, pos] = int(rng.integers(len(prompts.description_pool(*r))))
    cols["task"][:] = 1
    cols["answer"][:] = answers
    cols["n_options"][:] = 4
    cols["template"][:] = rng.integers(0, len(prompts.TIA_TEMPLATES), n)
    return cols


def _mi(index: SliceIndex, n: int, p_confusable: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    cols = _empty(n)
    pool = sorted(index.by_mod, key=MODALITY_NAMES.index)
    pairs_here = [p for p in CONFUSABLE if p[0] in index.by_mod and p[1] in index.by_mod]
    anchors = rng.permutation(index.n)
    for j in range(n):
        anchor = int(anchors[j % index.n])
        mods: list[str] = []
        if pairs_here and rng.random() < p_confusable:
            mods.extend(pairs_here[int(rng.integers(len(pairs_here)))])
        rest = [m for m in pool if m not in mods]
        need = 4 - len(mods)
        if len(rest) >= need:
            mods.extend(rng.choice(rest, size=need, replace=False).tolist())
        else:  # fewer than 4 modalities in the split: repeats are unavoidable
            mods.extend(rng.choice(pool, size=need, replace=True).tolist())
        mods = [mods[i] for i in rng.permutation(4)]
        anchor_mods = index.modalities(anchor)
        recs = [anchor if m in anchor_mods else int(rng.choice(index.by_mod[m])) for m in mods]
        cols["img_rec"][j, :4] = recs
        cols["img_mod"][j, :4] = [CODE[m] for m in mods]
        cols["opt_value"][j] = [CODE[m] for m in mods]
    cols["task"][:] = 2
    cols["n_options"][:] = 4
    cols["template"][:] = rng.integers(0, len(prompts.MI_TEMPLATES), n)
    return cols


def _vqa_truth(index: SliceIndex, qtype: str, rec: int) -> int:
    """Index of the true option (in ``prompts.VQA_QUESTIONS[qtype][1]``) for single-image questions."""
    case = index.cases[index.case[rec]]
    if qtype == "anatomy":
        return prompts.VQA_QUESTIONS["anatomy"][1].index(case["anatomy"].replace("-", " "))
    if qtype == "plane":
        return 0  # records are axial slices
    if qtype == "position":
        rel = index.slice_index[rec] / max(1, case["depth"] - 1)
        return min(2, int(rel * 3))
    fg = index.foreground[rec]
    return min(3, int(fg * 4))


def _vqa(index: SliceIndex, n: int, min_gap: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    cols = _empty(n)
    qtypes = rng.permutation(np.arange(n) % len(prompts.VQA_TYPES))
    answers = np.zeros(n, np.int32)
    for q, name in enumerate(prompts.VQA_TYPES):
        sel = np.flatnonzero(qtypes == q)
        answers[sel] = _balanced_positions(rng, len(sel), len(prompts.VQA_QUESTIONS[name][1][:4]))
    for j in range(n):
        name = prompts.VQA_TYPES[qtypes[j]]
        options_all = prompts.VQA_QUESTIONS[name][1]
        rec = int(rng.integers(index.n))
        mod = index.modalities(rec)[int(rng.integers(len(index.modalities(rec))))]
        if name == "brighter":
            for _ in range(50):
                other = int(rng.choice(index.by_mod[mod]))
                gap = index.mean_of(rec, mod) - index.mean_of(other, mod)
                if abs(gap) >= min_gap:
                    break
            else:
                name, options_all = "plane", prompts.VQA_QUESTIONS["plane"][1]
                qtypes[j] = prompts.VQA_TYPES.index("plane")
                answers[j] = int(rng.integers(3))
        if name == "brighter":
            # Put the brighter image where the pre-assigned balanced answer says.
            first_brighter = gap > 0
            a, b = (rec, other) if first_brighter == (answers[j] == 0) else (other, rec)
            cols["img_rec"][j, :2] = [a, b]
            cols["img_mod"][j, :2] = CODE[mod]
            cols["opt_value"][j, :2] = [0, 1]
            cols["n_options"][j] = 2
            continue
        truth = _vqa_truth(index, name, rec)
        k = min(4, len(options_all))
        distract = [i for i in range(len(options_all)) if i != truth]
        chosen = list(rng.choice(distract, size=k - 1, replace=False))
        chosen.insert(int(answers[j]), truth)
        cols["img_rec"][j, 0] = rec
        cols["img_mod"][j, 0] = CODE[mod]
        cols["opt_value"][j, :k] = chosen
        cols["n_options"][j] = k
    cols["task"][:] = 3
    cols["answer"][:] = answers
    cols["qtype"][:] = qtypes
    cols["template"][:] = 0
    return cols


def make_instances(index: Mapping | SliceIndex, seed: int, config: InstanceConfig = InstanceConfig()
                   ) -> dict[str, dict[str, np.ndarray]]:
    """``{"cts"|"tia"|"mi"|"vqa": columns}`` for one split; deterministic in (index, seed, config)."""
    idx = index if isinstance(index, SliceIndex) else SliceIndex(index)
    if idx.n == 0:
        return {t: _empty(0) for t in TASKS}
    counts = _counts(len(idx.pairs), config)
    out = {
        "cts": _cts(idx, counts["cts"], config.neighbour_k, np.random.default_rng([seed, 10])),
        "tia": _tia(idx, counts["tia"], np.random.default_rng([seed, 11])),
        "mi": _mi(idx, counts["mi"], config.confusable_probability, np.random.default_rng([seed, 12])),
        "vqa": _vqa(idx, counts["vqa"], config.vqa_min_brightness_gap, np.random.default_rng([seed, 13])),
    }
    return out


@dataclasses.dataclass
class RenderedInstance:
    task: str
    question: str
    images: list[tuple[int, str]]  # (record index, modality) in prompt order
    answer: str
    labels: tuple[str, ...] = ()  # text placed before each image ("A:", ...); empty: the images follow unlabelled


def render(cols: Mapping[str, np.ndarray], i: int) -> RenderedInstance:
    """Question text, image references and answer text of row ``i``."""
    task = TASKS[int(cols["task"][i])]
    template = int(cols["template"][i])
    images = [(int(r), MODALITY_NAMES[int(m)]) for r, m in zip(cols["img_rec"][i], cols["img_mod"][i]) if r >= 0]
    answer_letter = prompts.LETTERS[int(cols["answer"][i])] if cols["answer"][i] >= 0 else ""
    if task == "cts":
        src, tgt = images[0][1], images[1][1]
        question = prompts.CTS_TEMPLATES[template].format(src=display_name(src), tgt=display_name(tgt))
        return RenderedInstance(task, question, images, answer_letter, prompts.CTS_IMAGE_LABELS)
    if task == "tia":
        options = [prompts.description_pool(*decode_route(int(v)))[int(p)]
                   for v, p in zip(cols["opt_value"][i], cols["opt_phrase"][i])]
        question = prompts.TIA_TEMPLATES[template].format(options=prompts.format_options(options))
        return RenderedInstance(task, question, images, answer_letter, prompts.TIA_IMAGE_LABELS)
    if task == "mi":
        mods = [MODALITY_NAMES[int(v)] for v in cols["opt_value"][i]]
        return RenderedInstance(task, prompts.MI_TEMPLATES[template], images, prompts.mi_answer(mods),
                                prompts.MI_IMAGE_LABELS)
    name = prompts.VQA_TYPES[int(cols["qtype"][i])]
    question_text, options_all = prompts.VQA_QUESTIONS[name]
    k = int(cols["n_options"][i])
    options = [options_all[int(v)] for v in cols["opt_value"][i][:k]]
    question = prompts.VQA_TEMPLATE.format(question=question_text, options=prompts.format_options(options))
    return RenderedInstance(task, question, images, answer_letter)


# The columns an option reorder moves, with the column index of option A: CTS's candidate images follow its source.
REDRAWN_COLUMNS = {
    "cts": (("img_rec", 1), ("img_mod", 1), ("opt_value", 0)),
    "mi": (("img_rec", 0), ("img_mod", 0), ("opt_value", 0)),
    "tia": (("opt_value", 0), ("opt_kind", 0), ("opt_phrase", 0)),
    "vqa": (("opt_value", 0), ("opt_kind", 0), ("opt_phrase", 0)),
}
TEMPLATES = {"cts": prompts.CTS_TEMPLATES, "tia": prompts.TIA_TEMPLATES, "mi": prompts.MI_TEMPLATES}


def redraw_options(cols: Mapping[str, np.ndarray], i: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Row ``i`` as a one-row table with its options in a fresh random order (the answer follows its option), and a
    fresh template and TIA phrasing: an instance met again is a new question, so a remembered answer letter is
    worth nothing and only reading the images is (docs/experiments.md, "Instances drawn afresh").

    CTS reorders its candidate images, MI its panels, TIA and VQA their option texts; the images asked about and
    the answer's content stay the same."""
    row = {name: np.array(column[i:i + 1]) for name, column in cols.items()}
    task = TASKS[int(row["task"][0])]
    count = int(row["n_options"][0])
    order = rng.permutation(count)  # new position j shows old option order[j]
    for name, first in REDRAWN_COLUMNS[task]:
        row[name][0, first:first + count] = row[name][0, first:first + count][order]
    if task != "mi":  # MI's answer is the panels' names, in the panels' new order
        row["answer"][0] = int(np.flatnonzero(order == row["answer"][0])[0])
    if task == "tia":
        row["opt_phrase"][0, :count] = [rng.integers(len(prompts.description_pool(*decode_route(int(v)))))
                                        for v in row["opt_value"][0, :count]]
    if task in TEMPLATES:
        row["template"][0] = rng.integers(len(TEMPLATES[task]))
    return row


def save_instances(path, tables: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """One ``.npz`` (no pickle: plain int32 arrays named ``<task>.<column>``), written atomically."""
    arrays = {f"{t}.{c}": np.asarray(a) for t, cols in tables.items() for c, a in cols.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_instances(path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            task, col = key.split(".", 1)
            out[task][col] = data[key]
    return dict(out)
