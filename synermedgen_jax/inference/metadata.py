"""The official SynerMedGen inference convention: ``{key: {"id": path, "prompt": text}}`` -> ``key.png``.

``synthesize --metadata metadata.json --image-root DIR --output-dir OUT`` reads each entry's source image
(``DIR/id``, any Pillow-readable picture, RGB-converted then grey), synthesizes the target from the entry's
prompt and writes ``OUT/<key>.png``. Keys whose output exists are skipped, so a rerun finishes an interrupted
run; defaults are the official script's (50 timesteps, timestep shift 3.0, text guidance 4.0, image guidance 1.5).

Output style. ``official`` (default), as ``eval/gen/gen_images_mp_imgedit.py`` writes: the generated image at
the generated size (``Inference.sizes_for(source size)``: with the official rule a 256×256 slice is generated
at 512×512), quantised as the official script does (``uint8(clamp(x/2 + 1/2, 0, 1) * 255)``, truncating),
grey replicated to RGB, then cropped to its bounding box exactly as PIL's ``Image.getbbox()`` on that RGB
image (the smallest box holding every pixel with a nonzero channel; an all-black image is kept whole, as
``crop(None)`` does). ``ours``: 8-bit grey (rounded) resized back to the source's size.

Work split. ``split_count`` / ``split_index`` pick one of ``split_count`` contiguous chunks of the keys in the
file's insertion order, chunk size ``ceil(len / split_count)`` (the official ``--split-count/--split-index``:
the last chunks may be short or empty); on several JAX processes each process then takes its contiguous share
of that chunk the same way (the official rank split), so the default on P processes is chunk
``process_index`` of P. Within a process, a batch is split over ``--devices`` local devices.

Sizes and noise. Sources are grouped by prompt and generated size; one ``Sampler`` is built per distinct
``(image_size, vit_image_size)`` (cached). Entry ``i`` (in *sorted* key order over the whole file) starts from
the noise of ``fold_in(key(seed), i)``: the result of a key depends on neither the batch size, the split, nor
the other keys.

Context order. BAGEL's (and the official script's) edit context is ``[source as clean VAE latents, source as
ViT tokens, instruction, noised target]`` — what ``build-data --source synermed`` trains on; the NIfTI
builds' Stage II (and ``Sampler``) put the instruction first. ``order="auto"`` uses the image-first context
for checkpoints trained on a SynerMed build (their manifest source) and the sampler's own order otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from synermedgen_jax.inference.loading import InferenceError
from synermedgen_jax.inference.sampler import Sampler

ORDERS = ("auto", "image-first", "text-first")
OUTPUT_STYLES = ("official", "ours")


def read_metadata(path: str | Path) -> dict[str, dict]:
    """The metadata file, checked: a JSON object of ``{key: {"id": str, "prompt": str, ...}}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise InferenceError(f"--metadata {path}: cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise InferenceError(f"--metadata {path}: not JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise InferenceError(f"--metadata {path}: expected a non-empty JSON object {{key: {{id, prompt}}}}")
    for key, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not isinstance(
                entry.get("prompt"), str):
            raise InferenceError(f"--metadata {path}: entry {key!r} needs string fields 'id' and 'prompt'")
        if not key or Path(key).is_absolute() or ".." in Path(key).parts:
            raise InferenceError(f"--metadata {path}: key {key!r} cannot name a file under the output folder")
    return data


def output_path(output_dir: str | Path, key: str) -> Path:
    return Path(output_dir) / f"{key}.png"


def resolve_order(order: str, inference) -> str:
    if order not in ORDERS:
        raise InferenceError(f"--context-order {order!r}: expected one of {', '.join(ORDERS)}")
    if order == "auto":
        return "image-first" if getattr(inference, "source", None) == "synermed" else "text-first"
    return order


def split_keys(keys: Sequence[str], count: int, index: int) -> list[str]:
    """Chunk ``index`` of ``count`` contiguous chunks of ``keys`` (kept in the given order), each of
    ``ceil(len(keys) / count)`` keys — the official script's ``--split-count/--split-index`` (and its rank)
    split; trailing chunks may be short or empty. Raises ``InferenceError`` for ``count < 1`` or an index
    outside ``0..count-1``."""
    if count < 1:
        raise InferenceError(f"--split-count {count}: must be at least 1")
    if not 0 <= index < count:
        raise InferenceError(f"--split-index {index}: must be in 0..{count - 1} for --split-count {count}")
    size = -(-len(keys) // count)
    return list(keys)[index * size:(index + 1) * size]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """``[H, W]`` in [-1, 1] -> uint8, rounded (our style)."""
    return np.clip((np.asarray(image, np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


def official_uint8(image: np.ndarray) -> np.ndarray:
    """``[H, W]`` in [-1, 1] -> uint8 as the official script quantises (``(x*0.5+0.5).clamp(0,1)*255`` cast to
    uint8, which truncates): the truncation decides which near-black pixels are exactly 0, hence the crop."""
    return np.floor(np.clip(np.asarray(image, np.float32) * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


def getbbox(pixels: np.ndarray) -> tuple[int, int, int, int] | None:
    """PIL's ``Image.getbbox()`` in numpy: ``(left, upper, right, lower)`` (right/lower exclusive) of the pixels
    with any nonzero channel of ``pixels`` (``[H, W]`` or ``[H, W, C]``), ``None`` when all are zero."""
    pixels = np.asarray(pixels)
    nonzero = pixels != 0 if pixels.ndim == 2 else np.any(pixels != 0, axis=-1)
    rows, cols = np.flatnonzero(nonzero.any(axis=1)), np.flatnonzero(nonzero.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def official_pixels(image: np.ndarray) -> np.ndarray:
    """The official script's output picture of a generated grey image ``[H, W]`` in [-1, 1]: ``[h, w, 3]``
    uint8 (grey replicated), cropped to its ``getbbox()`` (kept whole when all black, as ``crop(None)``)."""
    rgb = np.repeat(official_uint8(image)[..., None], 3, axis=-1)
    box = getbbox(rgb)
    if box is None:
        return rgb
    left, upper, right, lower = box
    return rgb[upper:lower, left:right]


def synthesize_metadata(inference, metadata: dict[str, dict], image_root: str | Path, output_dir: str | Path, *,
                        sampler_config, batch_size: int = 8, devices: int = 1, seed: int = 0, order: str = "auto",
                        output_style: str = "official", keys: Sequence[str] | None = None,
                        progress: Callable[[int], None] | None = None, settings=None) -> dict[str, list]:
    """Writes ``output_dir/<key>.png`` for every key (of ``keys``, default all, e.g. one split's share) without
    one, in ``output_style`` (``official`` | ``ours``, see the module docstring). Returns ``{"written": [keys],
    "existing": [keys], "failed": [[key, reason]]}`` (an unreadable source fails its key only).
    ``settings`` (inference/family.py): an understanding-then-edit mode conditions each entry's edit on its
    prompt plus the model's answer about its source; a family with an image-first context makes
    ``order="auto"`` image-first."""
    from synermedgen_jax.data.images import grey_array
    from synermedgen_jax.data.records import write_png
    from synermedgen_jax.data.volumes import DataError, resize_image
    from synermedgen_jax.inference.sampler import inference_mesh

    if output_style not in OUTPUT_STYLES:
        raise InferenceError(f"--output-style {output_style!r}: expected one of {', '.join(OUTPUT_STYLES)}")
    # Noise indices come from the whole file's sorted keys, so a key's result does not depend on the split.
    noise_index = {k: i for i, k in enumerate(sorted(metadata))}
    keys = list(metadata) if keys is None else list(keys)
    result: dict[str, list] = {"written": [], "existing": [], "failed": []}
    groups: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for key in keys:
        if output_path(output_dir, key).exists():
            result["existing"].append(key)
            continue
        source_path = Path(image_root) / metadata[key]["id"]
        try:
            pixels = grey_array(source_path.read_bytes())
        except OSError as err:
            result["failed"].append([key, f"{source_path}: cannot read ({err.strerror or err})"])
            continue
        except DataError as err:
            result["failed"].append([key, f"{source_path}: {err}"])
            continue
        groups.setdefault((metadata[key]["prompt"], pixels.shape), []).append((key, pixels))
    if not groups:
        return result
    if settings is not None and settings.mode != "edit":
        from synermedgen_jax.inference.family import edit_instructions

        edited: dict[tuple, list[tuple[str, np.ndarray]]] = {}
        for (prompt, shape), entries in groups.items():
            texts = edit_instructions(inference, settings, prompt, np.stack([p for _, p in entries]), seed=seed,
                                      batch_size=batch_size)
            for entry, text in zip(entries, texts):
                edited.setdefault((text, shape), []).append(entry)
        groups = edited
    mesh = inference_mesh(devices)
    if order == "auto" and settings is not None and settings.image_first is not None:
        order = "image-first" if settings.image_first else "text-first"
    image_first = resolve_order(order, inference) == "image-first"
    samplers: dict[tuple, Sampler] = {}  # one compiled sampler per (image_size, vit_image_size)
    for (prompt, shape), entries in groups.items():
        sizes = tuple(tuple(int(v) for v in size) for size in inference.sizes_for(*shape))
        if sizes not in samplers:
            samplers[sizes] = Sampler(inference.model, inference.special, sizes[0], sizes[1], sampler_config,
                                      mesh=mesh, image_first=image_first)
        sampler = samplers[sizes]
        step = -(-max(1, batch_size) // sampler.batch_divisor) * sampler.batch_divisor
        ids = inference.tokenizer.encode(prompt)
        for start in range(0, len(entries), step):
            chunk = entries[start:start + step]
            sources = np.stack([pixels for _, pixels in chunk])
            indices = np.asarray([noise_index[k] for k, _ in chunk], np.int64)
            preds = sampler.generate(sources, ids, seed=seed, batch_size=step, indices=indices)
            for (key, _), pred in zip(chunk, preds):
                if output_style == "official":
                    pixels = official_pixels(pred)
                else:
                    pixels = to_uint8(resize_image(pred, shape))
                write_png(output_path(output_dir, key), pixels)
                result["written"].append(key)
            if progress is not None:
                progress(len(chunk))
    return result
