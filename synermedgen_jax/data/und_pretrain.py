"""Understanding pre-training data (``data.stage = "und_pretrain"``): synthetic tasks over the records.

BAGEL's Stage I starts from Qwen2.5 and SigLIP: an LLM that binds an answer letter to the option a prompt
labelled with it, and image features that already say what an image shows. A from-scratch understanding expert
has neither, and on its own answers CTS and TIA at chance (docs/experiments.md). This stage stands in for both
with three tasks generated on the fly (each sample a function of its row and the stream's per-sample rng), in
Stage I's layout (labels before images, lettered options, one-letter answers):

* ``lookup`` (text, Qwen's in-context lookup): four lettered options — single names, or ordered pairs with the
  pair reversed and one side replaced among them — then ``QUERIES`` of them asked for ("Which option names X?"),
  each answer a letter (loss). Names are modality names or words of the prompt corpus.
* ``same_slice`` (images, the comparison CTS needs): four labelled slices of one volume and modality (a slice
  and three within ±``NEIGHBOUR_K``), then ``QUERIES`` of them asked for by a re-acquired copy (gamma and
  noise), each answer a letter.
* ``caption`` (one image, SigLIP's image-text pairs): the slice's modality and body region.
* ``name_image`` (images and a name, the link TIA needs between what an image shows and the name an option
  gives): one slice in up to four modalities, labelled, then "Which of A, B, C and D is the T2 image?".
* ``image_lookup`` (the lookup with an image as its key, TIA's layout with one image): four lettered modality
  names, then "Which option names the modality of this image?" and a slice.

Easier levels of the two lookups (``LEVELS``) let ``data.curriculum`` start where a from-scratch model can learn
and move on: ``lookup_6w`` / ``lookup_12w`` / ``lookup_24w`` ask among four of that many one-token corpus words,
``lookup_1tok`` / ``lookup_2tok`` / ``lookup_4tok`` among four of all corpus words of at most that many tokens,
``same_slice_2`` among two slices, ``same_image_6`` / ``_24`` / ``_96`` among images of a pool of that many
(other slices and modalities: a few distinct images first); ``same_shape_2`` / ``same_shape`` ask for the slice by
a copy under a random intensity map (a synthetic contrast), so that only the anatomy's shape tells it, the cue CTS
needs across real modalities. Training always evaluates the full tasks.

No real cross-modal pair is compared and no transformation is named: CTS and TIA stay Stage I's to learn.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from synermedgen_jax.data import prompts
from synermedgen_jax.data.understanding import CODE, SliceIndex
from synermedgen_jax.data.volumes import MODALITY_NAMES, display_name

TASKS = ("lookup", "same_slice", "caption", "name_image", "image_lookup")  # the full tasks: what training evaluates


@dataclasses.dataclass(frozen=True)
class Level:
    """An easier form of a full task: a lookup over single corpus words of at most ``max_tokens`` tokens (``words``
    of them if set, spread over the sorted list: a small vocabulary makes matching by token identity learnable
    first), or a same_slice over ``candidates`` slices, the query under a random intensity map if ``contrast``; with
    ``pool``, the candidates are any images of a pool of that many (a few distinct images first, as for the words)."""
    task: str
    max_tokens: int = 0
    words: int = 0
    candidates: int = 4
    contrast: bool = False
    pool: int = 0


LEVELS = {"lookup_6w": Level("lookup", max_tokens=1, words=6), "lookup_12w": Level("lookup", max_tokens=1, words=12),
          "lookup_24w": Level("lookup", max_tokens=1, words=24), "lookup_1tok": Level("lookup", max_tokens=1),
          "lookup_2tok": Level("lookup", max_tokens=2), "lookup_4tok": Level("lookup", max_tokens=4),
          "same_slice_2": Level("same_slice", candidates=2),
          "same_image_6": Level("same_slice", pool=6), "same_image_24": Level("same_slice", pool=24),
          "same_image_96": Level("same_slice", pool=96),
          "same_shape_2": Level("same_slice", candidates=2, contrast=True),
          "same_shape": Level("same_slice", contrast=True)}
ALL_TASKS = TASKS + tuple(LEVELS)
# Rows of slice_table: the image tasks and their levels.
SLICE_TASKS = ("same_slice", "caption", "name_image", "image_lookup",
               *(task for task, level in LEVELS.items() if level.task == "same_slice"))
LOOKUP_ROWS = 1 << 20  # a lookup is drawn from its rng: rows only number the draws
NEIGHBOUR_K = 6  # distractor slices come from ±1..±K of the same volume
# Options asked for per sample: asking all four lets elimination answer half of them, which the models settled for
# instead of the lookup (docs/experiments.md, "One query per sample").
QUERIES = 1
# Re-acquisition noise (records' [-1, 1] units) and gamma (on [0, 1]): small enough that the nearest candidate in
# pixels stays the same slice (docs/experiments.md, "Stage I that learns its tasks").
NOISE_STD = (0.0, 0.02)
GAMMA = (0.95, 1.05)

LOOKUP_OPTIONS = "Options:\n{options}"
LOOKUP_QUERY = "Which option names {key}? Answer with one letter."
CAPTION_QUESTION = "Name the modality and the body region of this image."
SAME_SLICE_OPTIONS = "{count} {mod} slices {letters} of one scan follow."
SAME_SLICE_QUERY = "Which of {letters} is the same slice as this one? Answer with one letter."
SAME_IMAGE_OPTIONS = "{count} images {letters} follow."
NAME_IMAGE_OPTIONS = "{count} images {letters} of one slice follow."
NAME_IMAGE_QUERY = "Which of {letters} is the {mod} image? Answer with one letter."
IMAGE_LOOKUP_QUERY = "Which option names the modality of this image? Answer with one letter."
CONTRAST_KNOTS = 5  # a synthetic contrast: a random piecewise-linear map of the foreground's intensities
COUNT_WORDS = {2: "Two", 3: "Three", 4: "Four"}


def full_task(task: str) -> str:
    """The full task a level belongs to (``lookup_2tok`` -> ``lookup``); a full task is its own."""
    return LEVELS[task].task if task in LEVELS else task


def letters_phrase(count: int) -> str:
    """``"A, B, C and D"`` for four, ``"A and B"`` for two."""
    letters = prompts.LETTERS[:count]
    return f"{', '.join(letters[:-1])} and {letters[-1]}"


def same_slice_texts(modality: str, count: int) -> tuple[str, str]:
    """``(options sentence, query)`` of a same_slice sample over ``count`` candidates."""
    letters = letters_phrase(count)
    return (SAME_SLICE_OPTIONS.format(count=COUNT_WORDS[count], mod=display_name(modality), letters=letters),
            SAME_SLICE_QUERY.format(letters=letters))


def name_image_texts(modality: str, count: int) -> tuple[str, str]:
    """``(options sentence, query)`` of a name_image sample over ``count`` images, asking for ``modality``'s."""
    letters = letters_phrase(count)
    return (NAME_IMAGE_OPTIONS.format(count=COUNT_WORDS[count], letters=letters),
            NAME_IMAGE_QUERY.format(letters=letters, mod=display_name(modality)))


