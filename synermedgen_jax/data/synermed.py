"""The published SynerMed release as training data: its row formats, the official sample semantics, routes.

The release is one folder::

    SynerMed/
      SynerMed.parquet   generation: ``image_list`` (list of PNG bytes) and ``instruction_list`` (list of lists of
                         strings; ``instruction_list[i-1]`` holds alternative phrasings of the step image i-1 → i)
      SynerMed.jsonl     understanding: one JSON object per line, ``image`` (a path relative to ``slice/`` or a
                         list of them) and ``conversations`` (``{"from": "human"|"gpt", "value": ...}``)
      slice/<modality>/*.png

``build-data --source synermed`` (data/synermed_build.py) validates every row and line and copies the good ones
into ArrayRecord shards (``records/edit-NNNNN`` per Parquet row group, ``records/conv-NNNNN`` per JSONL chunk);
this module turns those records into training samples with the official loaders' semantics:

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
kept, its missing part black (``decode_image``; the setting is scoped to that one decode here).

Record payloads are msgpack (data/records.py, no pickle): edits keep the Parquet's original PNG bytes;
conversations keep the image paths relative to ``slice/`` and read them through the build's ``slice`` link.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from synermedgen_jax.data.pipeline import Tag
from synermedgen_jax.data.volumes import DataError

PARQUET_NAME = "SynerMed.parquet"
JSONL_NAME = "SynerMed.jsonl"
SLICE_DIR = "slice"
EDIT, CONV = "edit", "conv"
KINDS = (EDIT, CONV)
IMAGE_MARKER = "<image>"
SOURCE_NAME = "synermed"

# ------------------------------------------------------------------------------------------------- routes

# Folder names of slice/<modality>/ (lower case, before any "_suffix" such as ct_FDG) -> modality key.
_FOLDER_MODALITY = {"t1": "t1", "t1n": "t1", "t1w": "t1", "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce",
                    "t2": "t2", "t2w": "t2", "flair": "flair", "t2f": "flair", "ct": "ct", "cbct": "cbct",
                    "pet": "pet", "suv": "pet", "mr": "mr", "mri": "mr"}

_MENTION = re.compile(
    r"(?<![a-z0-9])(?:"
    r"(?P<cbct>cbct|cone[\s-]*beam(?:[\s-]*(?:ct|computed\s+tomography))?)"
    r"|(?P<t1ce>t1[\s-]*(?:ce|c|gd|\+\s*c)|contrast[\s-]*enhanced\s+t1(?:[\s-]*weighted)?|post[\s-]*contrast\s+t1"
    r"(?:[\s-]*weighted)?)"
    r"|(?P<flair>(?:t2[\s-]*)?flair)"
    r"|(?P<t1>t1(?:[\s-]*weighted|w)?)"
    r"|(?P<t2>t2(?:[\s-]*weighted|w)?)"
    r"|(?P<pet>(?:fdg[\s-]*)?pet)"
    r"|(?P<ct>ct|computed\s+tomography)"
    r"|(?P<mr>mri|mr)"
    r")(?![a-z0-9])", re.IGNORECASE)
# The nearest of these words before a mention decides its role (source or target of the step).
_CUE = re.compile(r"(?<![a-z])(?P<src>from|given|of this|in this|shown in|based on|using|on this|source)"
                  r"|(?P<tgt>to|into|as|generate|synthesi[sz]e|produce|create|predict|obtain|target)(?![a-z])",
                  re.IGNORECASE)
_MR_SEQUENCES = ("t1", "t1ce", "t2", "flair")


def modality_from_path(path: str) -> str | None:
    """``t1/BraTS_0001_070.png`` or ``slice/pet_FDG/x.png`` -> the modality of its folder (None if unknown)."""
    parts = [p for p in Path(str(path)).parts[:-1] if p not in (SLICE_DIR, ".")]
    for part in parts:
        name = part.lower().split("_")[0].split("-")[0]
        if name in _FOLDER_MODALITY:
            return _FOLDER_MODALITY[name]
    return None


def mentions(text: str) -> list[tuple[str, int]]:
    """Modality mentions ``(modality, start offset)`` in order; a bare "MRI" is dropped next to a sequence name."""
    found = [(m.lastgroup, m.start()) for m in _MENTION.finditer(text)]
    if any(name in _MR_SEQUENCES for name, _ in found):
        found = [(name, at) for name, at in found if name != "mr"]
    return found


def parse_route(text: str) -> tuple[str, str] | None:
    """(source, target) modality named by one instruction, or None when it does not name two modalities."""
    first: dict[str, int] = {}
    for name, at in mentions(text):
        first.setdefault(name, at)
    if len(first) < 2:
        return None
    roles = {}
    for name, at in first.items():
        cues = list(_CUE.finditer(text[max(0, at - 40):at]))
        roles[name] = cues[-1].lastgroup if cues else None
    order = sorted(first, key=first.get)
    src = next((m for m in order if roles[m] == "src"), None)
    tgt = next((m for m in order if roles[m] == "tgt" and m != src), None)
    if src is None:
        src = next((m for m in order if m != tgt and roles[m] is None), None) or next(m for m in order if m != tgt)
    if tgt is None:
        tgt = next(m for m in order if m != src)
    return src, tgt


def step_route(phrasings: Sequence[str]) -> tuple[str, str] | None:
    """The route a step's phrasings agree on most (ties: the first phrasing's)."""
    votes = Counter(r for r in (parse_route(p) for p in phrasings) if r is not None)
    return votes.most_common(1)[0][0] if votes else None


def chain_modalities(instruction_list: Sequence[Sequence[str]]) -> list[str | None]:
    """Modality of each image of an edit chain, from its steps' routes (None where no step names it)."""
    steps = [step_route(p) for p in instruction_list]
    mods: list[str | None] = [steps[0][0] if steps and steps[0] else None]
    for i, route in enumerate(steps):
        following = steps[i + 1] if i + 1 < len(steps) else None
        mods.append(route[1] if route else (following[0] if following else None))
    return mods


