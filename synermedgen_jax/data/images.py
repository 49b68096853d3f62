"""Image decoding, one place: PNG bytes -> PIL image -> float arrays in [-1, 1] (training, inference, scoring).

Images decode as in the official loaders (SynerMedGen's edit_dataset_new.py, BAGEL's and SynerMedGen's
vlm_dataset.py), which set ``ImageFile.LOAD_TRUNCATED_IMAGES`` for the whole process: here a strict decode is tried
first and only a failed one is retried under those settings (``decode_image``), so the rest of the process keeps
Pillow's strict defaults. Colour goes through BAGEL's ``pil_img2rgb`` (``to_rgb``).
"""

from __future__ import annotations

import contextlib
import io
import threading

import numpy as np
from PIL import Image, ImageFile, PngImagePlugin, UnidentifiedImageError

from synermedgen_jax.data.volumes import DataError

# Pillow's module-level settings that the official loaders set at import for the whole process.
_OFFICIAL_PIL = {"LOAD_TRUNCATED_IMAGES": True, "MAX_TEXT_CHUNK": 1024 * 2 ** 20}
_OFFICIAL_PIL_LOCK = threading.Lock()


@contextlib.contextmanager
def official_pillow_settings():
    """``ImageFile.LOAD_TRUNCATED_IMAGES = True`` and ``PngImagePlugin.MAX_TEXT_CHUNK`` = 1 GiB while the block
    runs, restored after. A lock keeps two threads from interleaving set and restore; a thread decoding outside
    this block at the same moment does see the lenient settings (Pillow reads module globals)."""
    with _OFFICIAL_PIL_LOCK:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES, PngImagePlugin.MAX_TEXT_CHUNK
        ImageFile.LOAD_TRUNCATED_IMAGES = _OFFICIAL_PIL["LOAD_TRUNCATED_IMAGES"]
        PngImagePlugin.MAX_TEXT_CHUNK = _OFFICIAL_PIL["MAX_TEXT_CHUNK"]
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES, PngImagePlugin.MAX_TEXT_CHUNK = saved


def _decode(blob: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(blob))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        message = "not a recognised image format" if isinstance(err, UnidentifiedImageError) else str(err)[:120]
        raise DataError(f"undecodable image ({type(err).__name__}: {message})") from None
    return image


def decode_image(blob: bytes, official: bool = True) -> tuple[Image.Image, bool]:
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


def open_image(blob: bytes, official: bool = True) -> Image.Image:
    """A fully decoded PIL image (``decode_image``; raises ``DataError`` for anything Pillow cannot decode)."""
    return decode_image(blob, official)[0]


def image_size(blob: bytes) -> tuple[int, int]:
    """``(H, W)`` from the image's header (nothing decoded)."""
    width, height = Image.open(io.BytesIO(blob)).size
    return int(height), int(width)


def to_rgb(image: Image.Image) -> Image.Image:
    """BAGEL's ``pil_img2rgb``: transparency composited on white, everything else converted to RGB."""
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
