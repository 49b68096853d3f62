"""Run logging on process 0: ``metrics.jsonl``, tensorboardX scalars and image grids, a tqdm progress bar.

``metrics.jsonl`` holds one JSON object per step (``{"step": s, "loss": ..., ...}``), floats written exactly
(``repr``) so tests can compare curves bitwise; after a crash a step may appear twice (the last one wins).
Packed stages' rows carry ``real_frac/{tokens,und,gen,vit,vae,ce}``: the real (non-padding) fraction of the
step's slots per region (training/loop.real_fractions), since a step costs what its slots cost, padding included.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from etils.epath import Path  # local paths and gs:// (and other remote) workdirs alike
from tensorboardX import SummaryWriter

from synermedgen_jax.staging import write_atomic

SCALARS = ("loss", "ce", "mse", "token_accuracy", "grad_norm", "lr", "l1", "l2", "kl", "psnr")


def image_grid(columns: list[np.ndarray], *, pad: int = 2) -> np.ndarray:
    """``columns`` of ``[N, H, W]`` or ``[N, H, W, C]`` images in [-1, 1] → one ``[3, rows·H, cols·W]`` uint8
    grid (CHW as tensorboardX wants): row i shows image i of every column side by side."""
    cols = []
    for column in columns:
        column = np.asarray(column, np.float32)
        if column.ndim == 4:
            column = column[..., 0] if column.shape[-1] == 1 else column.mean(-1)
        cols.append(column)
    n, h, w = cols[0].shape
    grid = np.full((n * (h + pad) + pad, len(cols) * (w + pad) + pad), 0.0, np.float32)
    for j, column in enumerate(cols):
        for i in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = (np.clip(column[i], -1.0, 1.0) + 1.0) / 2.0
    gray = (grid * 255.0).round().astype(np.uint8)
    return np.stack([gray] * 3)


def write_whole(path: Path, text: str) -> None:
    """Writes a workdir file that a reader must see whole: on a local disk through staging.write_atomic; an
    object store (``gs://``) replaces an object in one write already."""
    if "://" in str(path):
        path.write_text(text)
    else:
        write_atomic(str(path), text)


class _Jsonl:
    """``metrics.jsonl`` kept open for appending; object stores (``gs://``) cannot append, so there the rows are
    kept and the whole file rewritten at each flush (it holds one short line per step)."""

    def __init__(self, path: Path):
        self.path = path
        self.remote = "://" in str(path)
        self.rows = path.read_text() if self.remote and path.exists() else ""  # str: json lines
        self.file = None if self.remote else path.open("a")

    def write(self, text: str) -> None:
        if self.remote:
            self.rows += text
        else:
            self.file.write(text)

    def flush(self) -> None:
        if self.remote:
            self.path.write_text(self.rows)
        else:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        else:
            self.flush()


class RunLogger:
    def __init__(self, workdir: str | Path, config, trainable_params: int, device_count: int):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.trainable_params = trainable_params
        self.device_count = device_count
        self.writer = SummaryWriter(str(self.workdir / "tb"))
        self.jsonl = _Jsonl(self.workdir / "metrics.jsonl")
        self.bar = None
        if config.train.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=int(config.train.steps), desc=config.stage, dynamic_ncols=True, file=sys.stderr)
        # What computes (kernels/dispatch.py resolve_kernels): logged once and carried by this run's first row.
        kernels = config.model.get("kernels") if "model" in config else None
        self.kernels = str(kernels["summary"]) if kernels else None
        if self.kernels:
            self.message(self.kernels)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def step(self, step: int, values: dict, tokens: int, seconds: float,
             real_frac: dict[str, float] | None = None) -> None:
        """One train step's row. ``real_frac``: ``{"real_frac/<region>": real / slots}`` of the step's packs
        (training/loop.real_fractions), written beside the device metrics (TensorBoard: ``train/real_frac/…``)."""
        values = {**values, **(real_frac or {})}
        values["tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
        values["step_time_s"] = seconds
        peak = float(self.config.train.peak_flops)
        if peak > 0 and seconds > 0:
            # Estimate: 6·N·tokens (forward + backward matmuls of the trained part; attention not counted).
            values["mfu"] = 6.0 * self.trainable_params * tokens / seconds / (peak * self.device_count)
        record = {"step": step, **values}
        if self.kernels:  # the first row of the run (or of a resumed segment) says what computed it
            record["kernels"], self.kernels = self.kernels, None
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if step % max(int(self.config.train.log_every), 1) == 0:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)
            self.writer.flush()  # a killed run keeps in tensorboard what metrics.jsonl kept
        if self.bar is not None:
            if self.bar.n < step + 1:
                self.bar.update(step + 1 - self.bar.n)
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}", refresh=False)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", float(value), step)
        self.jsonl.write(json.dumps({"step": step, "eval": prefix, **{k: float(v) for k, v in values.items()}})
                         + "\n")
        self.jsonl.flush()
        self.writer.flush()

    def forget_after(self, start: int) -> None:
        """On resume from step ``start``: drops the rows of train steps ``>= start`` (and evaluations after it)
        that a killed run logged after its last checkpoint, so each step's row appears once."""
        path = self.workdir / "metrics.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill
            if step < start or (step == start and "eval" in record):
                keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) != len(lines):
            self.jsonl.close()
            write_whole(path, "".join(keep))
            self.jsonl = _Jsonl(path)

    def images(self, tag: str, grid: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, grid, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.jsonl.close()
