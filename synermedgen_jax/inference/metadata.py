"""The official SynerMedGen inference convention: ``{key: {"id": path, "prompt": text}}`` -> ``key.png``.

``synthesize --metadata metadata.json --image-root DIR --output-dir OUT`` reads each entry's source image
(``DIR/id``, any Pillow-readable picture, RGB-converted then grey), synthesizes the target from the entry's
prompt and writes ``OUT/<key>.png`` (8-bit grey, at the source image's size). Keys whose output exists are
skipped, so a rerun finishes an interrupted run; defaults are the official script's (50 timesteps, timestep
shift 3.0, text guidance 4.0, image guidance 1.5). Entries are batched by prompt and image size; a batch is
split over ``--devices`` local devices. Entry ``i`` (in sorted key order) starts from the noise of
``fold_in(key(seed), i)``: the result of a key depends on neither the batch size nor the other keys.

Context order. BAGEL's (and the official script's) edit context is ``[source as clean VAE latents, source as
ViT tokens, instruction, noised target]`` — what ``build-data --source synermed`` trains on; the NIfTI
builds' Stage II (and ``Sampler``) put the instruction first. ``order="auto"`` uses the image-first context
for checkpoints trained on a SynerMed build (their manifest source) and the sampler's own order otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from synermedgen_jax.inference.loading import InferenceError
from synermedgen_jax.inference.sampler import Sampler

ORDERS = ("auto", "image-first", "text-first")


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


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(image, np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


def synthesize_metadata(inference, metadata: dict[str, dict], image_root: str | Path, output_dir: str | Path, *,
                        sampler_config, batch_size: int = 8, devices: int = 1, seed: int = 0, order: str = "auto",
                        progress: Callable[[int], None] | None = None) -> dict[str, list]:
    """Writes ``output_dir/<key>.png`` for every key without one. Returns ``{"written": [keys], "existing":
    [keys], "failed": [[key, reason]]}`` (an unreadable source fails its key only)."""
    from synermedgen_jax.data.records import write_png
    from synermedgen_jax.data.synermed import grey_array
    from synermedgen_jax.data.volumes import DataError, resize_image
    from synermedgen_jax.inference.sampler import inference_mesh

    keys = sorted(metadata)
    noise_index = {k: i for i, k in enumerate(keys)}
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
    sampler = Sampler(inference.model, inference.special, inference.image_size, inference.vit_image_size,
                      sampler_config, mesh=inference_mesh(devices),
                      image_first=resolve_order(order, inference) == "image-first")
    step = -(-max(1, batch_size) // sampler.batch_divisor) * sampler.batch_divisor
    for (prompt, shape), entries in groups.items():
        ids = inference.tokenizer.encode(prompt)
        for start in range(0, len(entries), step):
            chunk = entries[start:start + step]
            sources = np.stack([pixels for _, pixels in chunk])
            indices = np.asarray([noise_index[k] for k, _ in chunk], np.int64)
            preds = sampler.generate(sources, ids, seed=seed, batch_size=step, indices=indices)
            for (key, _), pred in zip(chunk, preds):
                write_png(output_path(output_dir, key), to_uint8(resize_image(pred, shape)))
                result["written"].append(key)
            if progress is not None:
                progress(len(chunk))
    return result
