"""A small SynerMed release in the published layout, written from the embedded simulation (data/phantom.py).

``write_release(root)`` writes ``SynerMed.parquet`` (pyarrow; ``image_list`` list<binary> of PNG bytes,
``instruction_list`` list<list<string>>, several row groups), ``SynerMed.jsonl`` (multi-image, multi-turn
conversations with ``<image>`` markers) and ``slice/<modality>/*.png`` (Pillow). With ``bad=True`` it adds one
of each bad input the builder must skip; with ``lenient=True`` the inputs a strict reader would drop but the
official loaders train (combined rows in both forms, a truncated PNG, conversations with more ``<image>``
markers or more images than the other); it returns what a correct build holds (tests and the benchmark use
it; a user can try the whole release workflow on it without the 102 GiB download).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from synermedgen_jax.data import synermed
from synermedgen_jax.data.phantom import PhantomConfig, simulate_subject

DISPLAY = {"t1": "T1-weighted MRI", "t1ce": "contrast-enhanced T1 MRI", "t2": "T2-weighted MRI",
           "flair": "FLAIR MRI", "ct": "CT", "cbct": "CBCT", "pet": "FDG-PET"}
FOLDER = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "ct": "ct", "cbct": "cbct", "pet": "pet_FDG"}
STEP_TEMPLATES = ("Convert the {src} image to {tgt}", "Synthesize a {tgt} image from this {src} image",
                  "Translate {src} into {tgt}")
# Combined rows: one instruction for all the images (SynerMedGen's edit_dataset_new.py); (images, route, text).
COMBINED_ROWS = ((("t1", "t2", "t1ce"), ("t1", "t1ce"), "Synthesize a contrast-enhanced T1 MRI image from these "
                                                        "T1-weighted MRI and T2-weighted MRI images"),
                 (("t1", "t2", "flair"), ("t1", "flair"), "Generate the FLAIR MRI image from the T1-weighted MRI "
                                                         "and T2-weighted MRI images"))
# Edit chains (modality sequences) cycled over the slices: BraTS-like 2- and 3-step chains, SynthRAD, AutoPET.
CHAINS = (("t1", "t2", "flair"), ("t1", "t1ce", "t2", "flair"), ("cbct", "ct"), ("ct", "pet"))


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def _to_uint8(volume: np.ndarray, modality: str, mask: np.ndarray) -> np.ndarray:
    if modality in ("ct", "cbct"):
        lo, hi = -1024.0, 2000.0
    else:
        values = volume[mask] if mask.any() else volume
        lo, hi = np.percentile(values, 0.5), np.percentile(values, 99.5)
    return np.clip((volume - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).round().astype(np.uint8)


def simulated_slices(subjects: int, voxel_mm: float, seed: int, image_size: int | None,
                     slices_per_subject: int | None) -> list[dict[str, np.ndarray]]:
    """Per kept axial slice: ``{modality: uint8 [H, W]}`` (row 0 anterior), optionally resized."""
    out = []
    for s in range(subjects):
        subject = simulate_subject(s, seed, PhantomConfig(voxel_mm=voxel_mm))
        head = subject.head_mask
        volumes = {m: _to_uint8(v, m, head) for m, v in subject.images.items()}
        area = head.sum(axis=(0, 1))
        keep = np.flatnonzero(area >= 0.5 * area.max())
        if slices_per_subject:
            keep = keep[np.unique(np.linspace(0, len(keep) - 1, slices_per_subject).round().astype(int))]
        for z in keep:
            images = {}
            for m, v in volumes.items():
                pixels = np.rot90(v[:, :, z])
                if image_size:
                    pixels = np.asarray(Image.fromarray(pixels).resize((image_size, image_size), Image.BILINEAR))
                images[m] = pixels
            out.append(images)
    return out


def step_phrasings(src: str, tgt: str, k: int) -> list[str]:
    return [t.format(src=DISPLAY[src], tgt=DISPLAY[tgt]) for t in STEP_TEMPLATES[: 1 + k % len(STEP_TEMPLATES)]]


def _shift_rows(rows: dict[int, object], at: int) -> dict[int, object]:
    """``{row: value}`` after a row is inserted at ``at``: rows from ``at`` on move down by one."""
    return {(k + 1 if k >= at else k): v for k, v in rows.items()}


def write_release(root: str | Path, *, subjects: int = 1, voxel_mm: float = 8.0, seed: int = 0,
                  image_size: int | None = None, slices_per_subject: int | None = 6, row_group_size: int = 4,
                  repeat: int = 1, bad: bool = True, conversations: bool = True, noise: float = 0.0,
                  lenient: bool | None = None) -> dict:
    """Writes the release; returns the expected build: good edit rows (``{row: modalities}``), good
    conversation lines (``{line: image count}``), bad rows/lines with the start of their reason, the
    expected edit-step counts per route, and for ``lenient`` (default: ``bad``; a clean release has neither)
    the rows and lines kept leniently (``combined_rows`` ``{row: phrasings}``, ``truncated_rows``,
    ``lenient_lines`` ``{line: what}``) with their counts (``kept_as_official``).
    ``noise`` > 0 adds fresh Gaussian noise (grey levels) to every image
    of every edit row: each row's PNGs are then unique, as in the release (the benchmark uses it)."""
    root = Path(root)
    slices = simulated_slices(subjects, voxel_mm, seed, image_size, slices_per_subject)
    paths = []
    for i, images in enumerate(slices):
        names = {}
        for m, pixels in images.items():
            rel = f"{FOLDER[m]}/sim{i:04d}.png"
            file = root / synermed.SLICE_DIR / rel
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(png_bytes(pixels))
            names[m] = rel
        paths.append(names)

    image_lists, instruction_lists, expect_edit, bad_rows, steps = [], [], {}, {}, {}
    blobs = [{m: png_bytes(p) for m, p in images.items()} for images in slices]
    for r in range(repeat):
        for i in range(len(slices)):
            chain = CHAINS[(i + r) % len(CHAINS)]
            expect_edit[len(image_lists)] = list(chain)
            if noise > 0:
                rng = np.random.default_rng([seed, r, i])
                image_lists.append([png_bytes(np.clip(slices[i][m] + rng.normal(0, noise, slices[i][m].shape), 0,
                                                      255).astype(np.uint8)) for m in chain])
            else:
                image_lists.append([blobs[i][m] for m in chain])
            instruction_lists.append([step_phrasings(a, b, i + k) for k, (a, b) in enumerate(zip(chain, chain[1:]))])
            for a, b in zip(chain, chain[1:]):
                steps[f"{a}->{b}"] = steps.get(f"{a}->{b}", 0) + 1
    lenient = bad if lenient is None else lenient
    combined_col: list[str | None] = [None] * len(image_lists)
    kept: dict[str, int] = {}
    combined_rows, truncated_rows = {}, []
    if lenient:
        half = blobs[0]["ct"][: len(blobs[0]["ct"]) * 2 // 3]  # a truncated PNG: the official loader keeps it
        extras = [([blobs[0]["cbct"], half], [step_phrasings("cbct", "ct", 0)], None, ["cbct", "ct"], "truncated")]
        for k, (chain, (src, tgt), text) in enumerate(COMBINED_ROWS):
            images = [blobs[0][m] for m in chain]
            if k == 0:  # form 1: one instruction step for three images
                extras.append((images, [[text, text + "."]], None, [src, None, tgt], [text, text + "."]))
            else:  # form 2: a combined_instruction column (wins over the row's instruction_list)
                steps_ = [step_phrasings(a, b, 0) for a, b in zip(chain, chain[1:])]
                extras.append((images, steps_, text, [src, None, tgt], [text]))
        for images, instructions, combined, mods, what in extras:
            at = len(image_lists) // 3 + len(combined_rows) + len(truncated_rows)
            image_lists.insert(at, images)
            instruction_lists.insert(at, instructions)
            combined_col.insert(at, combined)
            expect_edit, combined_rows = _shift_rows(expect_edit, at), _shift_rows(combined_rows, at)
            truncated_rows = list(_shift_rows(dict.fromkeys(truncated_rows), at))
            expect_edit[at] = mods
            route = f"{mods[0]}->{mods[-1]}"
            steps[route] = steps.get(route, 0) + 1
            if what == "truncated":
                truncated_rows.append(at)
                kept[synermed.KEPT_TRUNCATED] = kept.get(synermed.KEPT_TRUNCATED, 0) + 1
            else:
                combined_rows[at] = what
                kept[synermed.KEPT_COMBINED] = kept.get(synermed.KEPT_COMBINED, 0) + 1
    if bad:
        good_blob = blobs[0]["t1"]
        for images, instructions, reason in (
                ([good_blob, b"\x89PNG\r\n\x1a\n this is not a picture"], [["Convert T1 to T2"]], "corrupt image blob"),
                ([good_blob], [], "row with one image"),
                ([good_blob, blobs[0]["t2"]], [], "empty instruction list"),
                ([good_blob, blobs[0]["t2"], blobs[0]["flair"], blobs[0]["ct"]], [["Convert T1 to T2"], ["To FLAIR"]],
                 "instruction count mismatch")):
            at = len(image_lists) // 2 + len(bad_rows)  # in the middle: good rows follow in the same row group
            image_lists.insert(at, images)
            instruction_lists.insert(at, instructions)
            combined_col.insert(at, None)
            expect_edit, combined_rows = _shift_rows(expect_edit, at), _shift_rows(combined_rows, at)
            truncated_rows = list(_shift_rows(dict.fromkeys(truncated_rows), at))
            bad_rows = _shift_rows(bad_rows, at)
            bad_rows[at] = reason
    columns = {"image_list": pa.array(image_lists, pa.list_(pa.binary())),
               "instruction_list": pa.array(instruction_lists, pa.list_(pa.list_(pa.string())))}
    if lenient:
        columns["combined_instruction"] = pa.array(combined_col, pa.string())
    table = pa.table(columns)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / synermed.PARQUET_NAME, row_group_size=row_group_size)

    lines, expect_conv, bad_lines, lenient_lines = [], {}, {}, {}
    if conversations:
        for i, names in enumerate(paths):
            mods = ["t1", "t2", "flair", "ct"]
            order = [mods[(i + k) % 4] for k in range(4)]
            # Which modality is each panel (4 images in one turn), then a follow-up turn with one more image.
            lines.append({"image": [names[m] for m in order] + [names["pet"]], "conversations": [
                {"from": "human", "value": "Name the modality of each image.\nA: <image>\nB: <image>\nC: <image>\n"
                                           "D: <image>"},
                {"from": "gpt", "value": ", ".join(f"{'ABCD'[k]}: {DISPLAY[m]}" for k, m in enumerate(order))},
                {"from": "human", "value": "<image>\nAnd this one?"},
                {"from": "gpt", "value": DISPLAY["pet"]}]})
            # The transformation between two images (2 images, a path list), then a text-only turn.
            lines.append({"image": [names["t1"], names["t2"]], "conversations": [
                {"from": "human", "value": "<image> <image> Which transformation maps the first image to the second?"},
                {"from": "gpt", "value": "T1-weighted MRI to T2-weighted MRI."},
                {"from": "human", "value": "Is the contrast of CSF brighter in the second?"},
                {"from": "gpt", "value": "Yes."}]})
            # One image given as a plain string.
            lines.append({"image": names["cbct"], "conversations": [
                {"from": "human", "value": "<image>\nWhat kind of scan is this?"},
                {"from": "gpt", "value": "A cone-beam CT slice."}]})
        if lenient:
            # More markers than images (the second marker is dropped), then more images than markers (the
            # second image is unused): the official VLM loader trains both.
            for obj, what in (
                    ({"image": paths[0]["t1"], "conversations": [
                        {"from": "human", "value": "<image> Compare <image> with the atlas."},
                        {"from": "gpt", "value": "T1-weighted MRI."}]}, synermed.KEPT_EXTRA_MARKERS),
                    ({"image": [paths[0]["t1"], paths[0]["t2"]], "conversations": [
                        {"from": "human", "value": "<image> What is this?"}, {"from": "gpt", "value": "T1."}]},
                     synermed.KEPT_UNUSED_IMAGES)):
                lenient_lines[len(lines) + 1] = what
                kept[what] = kept.get(what, 0) + 1
                lines.append(obj)
        for k, obj in enumerate(lines):
            expect_conv[k + 1] = len(obj["image"]) if isinstance(obj["image"], list) else 1
        text = [json.dumps(obj) for obj in lines]
        if bad:
            extra = [
                ("{not json", "not JSON"),
                (json.dumps({"image": "t1/does_not_exist.png", "conversations": [
                    {"from": "human", "value": "<image> What is this?"}, {"from": "gpt", "value": "T1."}]}),
                 "missing slice file"),
                # Each human turn's marker takes the line's one image: two images asked for, one there (the
                # official loader fails on it).
                (json.dumps({"image": paths[0]["t1"], "conversations": [
                    {"from": "human", "value": "<image> What is this?"}, {"from": "gpt", "value": "T1."},
                    {"from": "human", "value": "<image> And this?"}, {"from": "gpt", "value": "T1 again."}]}),
                 "<image> count mismatch"),
                (json.dumps({"image": paths[0]["t1"], "conversations": [
                    {"from": "human", "value": "<image> Describe the image."}]}), "no gpt turn"),
            ]
            for j, (line, reason) in enumerate(extra):
                at = min(len(text), 2 + 3 * j)
                text.insert(at, line)
                expect_conv = {(n + 1 if n >= at + 1 else n): v for n, v in expect_conv.items()}
                lenient_lines = {(n + 1 if n >= at + 1 else n): v for n, v in lenient_lines.items()}
                bad_lines = {(n + 1 if n >= at + 1 else n): v for n, v in bad_lines.items()}
                bad_lines[at + 1] = reason
        (root / synermed.JSONL_NAME).write_text("".join(t + "\n" for t in text))
    return {"edit_rows": expect_edit, "bad_rows": bad_rows, "conv_lines": expect_conv, "bad_lines": bad_lines,
            "edit_steps_by_route": dict(sorted(steps.items())), "slices": len(slices), "rows": len(image_lists),
            "combined_rows": combined_rows, "truncated_rows": truncated_rows, "lenient_lines": lenient_lines,
            "kept_as_official": dict(sorted(kept.items()))}
