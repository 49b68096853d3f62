"""Per-process input streams of the global batch, checkpointable through Grain's Orbax handler.

The global batch of ``train.rows`` rows is cut into ``data.shards`` data shards (default: one per process);
shard ``s`` is an independent Grain pipeline over instance rows ``s::shards`` and contributes rows
``[s·n, (s+1)·n)``. Process ``p`` of ``P`` runs shards ``[p·S/P, (p+1)·S/P)``. Because the data order depends
only on the shard count, a single process with ``data.shards=2`` sees exactly the batches two processes see.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import grain
import jax
import numpy as np

from synermedgen_jax.data import synermed, und_pretrain
from synermedgen_jax.data.geometry import ImageRules
from synermedgen_jax.data.packing import LOOKAHEAD, Geometry, PackBudget
from synermedgen_jax.data.pipeline import PipelineConfig, packed_dataset, slice_shape
from synermedgen_jax.data.records import RecordReader, load_index
from synermedgen_jax.data.understanding import COLUMNS_2D
from synermedgen_jax.data.volumes import resize_image
from synermedgen_jax.stages import GENERATION_DATA, UNDERSTANDING_DATA, DataStage, Stage


def shard_layout(data, rows: int) -> tuple[int, list[int], int]:
    """``(shard count, this process's shards, rows per shard)``."""
    processes, index = jax.process_count(), jax.process_index()
    shards = int(data.shards) or processes
    if shards % processes:
        raise ValueError(f"config.data.shards={shards} must be a multiple of the process count {processes}")
    if rows % shards:
        raise ValueError(f"config.train.rows={rows} must be a multiple of the data shard count {shards}")
    per = shards // processes
    return shards, list(range(index * per, (index + 1) * per)), rows // shards


def pipeline_config(data, *, stage: str | None = None, split: str | None = None, shard: int = 0, shards: int = 1,
                    rows: int = 1, repeat: bool = True, seed_offset: int = 0) -> PipelineConfig:
    weights = tuple((str(task), float(weight)) for task, weight in data.task_weights)
    return PipelineConfig(stage=stage or data.stage, split=split or data.split, seed=int(data.seed) + seed_offset,
                          task_weights=weights, stage2_weight=float(data.stage2_weight), cfg_text=float(data.cfg_text),
                          cfg_vit=float(data.cfg_vit), cfg_vae=float(data.cfg_vae), augment=bool(data.augment),
                          augment_understanding=bool(data.get("augment_understanding", False)),
                          redraw_options=bool(data.get("redraw_options", False)),
                          rows_per_batch=rows, repeat=repeat, process_index=shard, process_count=shards,
                          workers=int(data.workers), source=str(data.get("source", "auto")),
                          resize=ImageRules.from_pack(data.pack), lookahead=int(data.get("lookahead", LOOKAHEAD)))


def pack_budget(config) -> PackBudget:
    """The run's static :class:`PackBudget`.

    Without resize rules (tiny/small) it is ``config.data.pack`` as written. With the official geometry
    (``data.pack.{vae,vit,vlm_vit}_resize``, data/geometry.py) the slots are the rules applied to the build's
    slice shape (read from the data, ``data.pipeline.slice_shape``): ``image_size``, ``vit_image_size`` and
    ``slice_size`` are written back into ``config.data.pack`` when they differ from the config's (so the run's
    config.json names the slots it trained with), and a budget that cannot hold one smallest sample of the
    stage at those slots is an error (one line naming the field)."""
    pack = config.data.pack
    rules = ImageRules.from_pack(pack)
    if not rules.any:
        return PackBudget.from_config(pack)
    geometry = Geometry.from_model_config(config.model)
    rules.check_model(geometry.latent_stride, geometry.max_latent_size, geometry.vit_patch, geometry.vit_max_side)
    shape = slice_shape(config.data.dir, str(config.data.get("source", "auto")))
    stage = str(config.data.stage)
    image_size, vit_image_size = rules.slots(shape, stage, tuple(pack.image_size), tuple(pack.vit_image_size))
    if (image_size, vit_image_size) != (tuple(pack.image_size), tuple(pack.vit_image_size)):
        logging.getLogger(__name__).info(
            "data.pack: slots %s (VAE) / %s (ViT) from the build's %dx%d slices under the resize rules (config "
            "had %s / %s)", image_size, vit_image_size, *shape, tuple(pack.image_size), tuple(pack.vit_image_size))
        pack.image_size, pack.vit_image_size = image_size, vit_image_size
        if "slice_size" in pack:
            pack.slice_size = tuple(shape)
    budget = PackBudget.from_config(pack)
    # A CTS instance of a records build shows up to 5 images; a release conversation is checked for one.
    release = synermed.use_release(config.data.dir, str(config.data.get("source", "auto")))
    check_capacity(budget, geometry, stage, und_images=1 if release else COLUMNS_2D["img_rec"])
    return budget


def check_capacity(budget: PackBudget, geometry: Geometry, stage: str, und_images: int = 1) -> None:
    """Raises (one line) when an empty row cannot hold the stage's whole samples at the slot sizes: an edit
    (source + target VAE images, one ViT image), an understanding sample of ``und_images`` ViT images."""
    stride = geometry.latent_stride
    latents = (budget.image_size[0] // stride) * (budget.image_size[1] // stride)
    patches = (budget.vit_image_size[0] // geometry.vit_patch) * (budget.vit_image_size[1] // geometry.vit_patch)
    images = und_images if stage in UNDERSTANDING_DATA else 1
    needs = [("vit_patches", budget.vit_patches, images * patches), ("vit_images", budget.vit_images, images),
             ("und_tokens", budget.und_tokens, images * (patches + 2))]
    if stage in GENERATION_DATA:
        needs += [("gen_tokens", budget.gen_tokens, 2 * latents), ("vae_images", budget.vae_images, 2)]
    for field, have, need in needs:
        if have < need:
            raise ValueError(f"config.data.pack.{field}={have} cannot hold one {stage} sample at the "
                             f"{budget.image_size} VAE / {budget.vit_image_size} ViT slots (needs {need})")


class ShardedBatches:
    """Concatenates this process's shard iterators row-wise. ``get_state``/``set_state`` speak JSON bytes
    (Grain's checkpoint handler writes them as ``process_<i>-of-<n>.json``)."""

    def __init__(self, iterators: dict[int, Any]):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(self.iterators[s]) for s in sorted(self.iterators)]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def get_state(self) -> bytes:
        return json.dumps({str(s): it.get_state() for s, it in self.iterators.items()}).encode()

    def set_state(self, state: bytes) -> None:
        states = json.loads(state)
        if sorted(states) != sorted(str(s) for s in self.iterators):
            raise ValueError(f"data iterator checkpoint holds shards {sorted(states)}, this process runs "
                             f"{sorted(self.iterators)}: restore with the same config.data.shards")
        for s, it in self.iterators.items():
            it.set_state(states[str(s)])

    def start_prefetch(self) -> None:  # called by Grain's handler after a restore
        pass


class CurriculumBatches:
    """Batches whose task weights change at given steps (``data.curriculum``): phase ``k`` is a stream of its own
    (its weights, seed + k) from step ``starts[k]`` on. The checkpointed state is the batch count, the phase and
    that phase's stream state, so a resumed run continues inside the right phase."""

    def __init__(self, starts: list[int], make_phase):
        self.starts, self.make_phase = starts, make_phase
        self.count, self.phase = 0, 0
        self.batches = make_phase(0)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        phase = sum(start <= self.count for start in self.starts) - 1
        if phase != self.phase:
            self.phase, self.batches = phase, self.make_phase(phase)
        self.count += 1
        return next(self.batches)

    def get_state(self) -> bytes:
        return json.dumps({"count": self.count, "phase": self.phase,
                           "batches": self.batches.get_state().decode()}).encode()

    def set_state(self, state: bytes) -> None:
        saved = json.loads(state)
        if "count" not in saved:
            raise ValueError("data iterator checkpoint was written without data.curriculum: resume with the "
                             "config it was trained with")
        self.count, self.phase = int(saved["count"]), int(saved["phase"])
        self.batches = self.make_phase(self.phase)
        self.batches.set_state(saved["batches"].encode())

    def start_prefetch(self) -> None:
        pass


def curriculum_phases(config) -> list[tuple[int, tuple[tuple[str, float], ...]]]:
    """``[(first step, task_weights)]``: ``data.curriculum`` holds ``(fraction of train.steps, task_weights)``
    phases in order from fraction 0, checked by config.validate_config (empty: one phase of ``data.task_weights``)."""
    phases = config.data.get("curriculum", ()) or ()
    if not phases:
        return [(0, tuple(config.data.task_weights))]
    steps = int(config.train.steps)
    return [(int(round(float(fraction) * steps)), tuple((str(t), float(w)) for t, w in weights))
            for fraction, weights in phases]


def train_batches(config) -> ShardedBatches | CurriculumBatches:
    """The training stream of this process (packed rows, or images for stage 0)."""
    shards, mine, per = shard_layout(config.data, int(config.train.rows))
    if config.stage == Stage.VAE:
        return ShardedBatches({s: iter(image_dataset(config, shard=s, shards=shards, rows=per)) for s in mine})
    budget = pack_budget(config)
    phases = curriculum_phases(config)

    def phase_batches(k: int) -> ShardedBatches:
        return ShardedBatches({s: iter(packed_dataset(config.data.dir, budget, config.model, dataclasses.replace(
            pipeline_config(config.data, shard=s, shards=shards, rows=per, seed_offset=101 * k),
            task_weights=phases[k][1]))) for s in mine})

    if len(phases) == 1 and not config.data.get("curriculum", ()):
        return phase_batches(0)
    return CurriculumBatches([start for start, _ in phases], phase_batches)


def eval_batches(config, task: str, rows: int) -> dict[str, np.ndarray]:
    """One deterministic batch of ``rows`` rows of held-out data for ``task`` (cts/tia/mi/vqa or pairs),
    read whole by every process (eval batches are replicated)."""
    data = config.data
    budget = pack_budget(config)
    if task == "pairs":
        # Generic pre-training evaluates on its own held-out edits: the run never meets a cross-modal pair.
        stage = DataStage.GEN_PRETRAIN if data.stage == DataStage.GEN_PRETRAIN else DataStage.STAGE2
        cfg = pipeline_config(data, stage=stage, split=data.eval_split, rows=rows, seed_offset=7)
    elif task == "vqa":
        cfg = pipeline_config(data, stage=DataStage.VQA, split=data.eval_split, rows=rows, seed_offset=7)
    else:
        stage = DataStage.UND_PRETRAIN if task in und_pretrain.ALL_TASKS else DataStage.STAGE1
        cfg = dataclasses.replace(pipeline_config(data, stage=stage, split=data.eval_split, rows=rows,
                                                  seed_offset=7), task_weights=((task, 1.0),))
    cfg = dataclasses.replace(cfg, augment=False, augment_understanding=False, redraw_options=False, cfg_text=0.0,
                              cfg_vit=0.0, cfg_vae=0.0)
    return next(iter(packed_dataset(data.dir, budget, config.model, cfg)))


# ---------------------------------------------------------------------------------------------------------
class _RecordImage:
    """``(record, modality) index -> [H, W, C]`` image in [-1, 1] resized to the pack's VAE image size."""

    def __init__(self, data_dir: str, split: str, keys: list[tuple[int, str]], size: tuple[int, int], channels: int):
        self.data_dir, self.split, self.keys, self.size, self.channels = data_dir, split, keys, size, channels
        self._reader = None

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        if self._reader is None:
            self._reader = RecordReader(self.data_dir, self.split)
        rec, modality = self.keys[int(i)]
        image = resize_image(np.asarray(self._reader[rec]["images"][modality], np.float32), self.size)
        return {"image": np.repeat(image[..., None], self.channels, axis=-1)}


def _record_keys(data_dir: str, split: str) -> list[tuple[int, str]]:
    index = load_index(data_dir, split)
    keys = [(rec, modality) for rec, case in enumerate(index["case"])
            for modality in index["cases"][case]["modalities"]]
    if not keys:
        raise ValueError(f"{data_dir}: split {split} has no images")
    return keys


def record_images(config, max_images: int, split: str | None = None) -> np.ndarray:
    """Up to ``max_images`` slices ``[N, H, W, C]`` of the split, evenly strided over (record, modality)."""
    split = split or config.data.split
    keys = _record_keys(config.data.dir, split)
    picks = np.unique(np.linspace(0, len(keys) - 1, min(max_images, len(keys))).round().astype(int))
    load = _RecordImage(str(config.data.dir), split, keys, tuple(config.data.pack.image_size),
                        int(config.model.vae.in_channels))
    return np.stack([load(i)["image"] for i in picks])


def image_dataset(config, *, shard: int, shards: int, rows: int, split: str | None = None, shuffle: bool = True
                  ) -> grain.IterDataset:
    """Stage-0 stream: single-modality slices as ``{"image": [rows, H, W, C]}`` batches."""
    split = split or config.data.split
    keys = _record_keys(config.data.dir, split)
    ds = grain.MapDataset.range(len(keys))[shard::shards]
    if shuffle:
        ds = ds.shuffle(seed=int(config.data.seed)).repeat()
    size = tuple(config.data.pack.image_size)
    ds = ds.map(_RecordImage(str(config.data.dir), split, keys, size, int(config.model.vae.in_channels)))
    return ds.to_iter_dataset().batch(rows, drop_remainder=True)
