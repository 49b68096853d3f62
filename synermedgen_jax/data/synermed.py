"""The published SynerMed release: its row formats, which rows the official loaders train (validation), and
their sample semantics as plans (which image and text goes where); data/release_samples.py makes the samples.

The release is one folder::

    SynerMed/
      SynerMed.parquet   generation: ``image_list`` (list of PNG bytes) and ``instruction_list`` (list of lists of
                         strings; ``instruction_list[i-1]`` holds alternative phrasings of the step image i-1 → i)
      SynerMed.jsonl     understanding: one JSON object per line, ``image`` (a path relative to ``slice/`` or a
                         list of them) and ``conversations`` (``{"from": "human"|"gpt", "value": ...}``)
      slice/<modality>/*.png

``build-data --source synermed`` (data/synermed_build.py) validates every row and line and copies the good ones
into ArrayRecord shards (``records/edit-NNNNN`` per Parquet row group, ``records/conv-NNNNN`` per JSONL chunk);
this module holds the official loaders' semantics those records are read with:

* Edit chains (Stage II), as BAGEL's ``UnifiedEditIterableDataset.parse_row``: a start image and an end image at
  most two steps later are drawn; the start image is conditioning (clean VAE latents, then ViT tokens; no loss).
  A 2-step hop either (probability 1/2) concatenates one phrasing per step into one instruction
  (``"A. B."``), dropping the intermediate image, or interleaves instruction, intermediate image (noised with
  the loss, then clean VAE and ViT copies as conditioning for the next step) and the next instruction. The end
  image is the noised target with the loss. As in the official loader, a concatenated hop that ends on the
  chain's last image is shortened by one step (``SynerMedConfig.shorten_concat_at_end``). Instructions and
  conditioning images may be dropped for classifier-free guidance; images go through RGB conversion.
* Combined rows (Stage II), as SynerMedGen's ``edit_dataset_new.py``: a ``combined_instruction`` value, or an
  ``instruction_list`` with one step for three or more images, is one instruction for the whole row: every
  image but the last is conditioning (VAE, then ViT), then the instruction, then the last image as the target.
* Conversations (Stage I), as BAGEL's ``SftJSONLIterableDataset.change_format``: human turns are split at the
  ``<image>`` markers (text without loss, each marker the next image as ViT tokens), gpt turns are text with
  the loss. Markers beyond the images are dropped, as the official loader does (``conversation_plan``).
  (The build already dropped conversations without a gpt turn.)

Images decode as in the official loaders, which set ``ImageFile.LOAD_TRUNCATED_IMAGES``: a truncated PNG is
kept, its missing part black (data/images.py ``decode_image``; the setting is scoped to that one decode).
Routes named by instructions and image folders: data/route_text.py.

Record payloads are msgpack (data/records.py, no pickle): edits keep the Parquet's original PNG bytes;
conversations keep the image paths relative to ``slice/`` and read them through the build's ``slice`` link.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from synermedgen_jax.data.images import decode_image
from synermedgen_jax.data.route_text import chain_modalities, route_name, step_route
from synermedgen_jax.data.volumes import DataError

PARQUET_NAME = "SynerMed.parquet"
JSONL_NAME = "SynerMed.jsonl"
SLICE_DIR = "slice"
EDIT, CONV = "edit", "conv"
KINDS = (EDIT, CONV)
IMAGE_MARKER = "<image>"
SOURCE_NAME = "synermed"

# ---------------------------------------------------------------------------------------- row validation


class RowError(DataError):
    """Why the build skips a release row or line: ``code`` is the reason's stable name (the summary counts rows by
    it), the message says which image, step, turn or path and what is wrong."""

    def __init__(self, code: str, detail: str | None = None):
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


# Kept rows that the official loaders read leniently, counted in the build summary (``kept_as_official``).
KEPT_COMBINED = "combined row (one instruction for the whole chain)"
KEPT_TRUNCATED = "truncated image decoded with its missing part black"
KEPT_EXTRA_MARKERS = "<image> markers beyond the images dropped"
KEPT_UNUSED_IMAGES = "images beyond the <image> markers unused"
KEPT_GPT_MARKERS = "<image> in a gpt turn kept as text"


def _official_phrasings(value) -> list | None:
    """The phrasings the official ``parse_row._choose_one_text`` draws one from: a string -> ``[it]``; a list of
    strings -> the list; a list whose first item is a list -> that first list only; None, an empty list or
    anything else -> None (no combined instruction)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value:
        first = value[0]
        if isinstance(first, (list, tuple)):
            return list(first) or None
        return list(value)
    return None


def combined_phrasings(n_images: int, instruction_list, combined_instruction=None) -> list | None:
    """The phrasings of a "combined" row, or None for an edit chain (SynerMedGen's ``edit_dataset_new.py``
    ``UnifiedEditIterableDataset.parse_row``): a ``combined_instruction`` value wins; otherwise an
    ``instruction_list`` with one step for three or more images. (One step for two images is an ordinary chain:
    the official combined path builds the same sequence for it.)"""
    phrasings = _official_phrasings(combined_instruction)
    if phrasings is None and n_images > 2 and isinstance(instruction_list, (list, tuple)) \
            and len(instruction_list) == 1:
        phrasings = _official_phrasings(instruction_list[0])
    return phrasings