def route_name(src: str | None, tgt: str | None) -> str:
    return f"{src or '?'}->{tgt or '?'}" if (src or tgt) else "unknown"


# ------------------------------------------------------------------------------------------------- images

# Pillow's module-level settings that the official loaders (SynerMedGen's edit_dataset_new.py, BAGEL's and
# SynerMedGen's vlm_dataset.py) set at import for the whole process. Here they are set only around a retry of one
# decode (see decode_image), so the rest of the process keeps Pillow's strict defaults.
_OFFICIAL_PIL = {"LOAD_TRUNCATED_IMAGES": True, "MAX_TEXT_CHUNK": 1024 * 2 ** 20}
_OFFICIAL_PIL_LOCK = threading.Lock()


@contextlib.contextmanager
def official_pillow_settings():
    """``ImageFile.LOAD_TRUNCATED_IMAGES = True`` and ``PngImagePlugin.MAX_TEXT_CHUNK`` = 1 GiB while the block
    runs, restored after. A lock keeps two threads from interleaving set and restore; a thread decoding outside
    this block at the same moment does see the lenient settings (Pillow reads module globals)."""
    from PIL import ImageFile, PngImagePlugin

    with _OFFICIAL_PIL_LOCK:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES, PngImagePlugin.MAX_TEXT_CHUNK
        ImageFile.LOAD_TRUNCATED_IMAGES = _OFFICIAL_PIL["LOAD_TRUNCATED_IMAGES"]
        PngImagePlugin.MAX_TEXT_CHUNK = _OFFICIAL_PIL["MAX_TEXT_CHUNK"]
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES, PngImagePlugin.MAX_TEXT_CHUNK = saved


def _decode(blob: bytes):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(blob))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        message = "not a recognised image format" if isinstance(err, UnidentifiedImageError) else str(err)[:120]
        raise DataError(f"undecodable image ({type(err).__name__}: {message})") from None
    return image


def decode_image(blob: bytes, official: bool = True):
    """``(image, lenient)``: a fully decoded PIL image, and whether it needed the official loaders' Pillow settings.

    A strict decode is tried first; when it fails and ``official`` is set, the decode is retried under
    ``official_pillow_settings()``: a truncated PNG then decodes as in the official loaders, the part past the
    end of the data left at 0 (black). Where the strict decode succeeds the lenient one gives the same pixels, so
    the result is always what the official loaders train on. Raises ``DataError`` when neither decodes."""
    try:
        return _decode(blob), False
    except DataError:
        if not official:
            raise
    with official_pillow_settings():
        return _decode(blob), True


def open_image(blob: bytes, official: bool = True):
    """A fully decoded PIL image (``decode_image``; raises ``DataError`` for anything Pillow cannot decode)."""
    return decode_image(blob, official)[0]


def to_rgb(image):
    """BAGEL's ``pil_img2rgb``: transparency composited on white, everything else converted to RGB."""
    from PIL import Image

    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def image_array(blob: bytes, channels: int = 3) -> np.ndarray:
    """PNG bytes -> float32 in [-1, 1] after RGB conversion: ``[H, W]`` for a grey picture (or a 1-channel
    model, which gets the luminance), else ``[H, W, 3]``."""
    rgb = to_rgb(open_image(blob))
    pixels = np.asarray(rgb, np.uint8)
    if channels == 1 and not (np.array_equal(pixels[..., 0], pixels[..., 1])
                              and np.array_equal(pixels[..., 0], pixels[..., 2])):
        pixels = np.asarray(rgb.convert("L"), np.uint8)[..., None]
    if pixels.shape[-1] == 3 and np.array_equal(pixels[..., 0], pixels[..., 1]) and \
            np.array_equal(pixels[..., 0], pixels[..., 2]):
        pixels = pixels[..., :1]
    out = pixels.astype(np.float32) / 127.5 - 1.0
    return out[..., 0] if out.shape[-1] == 1 else out


def grey_array(blob: bytes) -> np.ndarray:
    """PNG bytes -> ``[H, W]`` float32 grey in [-1, 1] (the luminance after RGB conversion). Strict: used to
    score predictions, where a truncated PNG is an error, not a training input."""
    return np.asarray(to_rgb(open_image(blob, official=False)).convert("L"), np.float32) / 127.5 - 1.0


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


