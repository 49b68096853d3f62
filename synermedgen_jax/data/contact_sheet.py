"""PNG contact sheet of one case: rows = three axial slices (inferior to superior), columns = modalities."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from synermedgen_jax.data.volumes import display_name
from synermedgen_jax.staging import atomic_path


def contact_sheet_array(records: Sequence[dict], rows: int = 3) -> tuple[np.ndarray, list[str]]:
    """uint8 ``[rows*S, M*S]`` grey image and the column labels, from a case's records (slice order)."""
    if not records:
        raise ValueError("contact sheet: the case has no records")
    modalities = list(records[0]["modalities"])
    picks = [records[int(round(q * (len(records) - 1)))] for q in np.linspace(0.25, 0.75, rows)]
    grid = []
    for record in picks:
        tiles = [np.clip((np.asarray(record["images"][m], np.float32) + 1.0) * 127.5, 0, 255)
                 for m in modalities]
        grid.append(np.concatenate(tiles, axis=1))
    return np.concatenate(grid, axis=0).astype(np.uint8), [display_name(m) for m in modalities]


def write_contact_sheet(path: str | Path, records: Sequence[dict], *, title: str = "", rows: int = 3,
                        min_tile: int = 128) -> Path:
    """Writes the sheet (labels on a header strip); tiles are upscaled to at least ``min_tile`` pixels."""
    sheet, labels = contact_sheet_array(records, rows)
    size = sheet.shape[0] // rows
    scale = max(1, -(-min_tile // size))
    img = Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST)
    header = 28
    canvas = Image.new("L", (img.width, img.height + header), 0)
    canvas.paste(img, (0, header))
    draw = ImageDraw.Draw(canvas)
    tile = size * scale
    for i, label in enumerate(labels):
        draw.text((i * tile + 4, 2), label, fill=255)
    if title:
        draw.text((4, 15), title, fill=160)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