@dataclasses.dataclass
class EditRow:
    """A usable Parquet row: the original PNG bytes, the instruction list as stored (``[]`` when the column is
    absent), the combined row's phrasings (None for a chain) and what was kept leniently (``KEPT_*``)."""

    images: list[bytes]
    instructions: list
    combined: list[str] | None
    kept: list[str]


def check_edit_row(image_list, instruction_list, combined_instruction=None) -> EditRow:
    """The row as an ``EditRow`` when the official loader trains it; raises ``RowError`` with the reason otherwise."""
    if image_list is None or len(image_list) == 0:
        raise RowError("no images")
    if len(image_list) == 1:
        raise RowError("row with one image", "an edit needs at least two")
    combined = combined_phrasings(len(image_list), instruction_list, combined_instruction)
    if combined is not None:
        if not all(isinstance(p, str) and p.strip() for p in combined):
            raise RowError("empty instruction list", f"the combined instruction has a blank or non-text phrasing "
                                                     f"({len(combined)} phrasings)")
    else:
        if instruction_list is None or len(instruction_list) == 0:
            raise RowError("empty instruction list")
        if len(instruction_list) != len(image_list) - 1:
            raise RowError("instruction count mismatch", f"{len(instruction_list)} steps for {len(image_list)} "
                                                         f"images (expected {len(image_list) - 1}, or 1 for a "
                                                         "combined row)")
        for step, phrasings in enumerate(instruction_list):
            if isinstance(phrasings, str) or not phrasings or not all(isinstance(p, str) and p.strip()
                                                                      for p in phrasings):
                raise RowError("empty instruction list", f"step {step} (image {step} -> {step + 1})")
    blobs, lenient = [], False
    for k, blob in enumerate(image_list):
        if not isinstance(blob, (bytes, bytearray)):
            raise RowError("corrupt image blob", f"image {k} is not bytes ({type(blob).__name__})")
        try:
            lenient |= decode_image(bytes(blob))[1]
        except DataError as err:
            raise RowError("corrupt image blob", f"image {k}: {err}") from None
        blobs.append(bytes(blob))
    kept = ([KEPT_COMBINED] if combined is not None else []) + ([KEPT_TRUNCATED] if lenient else [])
    return EditRow(blobs, list(instruction_list or []), combined, kept)


def edit_routes(n_images: int, instruction_list, combined: Sequence[str] | None) -> tuple[list, list[str]]:
    """``(modality of each image, route of each supervised step)``. A combined row has one step, from its
    instruction's source to its target; its other context images' modalities are unknown (None)."""
    if combined is None:
        mods = chain_modalities(instruction_list)
        return mods, [route_name(a, b) for a, b in zip(mods[:-1], mods[1:])]
    src, tgt = step_route(combined) or (None, None)
    return [src] + [None] * (n_images - 2) + [tgt], [route_name(src, tgt)]


def image_slots(turns: Sequence[dict], n_images: int) -> int:
    """How many ViT images the official ``change_format`` places: in each human turn the ``<image>`` markers up
    to ``n_images`` (it compares the marker's index *within the turn* with the image count); gpt turns none."""
    return sum(min(t["value"].count(IMAGE_MARKER), n_images) for t in turns if t["from"] == "human")


def check_conversation(obj, slice_ok) -> tuple[list[str], list[dict], list[str]]:
    """``(image paths, turns, kept)`` of a conversation the official VLM loader trains (``kept``: ``KEPT_*``
    leniencies); raises ``RowError`` with the reason otherwise.

    ``slice_ok(path) -> None | (code, message)``: checks one image file under ``slice/``. Every listed image is
    checked, placed or not: the official loader opens them all.
    """
    if not isinstance(obj, dict):
        raise RowError("not a JSON object", type(obj).__name__)
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowError("no conversations list")
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") or not isinstance(
                turn.get("value"), str):
            raise RowError("bad turn", f"turn {k}: expected {{'from': 'human'|'gpt', 'value': text}}")
    if not any(t["from"] == "gpt" for t in turns):
        raise RowError("no gpt turn", "nothing to learn")
    images = obj.get("image", [])
    if images is None:
        images = []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise RowError("bad image field", "expected a path or a list of paths")
    markers = sum(t["value"].count(IMAGE_MARKER) for t in turns if t["from"] == "human")
    slots = image_slots(turns, len(images))
    if slots > len(images):
        # Two human turns with markers each take up to all the images: the official loader then asks for more
        # images than it has (IndexError while packing) and cannot train the line.
        raise RowError("<image> count mismatch", f"the human turns' {markers} markers place {slots} images (each "
                                                 f"turn up to {len(images)}, as the official change_format) but "
                                                 f"the line has {len(images)}")
    for path in images:
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise RowError("image path outside slice/", f"{path!r} must be relative to slice/")
        problem = slice_ok(path)
        if problem:
            raise RowError(*problem)
    kept = [KEPT_EXTRA_MARKERS] if markers > slots else []
    kept += [KEPT_UNUSED_IMAGES] if slots < len(images) else []
    kept += [KEPT_GPT_MARKERS] if any(IMAGE_MARKER in t["value"] for t in turns if t["from"] == "gpt") else []
    return images, [{"from": t["from"], "value": t["value"]} for t in turns], kept


