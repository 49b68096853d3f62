"""Samples of a NIfTI build's records (``build-data``): Stage I instances, Stage II pairs, the VQA control's
questions and gen_pretrain's same-modality edits, as one :class:`RecordSamples` source of data/stream.py.

A row of a task is one row of its instance table (``instances/<split>.npz``; gen_pretrain's table is derived
from the split's slice index, data/gen_pretrain.py); its sample reads the records it names:

* Stage I / VQA: the rendered question, its ViT images (BAGEL's VLM resize rule), labels and the answer (loss).
* Stage II pairs and gen_pretrain edits: instruction, source (ViT, clean VAE), noised target; optional paired
  augmentation (one spatial transform for source and target), then CFG dropout.
* und_pretrain's lookups and same-slice questions (data/und_pretrain.py), laid out as Stage I samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from skimage.transform import AffineTransform, warp

from synermedgen_jax.data import gen_pretrain, prompts, und_pretrain
from synermedgen_jax.data.geometry import PackImages
from synermedgen_jax.data.packing import PackBudget, Text, VaeImage, VitImage, cfg_dropout, prompt_items
from synermedgen_jax.data.records import RecordReader, load_index
from synermedgen_jax.data.stream import PipelineConfig
from synermedgen_jax.data.tokenizer import load_tokenizer
from synermedgen_jax.data.understanding import TASKS, SliceIndex, load_instances, redraw_options, render
from synermedgen_jax.data.volumes import MODALITY_NAMES
from synermedgen_jax.stages import DataStage

PAIRS, GEN_PRETRAIN = "pairs", "gen_pretrain"  # the task names of Stage II pairs and gen_pretrain edits


def mix_weights(config: PipelineConfig) -> dict[str, float]:
    """``{task: mix weight}`` of the data stage (tasks of weight 0 left out)."""
    if config.stage not in tuple(DataStage):
        raise ValueError(f"stage {config.stage!r}: expected one of {tuple(str(s) for s in DataStage)}")
    if config.stage == DataStage.STAGE2:
        return {PAIRS: 1.0}
    if config.stage == DataStage.VQA:
        return {"vqa": 1.0}
    if config.stage == DataStage.GEN_PRETRAIN:
        return {GEN_PRETRAIN: 1.0}
    weights = {t: float(w) for t, w in config.task_weights if w > 0}
    known = und_pretrain.ALL_TASKS if config.stage == DataStage.UND_PRETRAIN else TASKS
    unknown = set(weights) - set(known)
    if unknown or not weights:
        raise ValueError(f"task_weights {dict(config.task_weights)}: the {config.stage} stage mixes "
                         f"{', '.join(known)} (a positive weight for at least one, no other task)")
    if config.stage == DataStage.MIXED:
        total = sum(weights.values())
        weights = {t: w / total * (1 - config.stage2_weight) for t, w in weights.items()}
        weights[PAIRS] = config.stage2_weight
    return weights


def paired_augment(images: Sequence[np.ndarray], rng: np.random.Generator, config: PipelineConfig
                   ) -> list[np.ndarray]:
    """One random flip/rotation/scale/shift applied identically to every image (background -1)."""
    size = images[0].shape[0]
    centre = (size - 1) / 2.0
    angle = np.deg2rad(rng.uniform(-config.aug_rotate_deg, config.aug_rotate_deg))
    scale = 1.0 + rng.uniform(-config.aug_scale, config.aug_scale)
    shift = rng.uniform(-config.aug_shift, config.aug_shift, size=2) * size
    flip = config.aug_flip and rng.random() < 0.5
    transform = (AffineTransform(translation=(-centre, -centre)) + AffineTransform(rotation=angle, scale=scale)
                 + AffineTransform(translation=(centre + shift[0], centre + shift[1])))
    out = []
    for image in images:
        image = np.asarray(image, np.float32)
        if flip:
            image = image[:, ::-1]
        out.append(warp(image, transform.inverse, order=1, mode="constant", cval=-1.0,
                        preserve_range=True).astype(np.float32))
    return out


class RecordSamples:
    """The records build as a sample source: ``rows``/``weights`` per task, ``((task, row), rng) -> (items, tag)``.
    Opens the record reader and the tokenizer lazily (worker processes re-open them)."""

    def __init__(self, data_dir: str | Path, budget: PackBudget, config: PipelineConfig, geometry: Any = None):
        del geometry  # the records' samples need no model geometry (the release's do: data/release_samples.py)
        self.data_dir, self.split, self.budget, self.config = str(data_dir), config.split, budget, config
        tables = load_instances(Path(data_dir) / "instances" / f"{config.split}.npz")
        self.weights = mix_weights(config)
        if GEN_PRETRAIN in self.weights:  # derived from the slice index: builds need no new table
            tables = {**tables, GEN_PRETRAIN: gen_pretrain.edit_table(load_index(self.data_dir, config.split))}
        self.slice_index = None
        slice_tasks = [task for task in und_pretrain.SLICE_TASKS if task in self.weights]
        if slice_tasks:
            self.slice_index = SliceIndex(load_index(self.data_dir, config.split))
            slices = und_pretrain.slice_table(self.slice_index)
            tables = {**tables, **{task: slices for task in slice_tasks}}
            if "name_image" in slice_tasks:
                tables["name_image"] = und_pretrain.slice_table(self.slice_index, min_modalities=2)
        self.tables = tables
        self.words = und_pretrain.corpus_words() if any(
            und_pretrain.full_task(task) == "lookup" for task in self.weights) else ()
        self._short_words: dict[tuple[int, int], tuple[str, ...]] = {}
        self.rows = {task: und_pretrain.LOOKUP_ROWS if und_pretrain.full_task(task) == "lookup" else
                     len(tables[task]["rec" if task in (PAIRS, GEN_PRETRAIN, *und_pretrain.SLICE_TASKS) else "task"])
                     for task in sorted(self.weights)}
        for task, n in self.rows.items():
            if n == 0:
                raise ValueError(f"{self.data_dir}: split {config.split} has no {task} instances")
        self.images = PackImages.for_budget(budget, config.resize)
        self._reader = None
        self._tokenizer = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None
        state["_tokenizer"] = None
        return state

    @property
    def reader(self) -> RecordReader:
        if self._reader is None:
            self._reader = RecordReader(self.data_dir, self.split)
        return self._reader

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(str(Path(self.data_dir) / "tokenizer.json"))
        return self._tokenizer

    def _image(self, rec: int, modality: str, cache: dict) -> np.ndarray:
        if rec not in cache:
            cache[rec] = self.reader[rec]
        record = cache[rec]
        if modality not in record["images"]:
            raise KeyError(f"record {rec} of {self.split} has no {modality} image")
        return np.asarray(record["images"][modality], np.float32)

    def __call__(self, element: tuple[str, int], rng: np.random.Generator) -> tuple[list, str]:
        task, row = element
        cache: dict = {}
        if task == PAIRS:
            return self._pair(int(row), rng, cache)
        if task == GEN_PRETRAIN:
            return self._gen_pretrain(int(row), rng, cache)
        if task in und_pretrain.ALL_TASKS:
            return self._und_pretrain(task, int(row), rng, cache)
        table, index = self.tables[task], int(row)
        if self.config.redraw_options:
            table, index = redraw_options(table, index, rng), 0
        rendered = render(table, index)
        count = len(rendered.images)
        pixels = [self._image(rec, modality, cache) for rec, modality in rendered.images]
        if self.config.augment_understanding:
            pixels = paired_augment(pixels, rng, self.config)
        images = [self.images.vlm_vit(image, images=count) for image in pixels]
        items: list = prompt_items(self.tokenizer.encode(rendered.question), images,
                                   [self.tokenizer.encode(label) for label in rendered.labels])
        items.append(Text(self.tokenizer.encode(rendered.answer), loss=True))
        return items, f"{task}#{row}"

    def _lookup_words(self, level: und_pretrain.Level) -> tuple[str, ...]:
        key = (level.max_tokens, level.words)
        if key not in self._short_words:
            words = und_pretrain.short_words(self.words, self.tokenizer.encode, *key)
            if len(words) < max(4, level.words):
                raise ValueError(f"{self.data_dir}/tokenizer.json spells {len(words)} corpus words in at most "
                                 f"{level.max_tokens} tokens: a lookup of level {level} needs {max(4, level.words)}")
            self._short_words[key] = words
        return self._short_words[key]

    def _und_pretrain(self, task: str, row: int, rng: np.random.Generator, cache: dict) -> tuple[list, str]:
        """A caption (question, image, caption as the loss); a name_image or image_lookup (the letter as the loss);
        or labelled options (text, or slices), then ``und_pretrain.QUERIES`` of them asked for: the query (text, or
        the slice re-acquired or re-contrasted), the letter (loss)."""
        encode = self.tokenizer.encode
        level = und_pretrain.LEVELS.get(task)
        if und_pretrain.full_task(task) == "lookup":
            words = self.words if level is None else self._lookup_words(level)
            options, queries = und_pretrain.lookup_texts(words, rng, full=level is None)
            items: list = [Text(encode(options))]
            for query, answer in queries:
                items += [Text(encode(query)), Text(encode(answer), loss=True)]
            return items, f"{task}#{row}"
        if task == "caption":
            rec, modality = und_pretrain.slice_row(self.tables[task], row)
            image = self.images.vlm_vit(self._image(rec, modality, cache), images=1)
            return [Text(encode(und_pretrain.CAPTION_QUESTION)), VitImage(image),
                    Text(encode(und_pretrain.caption(modality, cache[rec]["anatomy"])), loss=True)], f"{task}#{row}"
        if task == "name_image":
            return self._name_image(row, rng, cache), f"{task}#{row}"
        if task == "image_lookup":
            rec, modality = und_pretrain.slice_row(self.tables[task], row)
            options, answer = und_pretrain.image_lookup_options(modality, rng)
            return [Text(encode(options)), Text(encode(und_pretrain.IMAGE_LOOKUP_QUERY)),
                    VitImage(self.images.vlm_vit(self._image(rec, modality, cache), images=1)),
                    Text(encode(answer), loss=True)], f"{task}#{row}"
        if level and level.pool:
            candidates, order = und_pretrain.same_image_plan(self.tables[task], rng, level.pool, level.candidates)
            options_text, query = und_pretrain.same_image_texts(len(candidates))
        else:
            modality, slice_recs, order = und_pretrain.same_slice_plan(self.slice_index, self.tables[task], row, rng,
                                                                       count=level.candidates if level else 4)
            candidates = [(rec, modality) for rec in slice_recs]
            options_text, query = und_pretrain.same_slice_texts(modality, len(candidates))
        slices = [self._image(rec, modality, cache) for rec, modality in candidates]
        count = len(slices) + len(order)  # the candidates and the re-acquired queries
        query_view = und_pretrain.recontrast if level and level.contrast else und_pretrain.reacquire
        shown = [self.images.vlm_vit(und_pretrain.reacquire(image, rng), images=count) for image in slices]
        items = prompt_items(encode(options_text), shown,
                             [encode(label) for label in prompts.MI_IMAGE_LABELS[:len(slices)]])
        for i in order:
            items += [Text(encode(query)),
                      VitImage(self.images.vlm_vit(query_view(slices[i], rng), images=count)),
                      Text(encode(prompts.LETTERS[i]), loss=True)]
        return items, f"{task}#{row}"

    def _name_image(self, row: int, rng: np.random.Generator, cache: dict) -> list:
        """One slice in up to four modalities, labelled, then the letter of the one a query names (loss)."""
        encode = self.tokenizer.encode
        rec, shown, answer = und_pretrain.name_image_plan(self.slice_index, self.tables["name_image"], row, rng)
        images = [self.images.vlm_vit(self._image(rec, modality, cache), images=len(shown)) for modality in shown]
        options_text, query = und_pretrain.name_image_texts(shown[answer], len(shown))
        labels = [encode(label) for label in prompts.MI_IMAGE_LABELS[:len(shown)]]
        return [*prompt_items(encode(options_text), images, labels), Text(encode(query)),
                Text(encode(prompts.LETTERS[answer]), loss=True)]

    def _edit_items(self, prompt: str, source: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> list:
        """Instruction, source (ViT, clean VAE), noised target; then CFG dropout."""
        vae, vit = self.images.vae, self.images.vit
        items = [Text(self.tokenizer.encode(prompt), cfg=True), VitImage(vit(source), cfg=True),
                 VaeImage(vae(source), cfg=True), VaeImage(vae(target), noised=True)]
        return cfg_dropout(items, rng, text=self.config.cfg_text, vit=self.config.cfg_vit, vae=self.config.cfg_vae)

    def _pair(self, row: int, rng: np.random.Generator, cache: dict) -> tuple[list, str]:
        pairs = self.tables[PAIRS]
        rec = int(pairs["rec"][row])
        src, tgt = MODALITY_NAMES[int(pairs["src"][row])], MODALITY_NAMES[int(pairs["tgt"][row])]
        source, target = self._image(rec, src, cache), self._image(rec, tgt, cache)
        if self.config.augment:
            source, target = paired_augment([source, target], rng, self.config)
        prompt = prompts.generation_instruction(int(pairs["template"][row]), src, tgt, cache[rec]["anatomy"])
        return self._edit_items(prompt, source, target, rng), f"{PAIRS}#{row}"

    def _gen_pretrain(self, row: int, rng: np.random.Generator, cache: dict) -> tuple[list, str]:
        """A same-modality edit (data/gen_pretrain.py), laid out as a Stage II sample."""
        table = self.tables[GEN_PRETRAIN]
        modality = MODALITY_NAMES[int(table["src"][row])]
        rec, tgt_rec = int(table["rec"][row]), int(table["tgt_rec"][row])
        base, neighbour = self._image(rec, modality, cache), self._image(tgt_rec, modality, cache)
        if self.config.augment:  # before the edit, so a flip or a neighbour stays the edit the text names
            base, neighbour = paired_augment([base, neighbour], rng, self.config)
        edit = gen_pretrain.EDITS[int(table["edit"][row])]
        source, target = gen_pretrain.apply_edit(edit, base, neighbour, rng)
        prompt = prompts.gen_pretrain_instruction(edit, int(table["template"][row]), modality)
        return self._edit_items(prompt, source, target, rng), f"{GEN_PRETRAIN}#{row}"
