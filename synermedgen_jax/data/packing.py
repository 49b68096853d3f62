"""Host-side (numpy) pack builder: samples of interleaved text / ViT images / VAE images → fixed-shape arrays.

A *sample* is a list of items (``Text``, ``VitImage``, ``VaeImage``); a *pack* (one batch row) holds as many
samples as fit a fixed budget, so that one compiled step serves the whole run.

Semantics follow BAGEL's ``pack_sequence`` (docs/packing.md):

* text → one ``causal`` split ``[<|im_start|>, ids…, <|im_end|>]``; RoPE ids advance by one per token; with
  ``loss=True`` every position but the last predicts the next token (CE labels ``ids… + <|im_end|>``).
* ViT image → one ``full`` split ``[<|vision_start|>, patches…, <|vision_end|>]`` sharing one RoPE id; the id
  advances by one after it.
* VAE image → ``[<|vision_start|>, latent tokens…, <|vision_end|>]`` sharing one RoPE id; a clean
  (conditioning) image is a ``full`` split and advances the id; a noised target is a ``noise`` split and does not.
* A dropped conditioning item (classifier-free-guidance dropout) disappears; a dropped image still advances the
  RoPE id by one, as in BAGEL.

Layout. Each pack row has an *understanding region* of ``und_tokens`` slots (text, markers, ViT tokens) followed
by a *generation region* of ``gen_tokens`` slots (VAE latent tokens). Attention visibility depends only on the
per-token metadata and on token order inside a split (kernels/attention/), so splitting a sample across the two
regions changes nothing, and each MoT expert runs on a contiguous slice of the sequence: no token is ever
computed by both experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import struct

CAUSAL, FULL, NOISE = 0, 1, 2


@struct.dataclass
class Pack:
    """A batch of packs, the model's input: ``B`` rows of ``Tu`` understanding then ``Tg`` generation tokens.

    Host code (Grain, checkpointable iterators, the mesh placement) moves packs as ``{field: array}`` dicts
    (:meth:`PackBuilder.build`, :func:`stack_rows`); :meth:`from_arrays` is the one conversion to this typed
    pytree, done where a pack enters the model (``training/objective.UnifiedObjective.prepare``, the sampler's
    and the Answerer's :func:`inference.sampler.exact_pack`). Leaves are numpy or jax arrays, or
    ``jax.ShapeDtypeStruct`` when planned. ``P`` ViT patch slots, ``C`` CE slots, ``S`` VAE image slots of
    ``H × W × ch`` pixels (docs/packing.md has the rules that fill them):

    * ``token_ids [B, Tu]`` int32: text and marker ids (pad elsewhere).
    * ``sample_id [B, Tu+Tg]`` int32: sample of each token in its row, −1 for padding.
    * ``split_id [B, Tu+Tg]`` int32: split of each token inside its sample.
    * ``split_kind [B, Tu+Tg]`` int32: ``CAUSAL`` 0, ``FULL`` 1, ``NOISE`` 2 (the visibility rule's kind).
    * ``rope_id [B, Tu+Tg]`` int32: RoPE position id.
    * ``vit_patches [B, P, p·p·ch]`` float32: ViT patches.
    * ``vit_pos_id [B, P]`` int32: NaViT position id ``row·max_side + col`` of each patch.
    * ``vit_image_id [B, P]`` int32: image of each patch in its row, −1 for padding.
    * ``vit_dest [B, P]`` int32: understanding slot each patch's embedding goes to (``Tu``: dropped).
    * ``ce_index [B, C]`` int32: understanding position of each CE slot.
    * ``ce_label [B, C]`` int32: its next-token label.
    * ``ce_mask [B, C]`` float32: 1 for labelled slots.
    * ``vae_images [B, S, H, W, ch]`` float32 in [-1, 1]: VAE image slots.
    * ``latent_index [B, Tg]`` int32: which latent token of which slot (``slot·L + token``) a generation token is.
    * ``latent_pos_id [B, Tg]`` int32: ``row·max_latent_size + col`` into ``latent_pos_embed``.
    * ``timestep_logit [B, Tg]`` float32: one N(0, 1) draw per noised image, shared by its tokens; −inf for
      clean images and padding (t = 0). Drawn on the host by the pack builder's generator, which the Grain
      pipeline seeds per sample and checkpoints with the iterator: a sample's t depends only on the data order,
      not on the device step key, and the pack already knows which tokens form one image.
    * ``mse_mask [B, Tg]`` float32: 1 for the tokens that carry the flow-matching loss (noised images).
    """

    token_ids: Any
    sample_id: Any
    split_id: Any
    split_kind: Any
    rope_id: Any
    vit_patches: Any
    vit_pos_id: Any
    vit_image_id: Any
    vit_dest: Any
    ce_index: Any
    ce_label: Any
    ce_mask: Any
    vae_images: Any
    latent_index: Any
    latent_pos_id: Any
    timestep_logit: Any
    mse_mask: Any

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> Pack:
        """The typed pack of a ``{field: array}`` mapping (extra keys are an error, so is a missing one)."""
        if isinstance(arrays, Pack):
            return arrays
        names = set(PACK_FIELDS)
        if set(arrays) != names:
            raise ValueError(f"Pack.from_arrays: missing {sorted(names - set(arrays))}, "
                             f"unknown {sorted(set(arrays) - names)}")
        return cls(**{name: arrays[name] for name in PACK_FIELDS})

    def arrays(self) -> dict[str, Any]:
        """``{field: array}`` (what Grain and the host-side placement helpers speak)."""
        return {name: getattr(self, name) for name in PACK_FIELDS}

    @property
    def und_tokens(self) -> int:
        return self.token_ids.shape[1]

    @property
    def gen_tokens(self) -> int:
        return self.latent_index.shape[1]

    def meta(self) -> dict[str, Any]:
        """The per-token metadata the decoder reads (``sample_id``, ``split_id``, ``split_kind``, ``rope_id``)."""
        return {name: getattr(self, name) for name in META_FIELDS}


PACK_FIELDS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(Pack))
META_FIELDS = ("sample_id", "split_id", "split_kind", "rope_id")


@dataclasses.dataclass(frozen=True)
class Text:
    """A text span (token ids without bos/eos). ``loss``: CE on it; ``cfg``: may be dropped for CFG."""

    token_ids: Sequence[int]
    loss: bool = False
    cfg: bool = False


@dataclasses.dataclass(frozen=True)
class VitImage:
    """An image for the ViT: ``[H, W]`` or ``[H, W, C]`` float in [-1, 1]; H and W multiples of the patch."""

    pixels: np.ndarray
    cfg: bool = False


@dataclasses.dataclass(frozen=True)
class VaeImage:
    """An image for the VAE: ``[H, W]`` or ``[H, W, C]`` float in [-1, 1]. ``noised``: the generation target."""

    pixels: np.ndarray
    noised: bool = False
    cfg: bool = False


@dataclasses.dataclass(frozen=True)
class Dropped:
    """What is left of a conditioning image removed by CFG dropout: it only advances the RoPE id."""

    kind: str  # "vit" or "vae"


Item = Text | VitImage | VaeImage | Dropped


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    vision_start: int
    vision_end: int
    pad: int = 0

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokens:
        return cls(tokenizer.bos_id, tokenizer.eos_id, tokenizer.vision_start_id, tokenizer.vision_end_id,
                   getattr(tokenizer, "pad_id", 0))


@dataclasses.dataclass(frozen=True)
class PackBudget:
    """Static per-row capacities. ``image_size``/``vit_image_size``: (H, W) of the VAE slots / max ViT size."""

    und_tokens: int
    gen_tokens: int
    vit_patches: int
    vit_images: int
    vae_images: int
    ce_tokens: int
    image_size: tuple[int, int]
    vit_image_size: tuple[int, int]

    @property
    def total_tokens(self) -> int:
        return self.und_tokens + self.gen_tokens

    @classmethod
    def from_config(cls, config: Any) -> PackBudget:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {name: config[name] for name in fields}
        values["image_size"] = tuple(values["image_size"])
        values["vit_image_size"] = tuple(values["vit_image_size"])
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The model numbers the packer needs (read from a model config)."""

    vit_patch: int
    vit_channels: int
    vit_max_side: int
    vae_channels: int
    vae_downsample: int
    latent_patch: int
    max_latent_size: int

    @property
    def latent_stride(self) -> int:
        """Pixels per latent token side (VAE downsample × latent patch), 16 for BAGEL."""
        return self.vae_downsample * self.latent_patch

    @classmethod
    def from_model_config(cls, model_config: Any) -> Geometry:
        return cls(
            vit_patch=model_config.vit.patch_size,
            vit_channels=model_config.vit.num_channels,
            vit_max_side=model_config.vit.max_num_patch_per_side,
            vae_channels=model_config.vae.in_channels,
            vae_downsample=2 ** (len(model_config.vae.ch_mult) - 1),
            latent_patch=model_config.latent_patch_size,
            max_latent_size=model_config.max_latent_size,
        )


class PackOverflowError(ValueError):
    """A sample does not fit an empty pack: the budget is too small for it (never truncated silently)."""


def cfg_dropout(sample: Sequence[Item], rng: np.random.Generator, *, text: float, vit: float,
                vae: float) -> list[Item]:
    """BAGEL's conditioning dropout: each ``cfg=True`` item is dropped with its kind's probability."""
    out: list[Item] = []
    for item in sample:
        if isinstance(item, Text) and item.cfg and rng.random() < text:
            continue
        if isinstance(item, VitImage) and item.cfg and rng.random() < vit:
            out.append(Dropped("vit"))
            continue
        if isinstance(item, VaeImage) and item.cfg and rng.random() < vae:
            out.append(Dropped("vae"))
            continue
        out.append(item)
    return out


def prompt_items(question_ids: Sequence[int], vit_images: Sequence[np.ndarray],
                 label_ids: Sequence[Sequence[int]] = ()) -> list[Item]:
    """An understanding prompt: the question, then each ViT image preceded by its label's tokens when
    ``label_ids`` gives one per image (training packs and the Answerer build prompts with this one rule)."""
    if label_ids and len(label_ids) != len(vit_images):
        raise ValueError(f"prompt_items: {len(label_ids)} labels for {len(vit_images)} images")
    items: list[Item] = [Text(list(question_ids))]
    for i, image in enumerate(vit_images):
        if label_ids:
            items.append(Text(list(label_ids[i])))
        items.append(VitImage(image))
    return items


def _as_channels(pixels: np.ndarray, channels: int, what: str) -> np.ndarray:
    """``[H, W]`` or ``[H, W, C]`` → ``[H, W, channels]`` float32 (grey images are repeated)."""
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3:
        raise ValueError(f"{what}: expected [H, W] or [H, W, C] pixels, got shape {pixels.shape}")
    if pixels.shape[-1] == channels:
        return pixels
    if pixels.shape[-1] == 1:
        return np.repeat(pixels, channels, axis=-1)
    raise ValueError(f"{what}: image has {pixels.shape[-1]} channels, the model takes {channels}")


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """``[H, W, C]`` → ``[(H/p)·(W/p), p·p·C]`` in row-major patch order, (kh, kw, c) inside a patch."""
    height, width, channels = pixels.shape
    grid = pixels.reshape(height // patch, patch, width // patch, patch, channels)
    return grid.transpose(0, 2, 1, 3, 4).reshape(-1, patch * patch * channels)


def grid_position_ids(rows: int, cols: int, max_side: int) -> np.ndarray:
    """Flattened position ids ``row * max_side + col`` (BAGEL's 'extrapolate' NaViT ids), ``[rows·cols]``."""
    row_ids, col_ids = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return (row_ids * max_side + col_ids).reshape(-1).astype(np.int32)


@dataclasses.dataclass
class _Need:
    und: int = 0
    gen: int = 0
    vit_patches: int = 0
    vit_images: int = 0
    vae_images: int = 0
    ce: int = 0


class PackBuilder:
    """Accumulates samples into one fixed-shape pack row. ``fits`` / ``add`` / ``build``."""

    def __init__(self, budget: PackBudget, special: SpecialTokens, geometry: Geometry | Any):
        self.budget = budget
        self.special = special
        self.geometry = geometry if isinstance(geometry, Geometry) else Geometry.from_model_config(geometry)
        stride = self.geometry.latent_stride
        height, width = budget.image_size
        if height % stride or width % stride:
            raise ValueError(f"PackBudget.image_size {budget.image_size} must be a multiple of {stride}")
        self.slot_grid = (height // stride, width // stride)  # latent tokens per slot side
        self.reset()

    # ----------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Empties the builder (all slots back to padding)."""
        budget, geometry = self.budget, self.geometry
        total = budget.total_tokens
        vit_dim = geometry.vit_patch**2 * geometry.vit_channels
        self.token_ids = np.full(budget.und_tokens, self.special.pad, np.int32)
        self.sample_id = np.full(total, -1, np.int32)
        self.split_id = np.zeros(total, np.int32)
        self.split_kind = np.zeros(total, np.int32)
        self.rope_id = np.zeros(total, np.int32)
        self.vit_patches = np.zeros((budget.vit_patches, vit_dim), np.float32)
        self.vit_pos_id = np.zeros(budget.vit_patches, np.int32)
        self.vit_image_id = np.full(budget.vit_patches, -1, np.int32)
        self.vit_dest = np.full(budget.vit_patches, budget.und_tokens, np.int32)  # out of range = dropped
        self.ce_index = np.zeros(budget.ce_tokens, np.int32)
        self.ce_label = np.zeros(budget.ce_tokens, np.int32)
        self.ce_mask = np.zeros(budget.ce_tokens, np.float32)
        height, width = budget.image_size
        self.vae_images = np.zeros((budget.vae_images, height, width, geometry.vae_channels), np.float32)
        self.latent_index = np.zeros(budget.gen_tokens, np.int32)
        self.latent_pos_id = np.zeros(budget.gen_tokens, np.int32)
        self.timestep_logit = np.full(budget.gen_tokens, -np.inf, np.float32)
        self.mse_mask = np.zeros(budget.gen_tokens, np.float32)
        self.used = _Need()
        self.num_samples = 0

    def need(self, sample: Sequence[Item]) -> _Need:
        """Capacity a sample takes; raises on images of unusable sizes."""
        need = _Need()
        for item in sample:
            if isinstance(item, Text):
                need.und += len(item.token_ids) + 2
                need.ce += (len(item.token_ids) + 1) if item.loss else 0
            elif isinstance(item, VitImage):
                rows, cols = self._vit_grid(item.pixels)
                need.und += rows * cols + 2
                need.vit_patches += rows * cols
                need.vit_images += 1
            elif isinstance(item, VaeImage):
                rows, cols = self._latent_grid(item.pixels)
                need.und += 2
                need.gen += rows * cols
                need.vae_images += 1
        return need

    def fits(self, sample: Sequence[Item]) -> bool:
        need, used, budget = self.need(sample), self.used, self.budget
        return (
            used.und + need.und <= budget.und_tokens
            and used.gen + need.gen <= budget.gen_tokens
            and used.vit_patches + need.vit_patches <= budget.vit_patches
            and used.vit_images + need.vit_images <= budget.vit_images
            and used.vae_images + need.vae_images <= budget.vae_images
            and used.ce + need.ce <= budget.ce_tokens
        )

    @property
    def empty(self) -> bool:
        return self.num_samples == 0

    # ----------------------------------------------------------------------------------------------------
    def _vit_grid(self, pixels: np.ndarray) -> tuple[int, int]:
        height, width = np.shape(pixels)[:2]
        patch, max_side = self.geometry.vit_patch, self.geometry.vit_max_side
        max_h, max_w = self.budget.vit_image_size
        if height % patch or width % patch or height > max_h or width > max_w:
            raise ValueError(f"ViT image of size {height}x{width}: must be multiples of {patch} and at most "
                             f"{max_h}x{max_w} (PackBudget.vit_image_size)")
        if height // patch > max_side or width // patch > max_side:
            raise ValueError(f"ViT image {height}x{width} exceeds {max_side} patches per side")
        return height // patch, width // patch

    def _latent_grid(self, pixels: np.ndarray) -> tuple[int, int]:
        height, width = np.shape(pixels)[:2]
        stride = self.geometry.latent_stride
        max_h, max_w = self.budget.image_size
        if height % stride or width % stride or height > max_h or width > max_w:
            raise ValueError(f"VAE image of size {height}x{width}: must be multiples of {stride} and at most "
                             f"{max_h}x{max_w} (PackBudget.image_size)")
        if max(height, width) // stride > self.geometry.max_latent_size:
            raise ValueError(f"VAE image {height}x{width} exceeds max_latent_size {self.geometry.max_latent_size}")
        return height // stride, width // stride

    def add(self, sample: Sequence[Item], rng: np.random.Generator) -> None:
        """Appends a sample; ``rng`` draws the noised images' timestep logits (BAGEL: N(0, 1))."""
        if not self.fits(sample):
            if self.empty:
                raise PackOverflowError(f"sample needs {self.need(sample)} but the budget is {self.budget}")
            raise PackOverflowError("sample does not fit the remaining budget; build() this pack first")
        sample_index = self.num_samples
        rope = 0
        split = 0
        for item in sample:
            if isinstance(item, Dropped):
                rope += 1
                continue
            if isinstance(item, Text):
                ids = [self.special.bos, *item.token_ids, self.special.eos]
                positions = self._place_und(ids, sample_index, split, CAUSAL, np.arange(rope, rope + len(ids)))
                if item.loss:
                    labels = [*item.token_ids, self.special.eos]
                    self._add_ce(positions[:-1], labels)
                rope += len(ids)
            elif isinstance(item, VitImage):
                self._add_vit(item, sample_index, split, rope)
                rope += 1
            elif isinstance(item, VaeImage):
                self._add_vae(item, sample_index, split, rope, rng)
                rope += 0 if item.noised else 1
            else:
                raise TypeError(f"unknown sample item {type(item).__name__}")
            split += 1
        self.num_samples += 1

    def _place_und(self, ids: Sequence[int], sample_index: int, split: int, kind: int,
                   rope_ids: np.ndarray) -> np.ndarray:
        start = self.used.und
        positions = np.arange(start, start + len(ids))
        self.token_ids[positions] = ids
        self._set_meta(positions, sample_index, split, kind, rope_ids)
        self.used.und += len(ids)
        return positions

    def _set_meta(self, positions: np.ndarray, sample_index: int, split: int, kind: int, rope_ids) -> None:
        self.sample_id[positions] = sample_index
        self.split_id[positions] = split
        self.split_kind[positions] = kind
        self.rope_id[positions] = rope_ids

    def _add_ce(self, positions: np.ndarray, labels: Sequence[int]) -> None:
        start = self.used.ce
        slots = np.arange(start, start + len(labels))
        self.ce_index[slots] = positions
        self.ce_label[slots] = labels
        self.ce_mask[slots] = 1.0
        self.used.ce += len(labels)

    def _add_vit(self, item: VitImage, sample_index: int, split: int, rope: int) -> None:
        rows, cols = self._vit_grid(item.pixels)
        pixels = _as_channels(item.pixels, self.geometry.vit_channels, "VitImage")
        count = rows * cols
        self._place_und([self.special.vision_start], sample_index, split, FULL, rope)
        und_start = self.used.und
        und_positions = np.arange(und_start, und_start + count)
        self._set_meta(und_positions, sample_index, split, FULL, rope)
        self.used.und += count
        self._place_und([self.special.vision_end], sample_index, split, FULL, rope)
        patch_slots = np.arange(self.used.vit_patches, self.used.vit_patches + count)
        self.vit_patches[patch_slots] = patchify(pixels, self.geometry.vit_patch)
        self.vit_pos_id[patch_slots] = grid_position_ids(rows, cols, self.geometry.vit_max_side)
        self.vit_image_id[patch_slots] = self.used.vit_images
        self.vit_dest[patch_slots] = und_positions
        self.used.vit_patches += count
        self.used.vit_images += 1

    def _add_vae(self, item: VaeImage, sample_index: int, split: int, rope: int,
                 rng: np.random.Generator) -> None:
        rows, cols = self._latent_grid(item.pixels)
        pixels = _as_channels(item.pixels, self.geometry.vae_channels, "VaeImage")
        kind = NOISE if item.noised else FULL
        slot = self.used.vae_images
        self.vae_images[slot, : pixels.shape[0], : pixels.shape[1]] = pixels
        self._place_und([self.special.vision_start], sample_index, split, kind, rope)
        count = rows * cols
        gen_slots = np.arange(self.used.gen, self.used.gen + count)
        self._set_meta(self.budget.und_tokens + gen_slots, sample_index, split, kind, rope)
        slot_rows, slot_cols = self.slot_grid
        row_ids, col_ids = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        self.latent_index[gen_slots] = (slot * slot_rows * slot_cols + row_ids * slot_cols + col_ids).reshape(-1)
        self.latent_pos_id[gen_slots] = grid_position_ids(rows, cols, self.geometry.max_latent_size)
        if item.noised:
            self.timestep_logit[gen_slots] = rng.standard_normal()
            self.mse_mask[gen_slots] = 1.0
        self.used.gen += count
        self._place_und([self.special.vision_end], sample_index, split, kind, rope)
        self.used.vae_images += 1

    # ----------------------------------------------------------------------------------------------------
    def build(self) -> dict[str, np.ndarray]:
        """Returns the pack row (fixed shapes; :class:`Pack`'s fields without the ``[B]`` axis, as a dict: what
        Grain batches and checkpoints) and resets the builder."""
        row = {
            "token_ids": self.token_ids,
            "sample_id": self.sample_id,
            "split_id": self.split_id,
            "split_kind": self.split_kind,
            "rope_id": self.rope_id,
            "vit_patches": self.vit_patches,
            "vit_pos_id": self.vit_pos_id,
            "vit_image_id": self.vit_image_id,
            "vit_dest": self.vit_dest,
            "ce_index": self.ce_index,
            "ce_label": self.ce_label,
            "ce_mask": self.ce_mask,
            "vae_images": self.vae_images,
            "latent_index": self.latent_index,
            "latent_pos_id": self.latent_pos_id,
            "timestep_logit": self.timestep_logit,
            "mse_mask": self.mse_mask,
        }
        self.reset()
        return row


LOOKAHEAD = 32  # default look-ahead window of the packer (samples); 1 is next-fit


def fill_row(window: list, refill: Callable[[], bool], fits: Callable[[Any], bool], take: Callable[[Any], None],
             lookahead: int) -> int:
    """One row of look-ahead first-fit packing, the one rule the pipeline and the packing report share.

    ``window`` holds the pending samples in arrival order. Scanning it front to back, every sample that
    ``fits`` the row is ``take``-n (and leaves the window), the rest stay in order; after each sample taken
    ``refill()`` appends the next arrival until ``lookahead`` are pending (it returns False when the stream
    has ended). The row is done when a scan reaches the end of a full window (or of the stream).

    Wait bound: an empty row always takes the window's oldest sample (one that does not fit an empty row is a
    :class:`PackOverflowError` for the caller), so every row moves each pending sample at least one place
    forward, and a sample is packed at the latest ``lookahead`` rows after the row that was filling when it
    arrived. With ``lookahead`` 1 this is next-fit (a row closes at the first sample that does not fit).
    Returns the number of samples taken.
    """
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")
    taken, index = 0, 0
    while True:
        while len(window) < lookahead and refill():
            pass
        if index >= len(window):
            return taken
        if fits(window[index]):
            take(window.pop(index))
            taken += 1
        else:
            index += 1


def pack_samples(samples: Sequence[Sequence[Item]], builder: PackBuilder, rng: np.random.Generator,
                 lookahead: int = 1) -> list[dict[str, np.ndarray]]:
    """Packs ``samples`` into rows with :func:`fill_row` (``lookahead`` 1: next-fit in order, the default here;
    the Grain pipeline uses :data:`LOOKAHEAD`). Raises :class:`PackOverflowError` for a sample no row holds."""
    stream, window, rows = iter(samples), [], []

    def refill() -> bool:
        sample = next(stream, None)
        if sample is None:
            return False
        window.append(sample)
        return True

    while True:
        fill_row(window, refill, builder.fits, lambda sample: builder.add(sample, rng), lookahead)
        if builder.empty:
            if window:
                raise PackOverflowError(f"sample needs {builder.need(window[0])} but the budget is {builder.budget}")
            return rows
        rows.append(builder.build())


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks pack rows into a batch: every array gains a leading ``[B]`` axis."""
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def empty_row(builder: PackBuilder) -> dict[str, np.ndarray]:
    """An all-padding row (used to fill a batch to its static size); the builder must be empty."""
    if not builder.empty:
        raise ValueError("empty_row: the builder holds samples; build() them first")
    return builder.build()


REAL_COUNT_KEYS = ("und_tokens", "gen_tokens", "vit_patches", "vit_images", "vae_images", "ce_tokens", "samples",
                   "mse_tokens")


def real_counts(arrays: Mapping[str, Any], geometry: Geometry | PackBuilder | int | Any) -> dict[str, np.ndarray]:
    """Per-row *real* (non-padding) counts of each region of packs, read off the pack arrays alone.

    ``arrays``: a pack row (:meth:`PackBuilder.build`, no batch axis) or a batch (:func:`stack_rows`, a
    :class:`Pack` too): ``token_ids [..., Tu]``, ``sample_id [..., Tu+Tg]``, ``vit_image_id [..., P]``,
    ``ce_mask [..., C]``, ``vae_images [..., S, H, W, ch]``, ``latent_index [..., Tg]``, ``mse_mask [..., Tg]``
    (numpy or jax arrays). ``geometry``: a :class:`Geometry`, a :class:`PackBuilder`, a model config, or the
    latent stride in pixels (VAE downsample × latent patch; 16 for BAGEL), needed to know which VAE slot a
    ``latent_index`` points into (``slot · L + token``, ``L = (H/stride)·(W/stride)``).

    Returns ``{key: int64 array of shape [...]}`` (``[]`` for one row, ``[B]`` for a batch) for
    :data:`REAL_COUNT_KEYS`: ``und_tokens`` / ``gen_tokens`` (``sample_id >= 0`` per region), ``vit_patches``
    (``vit_image_id >= 0``), ``vit_images`` (distinct ids: they are numbered 0…n−1 in a row), ``vae_images``
    (slots some real generation token's ``latent_index`` points into: a slot holds an image iff its latents
    enter the sequence), ``ce_tokens`` (``ce_mask > 0``), ``samples`` (``max(sample_id) + 1``: samples are
    numbered 0…n−1 in a row) and ``mse_tokens`` (``mse_mask > 0``: the noised latents).
    Slot counts are the arrays' trailing sizes (``Tu``, ``Tg``, ``P``, ``C``, ``S``), so ``real / slots`` is the
    fill. The one definition of "real" the packing report and per-step logging share.
    """
    if isinstance(geometry, PackBuilder):
        stride = geometry.geometry.latent_stride
    elif isinstance(geometry, Geometry):
        stride = geometry.latent_stride
    elif isinstance(geometry, (int, np.integer)):
        stride = int(geometry)
    else:
        stride = Geometry.from_model_config(geometry).latent_stride
    get = {key: np.asarray(arrays[key]) for key in
           ("token_ids", "sample_id", "vit_image_id", "ce_mask", "vae_images", "latent_index", "mse_mask")}
    und = get["token_ids"].shape[-1]
    sample_id = get["sample_id"]
    real = sample_id >= 0
    slots, height, width = get["vae_images"].shape[-4:-1]
    per_slot = (height // stride) * (width // stride)
    gen_real = real[..., und:]
    # Which slot each real generation token reads; padding tokens (latent_index 0) are sent to slot S (dropped).
    slot_of = np.where(gen_real, get["latent_index"] // max(per_slot, 1), slots)
    one_hot = slot_of[..., None] == np.arange(slots)  # [..., Tg, S]
    return {
        "und_tokens": real[..., :und].sum(-1).astype(np.int64),
        "gen_tokens": gen_real.sum(-1).astype(np.int64),
        "vit_patches": (get["vit_image_id"] >= 0).sum(-1).astype(np.int64),
        "vit_images": (get["vit_image_id"].max(-1, initial=-1) + 1).astype(np.int64),
        "vae_images": one_hot.any(-2).sum(-1).astype(np.int64),
        "ce_tokens": (get["ce_mask"] > 0).sum(-1).astype(np.int64),
        "samples": (sample_id.max(-1, initial=-1) + 1).astype(np.int64),
        "mse_tokens": (get["mse_mask"] > 0).sum(-1).astype(np.int64),
    }