# ----------------------------------------------------------------------------------------------- samples


@dataclasses.dataclass(frozen=True)
class SynerMedConfig:
    """Sample-construction switches (defaults: the official loaders')."""

    shorten_concat_at_end: bool = True
    concat_probability: float = 0.5


OFFICIAL = SynerMedConfig()


def edit_plan(n_images: int, instruction_list: Sequence[Sequence[str]], rng: np.random.Generator,
              config: SynerMedConfig = OFFICIAL, combined: Sequence[str] | None = None) -> list[tuple]:
    """The official hop rule as a plan: ``("cond", i)``, ``("text", str)``, ``("mid", i)``, ``("target", i)``.

    Same draws, in the same order, as BAGEL's ``UnifiedEditIterableDataset.parse_row`` (``random.choice`` →
    ``rng.integers``). A combined row (``combined``: its phrasings, see ``combined_phrasings``) follows
    SynerMedGen's ``edit_dataset_new.py`` instead: every image but the last is conditioning (VAE, then ViT), then
    one phrasing drawn, then the last image as the target."""
    if combined is not None:
        plan: list[tuple] = [("cond", i) for i in range(n_images - 1)]
        return plan + [("text", combined[int(rng.integers(len(combined)))]), ("target", n_images - 1)]
    start = int(rng.integers(n_images - 1))
    max_end = min(start + 3, n_images)
    end = int(rng.integers(start + 1, max_end))
    plan = [("cond", start)]
    if end - start > 1 and rng.random() < config.concat_probability:
        if config.shorten_concat_at_end and end == n_images - 1:
            end -= 1
        text = "".join(instruction_list[i - 1][int(rng.integers(len(instruction_list[i - 1])))] + ". "
                       for i in range(start + 1, end + 1))
        plan += [("text", text.rstrip()), ("target", end)]
        return plan
    for i in range(start + 1, end + 1):
        phrasings = instruction_list[i - 1]
        plan.append(("text", phrasings[int(rng.integers(len(phrasings)))]))
        plan.append(("target", i) if i == end else ("mid", i))
    return plan


def conversation_plan(turns: Sequence[dict], n_images: int) -> list[tuple]:
    """BAGEL's ``SftJSONLIterableDataset.change_format``: ``("text", str, loss)`` and ``("image", k)`` in sequence
    order. A human turn without ``<image>`` is one text as written; one with markers is split at them, each
    non-blank piece stripped, and the j-th marker *of that turn* becomes the next image only while j < the
    image count (later markers are dropped, their text pieces stay separate texts). A gpt turn is one text with
    the loss, any ``<image>`` in it left as text. Images are taken in order; ``check_conversation`` rejects lines
    whose markers would ask for more images than there are."""
    plan: list[tuple] = []
    k = 0
    for turn in turns:
        if turn["from"] != "human":
            plan.append(("text", turn["value"], True))
        elif IMAGE_MARKER not in turn["value"]:
            plan.append(("text", turn["value"], False))
        else:
            pieces = turn["value"].split(IMAGE_MARKER)
            for j, piece in enumerate(pieces):
                if piece.strip():
                    plan.append(("text", piece.strip(), False))
                if j != len(pieces) - 1 and j < n_images:
                    if k >= n_images:
                        raise RowError("<image> count mismatch", f"the markers place more than {n_images} images")
                    plan.append(("image", k))
                    k += 1
    return plan


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_release_build(data_dir: str | Path) -> bool:
    return read_manifest(data_dir).get("source") == SOURCE_NAME


def use_release(data_dir: str | Path, source: str = "auto") -> bool:
    """Whether the pipeline reads ``data_dir`` as a SynerMed release build (``config.data.source``)."""
    if source not in ("auto", "records", SOURCE_NAME):
        raise ValueError(f"config.data.source={source!r}: expected auto, records or {SOURCE_NAME}")
    if source == "records":
        return False
    release = is_release_build(data_dir)
    if source == SOURCE_NAME and not release:
        raise ValueError(f"{data_dir}: not a SynerMed release build (run build-data --source synermed --root "
                         "SynerMed/ --out DIR, or give config.data.dir the build folder)")
    return release


def record_counts(data_dir: str | Path) -> dict[str, int]:
    manifest = read_manifest(data_dir)
    return {kind: sum(int(s["records"]) for s in manifest.get("shards", {}).get(kind, [])) for kind in KINDS}