def same_image_texts(count: int) -> tuple[str, str]:
    """``(options sentence, query)`` of a same_slice level over a pool of images."""
    letters = letters_phrase(count)
    return (SAME_IMAGE_OPTIONS.format(count=COUNT_WORDS[count], letters=letters),
            SAME_SLICE_QUERY.format(letters=letters))


def caption(modality: str, anatomy: str) -> str:
    """The caption of a slice: its modality as MI answers name it, then the body region."""
    return f"{display_name(modality)}, {anatomy.replace('-', ' ')}"


def slice_table(index: Mapping | SliceIndex, min_modalities: int = 1) -> dict[str, np.ndarray]:
    """The image tasks' rows: every (record, modality) with at least three other slices within ±NEIGHBOUR_K of its
    volume and at least ``min_modalities`` modalities (name_image: 2). Columns (int32): ``rec``, ``mod`` (modality
    code)."""
    idx = index if isinstance(index, SliceIndex) else SliceIndex(index)
    rows = [(rec, CODE[modality]) for rec in range(idx.n)
            if len(neighbours(idx, rec)) >= 3 and len(idx.modalities(rec)) >= min_modalities
            for modality in idx.modalities(rec)]
    table = np.asarray(rows, np.int32).reshape(len(rows), 2)
    return {"rec": table[:, 0], "mod": table[:, 1]}


