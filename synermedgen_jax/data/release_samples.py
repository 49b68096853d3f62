"""Samples of a SynerMed release build (``build-data --source synermed``) with the official loaders' semantics
(data/synermed.py: ``edit_plan``, ``conversation_plan``), as one :class:`ReleaseSamples` source of data/stream.py.

Tasks are the record kinds: ``edit`` (Stage II edit chains) and ``conv`` (Stage I conversations); ``mixed``
draws both by ``stage2_weight``. A sample longer than an empty pack row is skipped (None), as BAGEL skips
over-long samples, and counted in a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from synermedgen_jax.data.geometry import PackImages
from synermedgen_jax.data.images import image_array
from synermedgen_jax.data.packing import (
    Geometry,
    PackBudget,
    PackBuilder,
    SpecialTokens,
    Text,
    VaeImage,
    VitImage,
    cfg_dropout,
)
from synermedgen_jax.data.records import RecordReader
from synermedgen_jax.data.stream import PipelineConfig
from synermedgen_jax.data.synermed import (
    CONV,
    EDIT,
    OFFICIAL,
    SLICE_DIR,
    SynerMedConfig,
    conversation_plan,
    edit_plan,
    record_counts,
)
from synermedgen_jax.data.tokenizer import load_tokenizer
from synermedgen_jax.stages import DataStage


def kind_weights(stage: str, stage2_weight: float) -> dict[str, float]:
    """``{kind: mix weight}`` of the data stage (conversations for Stage I, edit chains for Stage II)."""
    if stage == DataStage.STAGE1:
        return {CONV: 1.0}
    if stage == DataStage.STAGE2:
        return {EDIT: 1.0}
    if stage == DataStage.MIXED:
        return {CONV: 1.0 - float(stage2_weight), EDIT: float(stage2_weight)}
    raise ValueError(f"data stage {stage!r} has no SynerMed samples (stage1: conversations, stage2: edit chains, "
                     "mixed: both)")


class ReleaseSamples:
    """The release build as a sample source: ``rows``/``weights`` per record kind, ``((kind, index), rng) ->
    (items, tag)``, or None when the sample cannot fit an empty pack row (skipped; counted in ``oversize``).
    ``geometry`` (the model config or a ``packing.Geometry``) gives the image channels and the fit check; None:
    RGB, no check. Opens readers and the tokenizer lazily (worker processes re-open them)."""

    def __init__(self, data_dir: str | Path, budget: PackBudget, config: PipelineConfig, geometry: Any = None,
                 semantics: SynerMedConfig = OFFICIAL):
        self.data_dir, self.budget, self.pipeline, self.geometry, self.config = (
            str(data_dir), budget, config, geometry, semantics)
        self.rows: dict[str, int] = {}
        self.weights: dict[str, float] = {}
        self._readers: dict = {}
        self._tokenizer = None
        self._probe = None
        self._images = None
        self.oversize = 0

    @classmethod
    def for_stream(cls, data_dir: str | Path, budget: PackBudget, config: PipelineConfig, geometry: Any = None
                   ) -> ReleaseSamples:
        """The source with the stage's kinds and their record counts (errors, one line: another split, a kind
        the build lacks, a stage without release samples)."""
        if config.split != "train":
            raise ValueError(f"{data_dir}: a SynerMed build has one split, 'train' (asked for {config.split!r})")
        for flag in ("augment_understanding", "redraw_options"):
            if getattr(config, flag):
                raise ValueError(f"{data_dir}: data.{flag} is for the records build; a SynerMed build trains as "
                                 "the official loaders do, on the instances as released")
        source = cls(data_dir, budget, config, geometry)
        counts = record_counts(data_dir)
        source.weights = {k: w for k, w in kind_weights(config.stage, config.stage2_weight).items() if w > 0}
        for kind in sorted(source.weights):
            if counts.get(kind, 0) == 0:
                raise ValueError(f"{data_dir}: the SynerMed build has no {kind} records "
                                 f"({'conversations' if kind == CONV else 'edit chains'})")
            source.rows[kind] = counts[kind]
        return source

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_readers={}, _tokenizer=None, _probe=None)
        return state

    def reader(self, kind: str) -> RecordReader:
        if kind not in self._readers:
            self._readers[kind] = RecordReader(self.data_dir, kind)
        return self._readers[kind]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(Path(self.data_dir) / "tokenizer.json")
        return self._tokenizer

    def _channels(self) -> int:
        if self.geometry is None:
            return 3
        g = self.geometry if isinstance(self.geometry, Geometry) else Geometry.from_model_config(self.geometry)
        return max(g.vit_channels, g.vae_channels)

    def _fits(self, items) -> bool:
        if self.geometry is None:
            return True
        if self._probe is None:
            self._probe = PackBuilder(self.budget, SpecialTokens(0, 0, 0, 0), self.geometry)
        return self._probe.fits(items)

    def slice_bytes(self, path: str) -> bytes:
        return (Path(self.data_dir) / SLICE_DIR / path).read_bytes()

    def _pack_images(self) -> PackImages:
        """The resize into the pack's slots (data/geometry.PackImages), made once per source."""
        if self._images is None:
            self._images = PackImages.for_budget(self.budget, getattr(self.pipeline, "resize", None))
        return self._images

    def edit_items(self, record: dict, rng: np.random.Generator) -> list:
        resize = self._pack_images()  # the run's geometry (data/geometry.py)
        vae, vit = resize.vae, resize.vit
        channels = self._channels()
        decoded: dict[int, np.ndarray] = {}

        def image(i: int) -> np.ndarray:
            if i not in decoded:
                decoded[i] = image_array(record["images"][i], channels)
            return decoded[i]

        items: list = []
        for step in edit_plan(len(record["images"]), record["instructions"], rng, self.config,
                              record.get("combined")):
            what, value = step
            if what == "cond":
                items += [VaeImage(vae(image(value)), cfg=True), VitImage(vit(image(value)), cfg=True)]
            elif what == "text":
                items.append(Text(self.tokenizer.encode(value), cfg=True))
            elif what == "mid":
                items += [VaeImage(vae(image(value)), noised=True), VaeImage(vae(image(value)), cfg=True),
                          VitImage(vit(image(value)), cfg=True)]
            else:
                items.append(VaeImage(vae(image(value)), noised=True))
        p = self.pipeline
        return cfg_dropout(items, rng, text=p.cfg_text, vit=p.cfg_vit, vae=p.cfg_vae)

    def conversation_items(self, record: dict) -> list:
        vit = self._pack_images().vlm_vit  # BAGEL's VLM rule, max_pixels shared by the conversation's images
        channels = self._channels()
        items: list = []
        for step in conversation_plan(record["turns"], len(record["images"])):
            if step[0] == "image":
                pixels = image_array(self.slice_bytes(record["images"][step[1]]), channels)
                items.append(VitImage(vit(pixels, images=len(record["images"]))))
            else:
                ids = self.tokenizer.encode(step[1])
                if ids:  # the official VLM loader drops a text that tokenizes to nothing
                    items.append(Text(ids, loss=step[2]))
        return items

    def __call__(self, element: tuple[str, int], rng: np.random.Generator) -> tuple[list, str] | None:
        kind, index = element
        record = self.reader(kind)[int(index)]
        items = self.edit_items(record, rng) if kind == EDIT else self.conversation_items(record)
        if not self._fits(items):
            self.oversize += 1
            if self.oversize in (1, 10, 100, 1000) or self.oversize % 10000 == 0:
                logging.warning("synermed: %d sample(s) longer than an empty pack row skipped (latest %s#%d); "
                                "enlarge config.data.pack", self.oversize, kind, index)
            return None
        return items, f"{kind}#{index}"
