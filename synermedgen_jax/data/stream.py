"""The Grain sample stream, written once for every source of samples.

    source.rows: {task: row count}, source.weights: {task: mix weight}    (a SampleSource)
      -> per task: index range, per-process shard (jax.process_index/count), seeded shuffle, repeat, tag (task, i)
      -> mix by weight (one task: that task alone)
      -> random_map(source): (task, i), rng -> (items, tag), or None for a sample the source skips (dropped)
      -> [optional worker processes]

Two sources (``data/pipeline.sample_dataset`` picks one from ``config.source`` and the build's manifest): the
NIfTI build's records (data/record_samples.py) and a SynerMed release build (data/release_samples.py).
Every step is a deterministic function of (seed, element index), so iterator state is just indices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol

import grain
import jax
import numpy as np
from absl import flags

from synermedgen_jax.data.geometry import ImageRules
from synermedgen_jax.data.packing import LOOKAHEAD
from synermedgen_jax.data.understanding import DEFAULT_MIX
from synermedgen_jax.stages import DataStage


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Settings of the stream, its sources and the packer (training/inputs.pipeline_config fills it from
    ``config.data``)."""

    stage: str = DataStage.STAGE1  # stages.DataStage: stage1 | stage2 | mixed | vqa | gen_pretrain
    split: str = "train"
    seed: int = 0
    task_weights: tuple[tuple[str, float], ...] = tuple(DEFAULT_MIX.items())  # weight 0 = ablate a task
    stage2_weight: float = 0.5  # share of Stage II samples in "mixed"
    cfg_text: float = 0.1
    cfg_vit: float = 0.3
    cfg_vae: float = 0.3
    augment: bool = False  # Stage II pairs and gen_pretrain edits: one spatial transform per pair
    augment_understanding: bool = False  # Stage I instances: one spatial transform for all of an instance's images
    redraw_options: bool = False  # Stage I / VQA instances: option order, template, TIA phrasing drawn per sample
    aug_rotate_deg: float = 5.0
    aug_scale: float = 0.05
    aug_shift: float = 0.04  # fraction of the image side
    aug_flip: bool = True
    rows_per_batch: int = 2
    shuffle: bool = True
    repeat: bool = True
    process_index: int | None = None  # None: jax.process_index()
    process_count: int | None = None
    workers: int = 0  # grain worker processes for sample building; 0 = in-process (best on 2 cores)
    source: str = "auto"  # auto (from the build's manifest) | records | synermed (data/synermed.use_release)
    resize: ImageRules = ImageRules()  # the official aspect-preserving geometry (data/geometry.py); None: squares
    lookahead: int = LOOKAHEAD  # packer window in samples (data/packing.fill_row); 1 = next-fit


class SampleSource(Protocol):
    """What the stream mixes: tasks of numbered rows, their weights, and the sample of one row.

    ``rows`` and ``weights`` name the same tasks (those the data stage mixes, none of them empty). Called with
    ``((task, row), rng)``, a source returns ``(items, tag)`` (data/packing items, a ``"task#row"`` tag) or None
    to skip the row. It must pickle (worker processes receive it), so open files lazily."""

    rows: Mapping[str, int]
    weights: Mapping[str, float]

    def __call__(self, element: tuple[str, int], rng: np.random.Generator) -> tuple[list, str] | None: ...


class Tag:
    """``i -> (task, i)`` (a class, not a lambda, so worker processes can receive it)."""

    def __init__(self, task: str):
        self.task = task

    def __call__(self, i):
        return self.task, int(i)


def _not_none(x) -> bool:
    return x is not None


def process_share(config: PipelineConfig) -> tuple[int, int]:
    """``(index, count)`` of this stream's share: the config's, else this JAX process of all of them."""
    if config.process_index is None or config.process_count is None:
        return jax.process_index(), jax.process_count()
    return config.process_index, config.process_count


def sample_stream(source: SampleSource, config: PipelineConfig) -> grain.IterDataset:
    """The mixed, sharded, shuffled stream of ``(items, tag)`` samples of ``source`` (before packing). Process
    ``p`` of ``P`` reads rows ``p::P`` of each task only."""
    index, count = process_share(config)
    datasets, mix = [], []
    for k, task in enumerate(sorted(source.weights)):
        ds = grain.MapDataset.range(source.rows[task])[index::count]
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed * 1000 + k)
        if config.repeat:
            ds = ds.repeat()
        datasets.append(ds.map(Tag(task)))
        mix.append(source.weights[task])
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, mix)
    it = ds.random_map(source, seed=config.seed).to_iter_dataset().filter(_not_none)
    if config.workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.workers))
    return it