def slice_row(table: Mapping[str, np.ndarray], row: int) -> tuple[int, str]:
    """``(record, modality)`` of row ``row`` of ``slice_table``."""
    return int(table["rec"][row]), MODALITY_NAMES[int(table["mod"][row])]


def neighbours(index: SliceIndex, rec: int) -> list[int]:
    """Records of the slices ±1..±NEIGHBOUR_K of ``rec``'s volume that the split holds."""
    case, z = int(index.case[rec]), int(index.slice_index[rec])
    return [index.by_slice[(case, z + d)] for d in range(-NEIGHBOUR_K, NEIGHBOUR_K + 1)
            if d and (case, z + d) in index.by_slice]


def corpus_words() -> tuple[str, ...]:
    """Words of the prompt corpus (the embedded tokenizer encodes them compactly), sorted."""
    return tuple(sorted({w for text in prompts.corpus() for w in re.findall(r"[A-Za-z]{3,}", text)}))


def reacquire(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The slice as another acquisition might show it: a gamma curve and Gaussian noise, background kept."""
    image = np.asarray(image, np.float32)
    unit = np.clip((image + 1.0) / 2.0, 0.0, 1.0) ** rng.uniform(*GAMMA)
    noisy = unit * 2.0 - 1.0 + rng.normal(0.0, rng.uniform(*NOISE_STD), image.shape).astype(np.float32)
    return np.where(image > -1.0, np.clip(noisy, -1.0, 1.0), -1.0).astype(np.float32)


def recontrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The slice under a synthetic contrast: its foreground's [0, 1] intensities through a random piecewise-linear
    map (``CONTRAST_KNOTS`` random levels, not monotone), background kept: the shape stays, the intensities do not."""
    image = np.asarray(image, np.float32)
    unit = np.clip((image + 1.0) / 2.0, 0.0, 1.0)
    levels = rng.uniform(0.1, 1.0, CONTRAST_KNOTS)  # above the background's 0, so the outline stays visible
    mapped = np.interp(unit, np.linspace(0.0, 1.0, CONTRAST_KNOTS), levels) * 2.0 - 1.0
    return np.where(image > -1.0, mapped, -1.0).astype(np.float32)


def short_words(words: tuple[str, ...], encode, max_tokens: int, count: int = 0) -> tuple[str, ...]:
    """The words an option line spells in at most ``max_tokens`` tokens (``encode``: text -> token ids); with
    ``count``, that many of them spread evenly over the sorted list."""
    short = tuple(w for w in words if len(encode(" " + w)) <= max_tokens)
    if count and count < len(short):
        short = tuple(short[i] for i in np.linspace(0, len(short) - 1, count).round().astype(int))
    return short


def _lookup_options(names: list[str], rng: np.random.Generator, with_pairs: bool = True
                    ) -> list[tuple[str, ...]]:
    """Four distinct options over ``names`` in random order: single names, or (half the time, if ``with_pairs``)
    ordered pairs — a pair, its reverse, the pair with one side replaced and another pair — so that only the
    order tells some of them apart."""
    if not with_pairs or rng.random() < 0.5:
        return [(names[i],) for i in rng.choice(len(names), size=4, replace=False)]
    a, b, c, d, e = (names[i] for i in rng.choice(len(names), size=5, replace=False))
    replaced = (a, c) if rng.random() < 0.5 else (c, b)
    pairs = [(a, b), (b, a), replaced, (d, e)]
    return [pairs[i] for i in rng.permutation(4)]


def lookup_texts(words: tuple[str, ...], rng: np.random.Generator, full: bool = True
                 ) -> tuple[str, list[tuple[str, str]]]:
    """``(options text, [(query, answer letter)] × QUERIES)`` of one lookup: distinct options asked for, in random
    order. In full, half the lookups use modality names, half words of the corpus, singles or pairs; otherwise
    (a level) single ``words``."""
    if not full:
        names = [o[0] for o in _lookup_options(list(words), rng, with_pairs=False)]
    elif rng.random() < 0.5:
        options = _lookup_options(list(MODALITY_NAMES), rng)
        names = [" to ".join(prompts.PHRASE[m] for m in o) for o in options]
    else:
        options = _lookup_options(list(words), rng)
        names = [" then ".join(o) for o in options]
    queries = [(LOOKUP_QUERY.format(key=names[i]), prompts.LETTERS[i]) for i in rng.permutation(4)[:QUERIES]]
    return LOOKUP_OPTIONS.format(options=prompts.format_options(names)), queries


def same_slice_plan(index: SliceIndex, table: Mapping[str, np.ndarray], row: int, rng: np.random.Generator,
                    count: int = 4) -> tuple[str, list[int], list[int]]:
    """``(modality, candidate records A.., query order)`` of row ``row``: the row's slice and ``count - 1`` of its
    neighbours in random order; ``QUERIES`` distinct candidates are asked for, in the query order."""
    rec, modality = slice_row(table, row)
    candidates = [rec, *(int(r) for r in rng.choice(neighbours(index, rec), size=count - 1, replace=False))]
    candidates = [candidates[i] for i in rng.permutation(count)]
    return modality, candidates, [int(i) for i in rng.permutation(count)[:QUERIES]]


def same_image_plan(table: Mapping[str, np.ndarray], rng: np.random.Generator, pool: int, count: int
                    ) -> tuple[list[tuple[int, str]], list[int]]:
    """``([(record, modality)] of the candidates A.., query order)``: ``count`` of ``pool`` images spread evenly
    over the table's rows (other slices and modalities); ``QUERIES`` distinct candidates are asked for."""
    if len(table["rec"]) < max(pool, count):
        raise ValueError(f"same_slice pool of {pool}: the split has only {len(table['rec'])} (slice, modality) rows")
    pool_rows = np.linspace(0, len(table["rec"]) - 1, pool).round().astype(int)
    rows = pool_rows[rng.choice(pool, size=count, replace=False)]
    candidates = [(int(table["rec"][r]), MODALITY_NAMES[int(table["mod"][r])]) for r in rows]
    return candidates, [int(i) for i in rng.permutation(count)[:QUERIES]]


def name_image_plan(index: SliceIndex, table: Mapping[str, np.ndarray], row: int, rng: np.random.Generator
                    ) -> tuple[int, list[str], int]:
    """``(record, modalities shown A.., index of the one asked for)`` of row ``row``: the row's modality and up to
    three other modalities of its slice, in random order."""
    rec, modality = slice_row(table, row)
    others = [m for m in index.modalities(rec) if m != modality]
    if not others:
        raise ValueError(f"name_image: record {rec} has only {modality}; a name_image row needs two modalities")
    shown = [modality, *(others[i] for i in rng.choice(len(others), size=min(3, len(others)), replace=False))]
    order = rng.permutation(len(shown))
    return rec, [shown[i] for i in order], int(np.argmin(order))


def image_lookup_options(modality: str, rng: np.random.Generator) -> tuple[str, str]:
    """``(options text, answer letter)``: ``modality`` and three other modalities, named as TIA's options name
    them, in random order."""
    others = [m for m in MODALITY_NAMES if m != modality]
    names = [modality, *(others[i] for i in rng.choice(len(others), size=3, replace=False))]
    order = rng.permutation(4)
    options = [prompts.PHRASE[names[i]] for i in order]
    return LOOKUP_OPTIONS.format(options=prompts.format_options(options)), prompts.LETTERS[int(np.argmin(order))]
