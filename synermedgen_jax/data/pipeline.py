"""Grain input pipelines: samples -> packed rows -> batches.

    a source of samples: the records' instances / pairs (data/record_samples.py) or a SynerMed release build's
    edit chains / conversations (data/release_samples.py), picked by ``config.source`` and the build's manifest
      -> the sample stream (data/stream.py): per task index range, per-process shard, seeded shuffle, repeat,
         mix by weight, random_map to ``(items, tag)`` samples, [optional worker processes]
      -> look-ahead first-fit packing into the static PackBudget (PackIterDataset, data/packing.fill_row)
      -> batch of ``rows_per_batch`` rows per process (leading axis; shard it over local devices).

Every step is a deterministic function of (seed, element index), so iterator state is just indices:
``get_state()`` / ``set_state()`` restore the identical next batch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grain
import numpy as np

from synermedgen_jax.data import synermed
from synermedgen_jax.data.images import image_size
from synermedgen_jax.data.packing import (
    LOOKAHEAD,
    PackBudget,
    PackBuilder,
    PackOverflowError,
    SpecialTokens,
    fill_row,
)
from synermedgen_jax.data.record_samples import RecordSamples
from synermedgen_jax.data.records import RecordReader
from synermedgen_jax.data.release_samples import ReleaseSamples
from synermedgen_jax.data.stream import PipelineConfig, sample_stream
from synermedgen_jax.data.tokenizer import load_tokenizer
from synermedgen_jax.data.volumes import DataError


@dataclasses.dataclass
class _Pending:
    """A sample in the packer's window: its arrival number, the parent's state before it was read, the sample."""

    index: int
    parent_state: Any
    items: list
    tag: str


class _PackIterator(grain.DatasetIterator):
    """Look-ahead first-fit packing (``data.packing.fill_row``) of the parent's ``(items, tag)`` samples.

    State is indices only: the parent's state before the oldest pending sample, that sample's arrival number
    and the arrival numbers of the later samples already packed (taken out of order). A restore re-reads the
    parent from there and skips those, which rebuilds the window exactly (samples are a deterministic function
    of their element index), so the rows after a restore are the rows the uninterrupted run would have made.
    """

    def __init__(self, parent: grain.DatasetIterator, budget: PackBudget, special: SpecialTokens,
                 geometry: Any, seed: int, lookahead: int):
        super().__init__(parent)
        if lookahead < 1:
            raise ValueError(f"data.lookahead must be >= 1 (1 = next-fit), got {lookahead}")
        self._builder = PackBuilder(budget, special, geometry)
        self._seed, self._lookahead = seed, lookahead
        self._rows = 0
        self._window: list[_Pending] = []
        self._arrivals = 0  # samples read from the parent so far
        self._packed_ahead: set[int] = set()  # arrival numbers packed while an older sample still waits
        self._skip: set[int] = set()  # after a restore: arrivals to drop on re-reading (already packed)
        self._ended = False

    def _refill(self) -> bool:
        while not self._ended:
            state = self._parent.get_state()
            try:
                items, tag = next(self._parent)
            except StopIteration:
                self._ended = True
                return False
            index, self._arrivals = self._arrivals, self._arrivals + 1
            if index in self._skip:
                self._skip.discard(index)
                continue
            self._window.append(_Pending(index, state, items, tag))
            return True
        return False

    def __next__(self) -> dict[str, np.ndarray]:
        builder = self._builder
        rng = np.random.default_rng([self._seed, self._rows, 31])  # timestep draws of this row

        def take(pending: _Pending) -> None:
            builder.add(pending.items, rng)
            self._packed_ahead.add(pending.index)

        fill_row(self._window, self._refill, lambda pending: builder.fits(pending.items), take, self._lookahead)
        if builder.empty:
            if not self._window:
                raise StopIteration
            pending = self._window[0]
            raise PackOverflowError(f"sample {pending.tag} needs {builder.need(pending.items)}, more than an empty "
                                    f"pack holds ({builder.budget}); enlarge the pack budget")
        oldest = self._window[0].index if self._window else self._arrivals
        self._packed_ahead = {index for index in self._packed_ahead if index > oldest}
        self._rows += 1
        return builder.build()

    def get_state(self) -> dict:
        if self._window:
            parent, base = self._window[0].parent_state, self._window[0].index
        else:
            parent, base = self._parent.get_state(), self._arrivals
        return {"parent": parent, "rows": self._rows, "arrival": base,
                "packed_ahead": sorted(int(index) for index in self._packed_ahead | self._skip if index > base)}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._rows = int(state["rows"])
        # States written before the look-ahead packer (next-fit) carry neither key: nothing was packed ahead.
        self._arrivals = int(state.get("arrival", 0))
        self._skip = {int(index) for index in state.get("packed_ahead", ())}
        self._packed_ahead = set()
        self._window = []
        self._ended = False
        self._builder.reset()


class PackIterDataset(grain.IterDataset):
    """Look-ahead first-fit packing of ``(items, tag)`` samples into fixed-shape rows (``data.packing``)."""

    def __init__(self, parent: grain.IterDataset, budget: PackBudget, special: SpecialTokens, geometry: Any,
                 seed: int = 0, lookahead: int = LOOKAHEAD):
        super().__init__(parent)
        self._budget, self._special, self._geometry, self._seed = budget, special, geometry, seed
        self._lookahead = lookahead

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._budget, self._special, self._geometry, self._seed,
                             self._lookahead)


_DEFAULT_CONFIG = PipelineConfig()


def sample_dataset(data_dir: str | Path, budget: PackBudget, config: PipelineConfig = _DEFAULT_CONFIG,
                   geometry: Any = None) -> grain.IterDataset:
    """The mixed, sharded, shuffled stream of ``(items, tag)`` samples (before packing) of the build's source:
    a SynerMed release build's edit chains and conversations, else the records' instances and pairs."""
    if synermed.use_release(data_dir, config.source):
        source = ReleaseSamples.for_stream(data_dir, budget, config, geometry)
    else:
        source = RecordSamples(data_dir, budget, config, geometry)
    return sample_stream(source, config)


def slice_shape(data_dir: str | Path, source: str = "auto") -> tuple[int, int]:
    """``(H, W)`` of the build's slices, which the official geometry sizes the pack slots from: the first
    record's first image (a records build: its train split; a SynerMed build: its first edit image, else its
    first conversation image). Raises ``DataError`` (one line) when it cannot be read."""
    try:
        if synermed.use_release(data_dir, source):
            counts = synermed.record_counts(data_dir)
            if counts.get(synermed.EDIT):
                blob = RecordReader(str(data_dir), synermed.EDIT)[0]["images"][0]
            elif counts.get(synermed.CONV):
                path = RecordReader(str(data_dir), synermed.CONV)[0]["images"][0]
                blob = (Path(data_dir) / synermed.SLICE_DIR / path).read_bytes()
            else:
                raise DataError("no records")
            return image_size(blob)
        record = RecordReader(str(data_dir), "train")[0]
        first = next(iter(record["images"].values()))
        return tuple(int(n) for n in np.shape(first)[:2])
    except (OSError, KeyError, IndexError, ValueError, StopIteration, TypeError) as err:
        raise DataError(f"{data_dir}: cannot read the slice shape the official image geometry sizes the pack "
                        f"slots from ({type(err).__name__}: {str(err)[:100]}); build the data first or set "
                        "config.data.pack.{vae,vit,vlm_vit}_resize=None") from None


def packed_dataset(data_dir: str | Path, budget: PackBudget, model_config: Any,
                   config: PipelineConfig = _DEFAULT_CONFIG, special: SpecialTokens | None = None) -> grain.IterDataset:
    """Batches ``{name: [rows_per_batch, ...]}`` of packed rows (see ``data.packing.PackBuilder.build``)."""
    if special is None:
        special = SpecialTokens.from_tokenizer(load_tokenizer(Path(data_dir) / "tokenizer.json"))
    samples = sample_dataset(data_dir, budget, config, geometry=model_config)
    rows = PackIterDataset(samples, budget, special, model_config, seed=config.seed, lookahead=config.lookahead)
    return rows.batch(config.rows_per_batch, drop_remainder=True)
