"""Grain input pipelines: instances / pairs -> samples -> packed rows -> batches.

    records (ArrayRecordDataSource, random access)
      -> per task: index range, per-process shard (jax.process_index/count), seeded shuffle, repeat
      -> mix by ratio (Stage I tasks; Stage II pairs; or both; or the same-modality edits of gen_pretrain)
      -> random_map: read the referenced records, build the sample (Text / VitImage / VaeImage items),
         paired augmentation (one spatial transform for source and target), CFG dropout for Stage II
      -> [optional worker processes]
      -> look-ahead first-fit packing into the static PackBudget (PackIterDataset, data/packing.fill_row)
      -> batch of ``rows_per_batch`` rows per process (leading axis; shard it over local devices).

Every step is a deterministic function of (seed, element index), so iterator state is just indices:
``get_state()`` / ``set_state()`` restore the identical next batch.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from skimage.transform import AffineTransform, warp

from synermedgen_jax.data import prompts
from synermedgen_jax.data.geometry import ImageRules, PackImages
from synermedgen_jax.data.packing import (
    LOOKAHEAD,
    PackBudget,
    PackBuilder,
    PackOverflowError,
    SpecialTokens,
    Text,
    VaeImage,
    VitImage,
    cfg_dropout,
    fill_row,
    prompt_items,
)
from synermedgen_jax.data.records import RecordReader
from synermedgen_jax.data.understanding import DEFAULT_MIX, TASKS, load_instances, render
from synermedgen_jax.data.volumes import MODALITY_NAMES, DataError

STAGES = ("stage1", "stage2", "mixed", "vqa", "gen_pretrain")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    stage: str = "stage1"  # stage1 (CTS/TIA/MI) | stage2 (pairs) | mixed | vqa (non-aligned control) | gen_pretrain
    split: str = "train"
    seed: int = 0
    task_weights: tuple[tuple[str, float], ...] = tuple(DEFAULT_MIX.items())  # weight 0 = ablate a task
    stage2_weight: float = 0.5  # share of Stage II samples in "mixed"
    cfg_text: float = 0.1
    cfg_vit: float = 0.3
    cfg_vae: float = 0.3
    augment: bool = False
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
    source: str = "auto"  # auto (from the build's manifest) | records | synermed (data/synermed.py)
    resize: ImageRules = ImageRules()  # the official aspect-preserving geometry (data/geometry.py); None: squares
    lookahead: int = LOOKAHEAD  # packer window in samples (data/packing.fill_row); 1 = next-fit


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


class SampleMaker:
    """Element ``(task, row)`` -> ``(items, tag)``. Opens the record reader lazily (workers re-open it)."""

    def __init__(self, data_dir: str, split: str, tables: Mapping[str, Mapping[str, np.ndarray]], tokenizer_path: str,
                 budget: PackBudget, config: PipelineConfig):
        self.data_dir, self.split, self.tables = data_dir, split, tables
        self.tokenizer_path, self.budget, self.config = tokenizer_path, budget, config
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
            from synermedgen_jax.data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def _image(self, rec: int, modality: str, cache: dict) -> np.ndarray:
        if rec not in cache:
            cache[rec] = self.reader[rec]
        record = cache[rec]
        if modality not in record["images"]:
            raise KeyError(f"record {rec} of {self.split} has no {modality} image")
        return np.asarray(record["images"][modality], np.float32)

    def __call__(self, element: tuple[str, int], rng: np.random.Generator):
        task, row = element
        cache: dict = {}
        if task == "pairs":
            return self._stage2(int(row), rng, cache)
        if task == "gen_pretrain":
            return self._gen_pretrain(int(row), rng, cache)
        rendered = render(self.tables[task], int(row))
        count = len(rendered.images)
        images = [self.images.vlm_vit(self._image(rec, modality, cache), images=count)
                  for rec, modality in rendered.images]
        items: list = prompt_items(self.tokenizer.encode(rendered.question), images,
                                   [self.tokenizer.encode(label) for label in rendered.labels])
        items.append(Text(self.tokenizer.encode(rendered.answer), loss=True))
        return items, f"{task}#{row}"

    def _stage2(self, row: int, rng: np.random.Generator, cache: dict):
        pairs = self.tables["pairs"]
        rec = int(pairs["rec"][row])
        src, tgt = MODALITY_NAMES[int(pairs["src"][row])], MODALITY_NAMES[int(pairs["tgt"][row])]
        source, target = self._image(rec, src, cache), self._image(rec, tgt, cache)
        if self.config.augment:
            source, target = paired_augment([source, target], rng, self.config)
        prompt = prompts.generation_instruction(int(pairs["template"][row]), src, tgt, cache[rec]["anatomy"])
        vae, vit = self.images.vae, self.images.vit
        items = [Text(self.tokenizer.encode(prompt), cfg=True), VitImage(vit(source), cfg=True),
                 VaeImage(vae(source), cfg=True), VaeImage(vae(target), noised=True)]
        items = cfg_dropout(items, rng, text=self.config.cfg_text, vit=self.config.cfg_vit,
                            vae=self.config.cfg_vae)
        return items, f"pairs#{row}"

    def _gen_pretrain(self, row: int, rng: np.random.Generator, cache: dict):
        """A same-modality edit (data/gen_pretrain.py), laid out as a Stage II sample."""
        from synermedgen_jax.data import gen_pretrain

        table = self.tables["gen_pretrain"]
        modality = MODALITY_NAMES[int(table["src"][row])]
        rec, tgt_rec = int(table["rec"][row]), int(table["tgt_rec"][row])
        base, neighbour = self._image(rec, modality, cache), self._image(tgt_rec, modality, cache)
        if self.config.augment:  # before the edit, so a flip or a neighbour stays the edit the text names
            base, neighbour = paired_augment([base, neighbour], rng, self.config)
        edit = gen_pretrain.EDITS[int(table["edit"][row])]
        source, target = gen_pretrain.apply_edit(edit, base, neighbour, rng)
        prompt = prompts.gen_pretrain_instruction(edit, int(table["template"][row]), modality)
        vae, vit = self.images.vae, self.images.vit
        items = [Text(self.tokenizer.encode(prompt), cfg=True), VitImage(vit(source), cfg=True),
                 VaeImage(vae(source), cfg=True), VaeImage(vae(target), noised=True)]
        items = cfg_dropout(items, rng, text=self.config.cfg_text, vit=self.config.cfg_vit,
                            vae=self.config.cfg_vae)
        return items, f"gen_pretrain#{row}"


class Tag:
    """``i -> (task, i)`` (a class, not a lambda, so worker processes can receive it)."""

    def __init__(self, task: str):
        self.task = task

    def __call__(self, i):
        return self.task, int(i)


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


def _weights(config: PipelineConfig) -> dict[str, float]:
    if config.stage not in STAGES:
        raise ValueError(f"stage {config.stage!r}: expected one of {STAGES}")
    if config.stage == "stage2":
        return {"pairs": 1.0}
    if config.stage == "vqa":
        return {"vqa": 1.0}
    if config.stage == "gen_pretrain":
        return {"gen_pretrain": 1.0}
    weights = {t: float(w) for t, w in config.task_weights if w > 0}
    unknown = set(weights) - set(TASKS)
    if unknown:
        raise ValueError(f"task_weights: unknown tasks {sorted(unknown)}")
    if config.stage == "mixed":
        total = sum(weights.values())
        weights = {t: w / total * (1 - config.stage2_weight) for t, w in weights.items()}
        weights["pairs"] = config.stage2_weight
    return weights


def sample_dataset(data_dir: str | Path, budget: PackBudget, config: PipelineConfig = PipelineConfig(),
                   geometry: Any = None) -> grain.IterDataset:
    """The mixed, sharded, shuffled stream of ``(items, tag)`` samples (before packing)."""
    from synermedgen_jax.data import synermed

    if synermed.use_release(data_dir, config.source):  # a SynerMed release build: its own samples
        return synermed.sample_dataset(data_dir, budget, config, geometry)
    data_dir = str(data_dir)
    tables = load_instances(Path(data_dir) / "instances" / f"{config.split}.npz")
    weights = _weights(config)
    if "gen_pretrain" in weights:  # derived from the slice index: builds need no new table
        from synermedgen_jax.data.gen_pretrain import edit_table
        from synermedgen_jax.data.records import load_index

        tables = {**tables, "gen_pretrain": edit_table(load_index(data_dir, config.split))}
    if config.process_index is None or config.process_count is None:
        import jax

        index, count = jax.process_index(), jax.process_count()
    else:
        index, count = config.process_index, config.process_count
    datasets, mix = [], []
    for k, (task, weight) in enumerate(sorted(weights.items())):
        n = len(tables[task]["rec" if task in ("pairs", "gen_pretrain") else "task"])
        if n == 0:
            raise ValueError(f"{data_dir}: split {config.split} has no {task} instances")
        ds = grain.MapDataset.range(n)[index::count]  # per-process shard of the instance rows
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed * 1000 + k)
        if config.repeat:
            ds = ds.repeat()
        datasets.append(ds.map(Tag(task)))
        mix.append(weight)
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, mix)
    maker = SampleMaker(data_dir, config.split, tables, str(Path(data_dir) / "tokenizer.json"), budget, config)
    ds = ds.random_map(maker, seed=config.seed)
    it = ds.to_iter_dataset()
    if config.workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.workers))
    return it


def slice_shape(data_dir: str | Path, source: str = "auto") -> tuple[int, int]:
    """``(H, W)`` of the build's slices, which the official geometry sizes the pack slots from: the first
    record's first image (a records build: its train split; a SynerMed build: its first edit image, else its
    first conversation image). Raises ``DataError`` (one line) when it cannot be read."""
    from synermedgen_jax.data import synermed

    try:
        if synermed.use_release(data_dir, source):
            from PIL import Image

            counts = synermed.record_counts(data_dir)
            if counts.get(synermed.EDIT):
                blob = RecordReader(str(data_dir), synermed.EDIT)[0]["images"][0]
            elif counts.get(synermed.CONV):
                path = RecordReader(str(data_dir), synermed.CONV)[0]["images"][0]
                blob = (Path(data_dir) / synermed.SLICE_DIR / path).read_bytes()
            else:
                raise DataError("no records")
            width, height = Image.open(io.BytesIO(blob)).size
            return int(height), int(width)
        record = RecordReader(str(data_dir), "train")[0]
        first = next(iter(record["images"].values()))
        return tuple(int(n) for n in np.shape(first)[:2])
    except (OSError, KeyError, IndexError, ValueError, StopIteration, TypeError) as err:
        raise DataError(f"{data_dir}: cannot read the slice shape the official image geometry sizes the pack "
                        f"slots from ({type(err).__name__}: {str(err)[:100]}); build the data first or set "
                        "config.data.pack.{vae,vit,vlm_vit}_resize=None") from None


def packed_dataset(data_dir: str | Path, budget: PackBudget, model_config: Any, config: PipelineConfig =
                   PipelineConfig(), special: SpecialTokens | None = None) -> grain.IterDataset:
    """Batches ``{name: [rows_per_batch, ...]}`` of packed rows (see ``data.packing.PackBuilder.build``)."""
    if special is None:
        from synermedgen_jax.data.tokenizer import load_tokenizer

        special = SpecialTokens.from_tokenizer(load_tokenizer(Path(data_dir) / "tokenizer.json"))
    samples = sample_dataset(data_dir, budget, config, geometry=model_config)
    rows = PackIterDataset(samples, budget, special, model_config, seed=config.seed, lookahead=config.lookahead)
    return rows.batch(config.rows_per_batch, drop_remainder=True)
