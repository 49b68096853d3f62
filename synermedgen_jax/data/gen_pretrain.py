"""Generic generation pre-training data (``data.stage = "gen_pretrain"``): same-modality edits of the records.

The paper's zero-shot synthesis rests on BAGEL's pretrained generator, which had learnt to edit images before it
saw a medical translation. This stage stands in for that at our scale: every sample's source and target are the
*same modality* of the same subject, so the generation expert learns to read a source image and an instruction
and write an image, and never sees a cross-modal pair. Edits (instructions: ``prompts.GEN_PRETRAIN_TEMPLATES``):

* ``slice_up`` / ``slice_down``: the neighbouring slice z±1 of the same volume and modality;
* ``flip``: the slice mirrored left to right;
* ``denoise``: source = slice + Gaussian noise (std uniform in ``NOISE_STD``), target = the clean slice;
* ``brighten`` / ``darken``: a gamma curve on [0, 1] intensities (``GAMMA``);
* ``contrast``: a narrower window about the slice's foreground mean (``CONTRAST``), background kept.

The edit table is derived from the split's slice index when a pipeline starts (no rebuild of existing data;
deterministic, independent of the run's seed: the seed only orders it). Columns (int32): ``rec`` (source
record), ``tgt_rec`` (target record: a neighbour for the slice edits, else ``rec``), ``src`` and ``tgt``
(modality codes; equal by construction), ``edit`` (index into ``prompts.GEN_PRETRAIN_EDITS``), ``template``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from synermedgen_jax.data import prompts
from synermedgen_jax.data.understanding import CODE, SliceIndex

EDITS = prompts.GEN_PRETRAIN_EDITS
NOISE_STD = (0.05, 0.3)  # in the records' [-1, 1] units
GAMMA = {"brighten": 0.6, "darken": 1.6}
CONTRAST = 1.5
_NEIGHBOUR = {"slice_up": 1, "slice_down": -1}


def edit_table(index: Mapping | SliceIndex) -> dict[str, np.ndarray]:
    """Every (record, modality, edit) the split allows; a slice edit needs the neighbouring slice's record."""
    idx = index if isinstance(index, SliceIndex) else SliceIndex(index)
    rows: list[tuple[int, int, int, int]] = []
    for rec in range(idx.n):
        case, z = int(idx.case[rec]), int(idx.slice_index[rec])
        for modality in idx.modalities(rec):
            for e, edit in enumerate(EDITS):
                target = idx.by_slice.get((case, z + _NEIGHBOUR[edit])) if edit in _NEIGHBOUR else rec
                if target is not None:
                    rows.append((rec, target, CODE[modality], e))
    n = len(rows)
    table = np.asarray(rows, np.int32).reshape(n, 4)
    rng = np.random.default_rng([0, 5])  # fixed: the phrasing is part of the data, not of a run's seed
    return {"rec": table[:, 0], "tgt_rec": table[:, 1], "src": table[:, 2], "tgt": table[:, 2].copy(),
            "edit": table[:, 3], "template": rng.integers(0, 2, n).astype(np.int32)}


def apply_edit(edit: str, source: np.ndarray, target: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(source, target)`` images of an edit, from the source slice and (slice edits) its neighbour."""
    source = np.asarray(source, np.float32)
    if edit in _NEIGHBOUR:
        return source, np.asarray(target, np.float32)
    if edit == "flip":
        return source, np.ascontiguousarray(source[:, ::-1])
    if edit == "denoise":
        noisy = source + rng.normal(0.0, rng.uniform(*NOISE_STD), source.shape).astype(np.float32)
        return np.clip(noisy, -1.0, 1.0), source
    if edit in GAMMA:
        unit = np.clip((source + 1.0) / 2.0, 0.0, 1.0)
        return source, (2.0 * unit ** GAMMA[edit] - 1.0).astype(np.float32)
    if edit == "contrast":
        body = source > -0.99
        centre = float(source[body].mean()) if body.any() else 0.0
        return source, np.clip(centre + CONTRAST * (source - centre), -1.0, 1.0).astype(np.float32)
    raise ValueError(f"unknown generic pre-training edit {edit!r}; expected one of {EDITS}")