class SampleMaker:
    """Element ``(kind, record index)`` -> ``(items, tag)`` with the official semantics (module doc), or None
    when the sample cannot fit an empty pack row (skipped, as BAGEL skips over-long samples; counted)."""

    def __init__(self, data_dir: str, budget, pipeline_config, geometry=None,
                 config: SynerMedConfig = OFFICIAL):
        self.data_dir, self.budget, self.pipeline, self.geometry, self.config = (
            str(data_dir), budget, pipeline_config, geometry, config)
        self._readers: dict = {}
        self._tokenizer = None
        self._probe = None
        self.oversize = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_readers={}, _tokenizer=None, _probe=None)
        return state

    def reader(self, kind: str):
        if kind not in self._readers:
            from synermedgen_jax.data.records import RecordReader

            self._readers[kind] = RecordReader(self.data_dir, kind)
        return self._readers[kind]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from synermedgen_jax.data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(Path(self.data_dir) / "tokenizer.json")
        return self._tokenizer

    def _channels(self) -> int:
        if self.geometry is None:
            return 3
        from synermedgen_jax.data.packing import Geometry

        g = self.geometry if isinstance(self.geometry, Geometry) else Geometry.from_model_config(self.geometry)
        return max(g.vit_channels, g.vae_channels)

    def _fits(self, items) -> bool:
        if self.geometry is None:
            return True
        from synermedgen_jax.data.packing import PackBuilder, SpecialTokens

        if self._probe is None:
            self._probe = PackBuilder(self.budget, SpecialTokens(0, 0, 0, 0), self.geometry)
        return self._probe.fits(items)

    def slice_bytes(self, path: str) -> bytes:
        return (Path(self.data_dir) / SLICE_DIR / path).read_bytes()

    def _pack_images(self):
        """The resize into the pack's slots (data/geometry.PackImages), made once per maker."""
        if getattr(self, "_images", None) is None:
            from synermedgen_jax.data.geometry import PackImages

            self._images = PackImages.for_budget(self.budget, getattr(self.pipeline, "resize", None))
        return self._images

    def edit_items(self, record: dict, rng: np.random.Generator) -> list:
        from synermedgen_jax.data.packing import Text, VaeImage, VitImage, cfg_dropout

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
        from synermedgen_jax.data.packing import Text, VitImage

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

    def __call__(self, element: tuple[str, int], rng: np.random.Generator):
        kind, index = element
        record = self.reader(kind)[int(index)]
        items = self.edit_items(record, rng) if kind == EDIT else self.conversation_items(record)
        if not self._fits(items):
            self.oversize += 1
            if self.oversize in (1, 10, 100, 1000) or self.oversize % 10000 == 0:
                import logging

                logging.warning("synermed: %d sample(s) longer than an empty pack row skipped (latest %s#%d); "
                                "enlarge config.data.pack", self.oversize, kind, index)
            return None
        return items, f"{kind}#{index}"


def _not_none(x) -> bool:
    return x is not None


def stage_weights(stage: str, stage2_weight: float) -> dict[str, float]:
    if stage == "stage1":
        return {CONV: 1.0}
    if stage == "stage2":
        return {EDIT: 1.0}
    if stage == "mixed":
        return {CONV: 1.0 - float(stage2_weight), EDIT: float(stage2_weight)}
    raise ValueError(f"data stage {stage!r} has no SynerMed samples (stage1: conversations, stage2: edit chains, "
                     "mixed: both)")


def sample_dataset(data_dir: str | Path, budget, config, geometry=None):
    """The sharded, shuffled stream of ``(items, tag)`` samples of a SynerMed build (``data.pipeline`` calls
    this for builds whose manifest source is ``synermed``). Process ``p`` of ``P`` reads records ``p::P`` of
    each kind only."""
    import grain

    if config.split != "train":
        raise ValueError(f"{data_dir}: a SynerMed build has one split, 'train' (asked for {config.split!r})")
    counts = record_counts(data_dir)
    weights = {k: w for k, w in stage_weights(config.stage, config.stage2_weight).items() if w > 0}
    if config.process_index is None or config.process_count is None:
        import jax

        index, count = jax.process_index(), jax.process_count()
    else:
        index, count = config.process_index, config.process_count
    datasets, mix = [], []
    for k, (kind, weight) in enumerate(sorted(weights.items())):
        if counts.get(kind, 0) == 0:
            raise ValueError(f"{data_dir}: the SynerMed build has no {kind} records "
                             f"({'conversations' if kind == CONV else 'edit chains'})")
        ds = grain.MapDataset.range(counts[kind])[index::count]
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed * 1000 + k)
        if config.repeat:
            ds = ds.repeat()
        datasets.append(ds.map(Tag(kind)))
        mix.append(weight)
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, mix)
    ds = ds.random_map(SampleMaker(str(data_dir), budget, config, geometry), seed=config.seed)
    it = ds.to_iter_dataset().filter(_not_none)
    if config.workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.workers))
    return it
