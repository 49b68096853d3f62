"""What a route can reach through this VAE: the autoencoder's ceiling and a simple local map's score.

Every synthesized slice is a VAE decode, so ``decode(encode(target))`` (posterior mean) bounds what Stage II can
reach on a route. :func:`route_ceilings` evaluates that reconstruction with the evaluation's own slice choice and
SSIM, next to the identity baseline (a copy of the source): on a route where the reconstruction does not beat the
copy, no amount of Stage II training will.

It also scores a deliberately simple predictor: a ridge regression from each source latent pixel's 3×3
neighbourhood (values and squares) to the target latent pixel, fitted per route on every training pair
(:func:`fit_local_map`). The simulated modalities are mostly intensity remaps of one anatomy, so this map is a
yardstick for Stage II: where it beats the copy, a generator that carries the source latent through attention
can too; where even it does not, the autoencoder (or the data) is the limit, not Stage II.
``python -m tools.vae_ceiling`` (:func:`main`) prints both; ``quickstart`` reports them.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from synermedgen_jax.data.records import RecordReader
from synermedgen_jax.data.routes import get_task
from synermedgen_jax.data.volumes import resize_image
from synermedgen_jax.evaluation import metrics
from synermedgen_jax.evaluation.evaluate import ContentIndex, pick_slices, present_tasks

LOCAL_MAP_SIZE = 3  # neighbourhood side (latent pixels) of the local map
LOCAL_MAP_RIDGE = 1e-3


def neighbourhood_features(latents: np.ndarray, size: int = LOCAL_MAP_SIZE) -> np.ndarray:
    """``[N, h, w, z]`` → ``[N·h·w, 2·size²·z + 1]``: every latent pixel's size×size neighbourhood (zero
    outside the grid), the squares of those values (intensity remaps are not linear) and a constant 1."""
    pad = size // 2
    padded = np.pad(np.asarray(latents, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = latents.shape[1:3]
    window = np.concatenate([padded[:, i:i + height, j:j + width] for i in range(size) for j in range(size)],
                            axis=-1).reshape(-1, size * size * latents.shape[-1])
    return np.concatenate([window, np.square(window), np.ones((len(window), 1))], axis=1)


def fit_local_map(source: np.ndarray, target: np.ndarray, size: int = LOCAL_MAP_SIZE,
                  ridge: float = LOCAL_MAP_RIDGE) -> np.ndarray:
    """Ridge weights ``[2·size²·z_s + 1, z_t]`` predicting ``target [N, h, w, z_t]`` latents from the
    neighbourhoods of ``source [N, h, w, z_s]`` (float64 normal equations)."""
    if source.shape[:3] != target.shape[:3]:
        raise ValueError(f"source latents {source.shape} and target latents {target.shape} differ in N, h or w")
    features = neighbourhood_features(source, size)
    labels = np.asarray(target, np.float64).reshape(-1, target.shape[-1])
    gram = features.T @ features + ridge * np.eye(features.shape[1])
    return np.linalg.solve(gram, features.T @ labels)


def apply_local_map(weights: np.ndarray, source: np.ndarray, size: int = LOCAL_MAP_SIZE) -> np.ndarray:
    """``[N, h, w, z_s]`` source latents → ``[N, h, w, z_t]`` predicted target latents (float32)."""
    predicted = neighbourhood_features(source, size) @ weights
    return predicted.reshape(*source.shape[:3], weights.shape[1]).astype(np.float32)


class _Autoencoder:
    """Posterior-mean encode / decode of ``[N, H, W]`` slices at the VAE's training size, in chunks."""

    def __init__(self, vae_workdir: str, chunk: int = 64):
        from synermedgen_jax.training.checkpoint import load_model

        config, model = load_model(vae_workdir)
        self.size = tuple(config.data.pack.image_size)
        self.channels = int(config.model.vae.in_channels)
        self.chunk = chunk
        self._encode = jax.jit(lambda x: model.vae.posterior(x)[0])
        self._decode = jax.jit(lambda z: model.vae.decoder(z))

    def encode(self, slices: np.ndarray) -> np.ndarray:
        inputs = np.stack([np.repeat(resize_image(s, self.size)[..., None], self.channels, axis=-1) for s in slices])
        return np.concatenate([np.asarray(self._encode(jnp.asarray(inputs[i:i + self.chunk])))
                               for i in range(0, len(inputs), self.chunk)])

    def decode(self, latents: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        images = np.concatenate([np.asarray(self._decode(jnp.asarray(latents[i:i + self.chunk])))[..., 0]
                                 for i in range(0, len(latents), self.chunk)])
        return np.stack([resize_image(image, shape) for image in images])


def _ssim100(pred: np.ndarray, target: np.ndarray) -> float:
    return 100.0 * float(np.mean(metrics.ssim(pred, target, data_range=2.0)))


def route_ceilings(vae_workdir: str, data_dir: str, split: str = "test", max_slices: int = 4,
                   fit_split: str | None = "train", fit_records: int = 192) -> dict[str, dict]:
    """``{route: {"reconstruction", "identity", "local_map": SSIM×100, "slices": n, "fit_pairs": m}}`` on the
    slices ``eval`` picks for each route (same rule, same count), at the VAE's training image size.

    ``local_map`` is fitted on up to ``fit_records`` records of ``fit_split`` spread evenly over it, those
    holding both modalities (``fit_split=None``: not computed; a route without such pairs gets ``None``). On the
    quickstart data 192 of the 476 training records give every route's score within 0.1 SSIM×100 of a fit on
    all of them, in about half the time."""
    autoencoder = _Autoencoder(vae_workdir)
    reader = RecordReader(data_dir, split)
    tasks, _ = present_tasks(reader, [])
    content = ContentIndex(reader)
    training = _TrainingLatents(RecordReader(data_dir, fit_split), autoencoder, fit_records) if fit_split else None
    out = {}
    for name, records in tasks.items():
        task = get_task(name)
        picked, data = pick_slices(reader, records, task, max_slices, content)
        if not picked:
            continue
        sources = np.stack([np.asarray(r["images"][task.source], np.float32) for r in data])
        targets = np.stack([np.asarray(r["images"][task.target], np.float32) for r in data])
        # decode(posterior mean): training/vae_stage.reconstruct, in chunks shared with the local map.
        recon = autoencoder.decode(autoencoder.encode(targets), targets.shape[1:])
        row = {"reconstruction": _ssim100(recon, targets), "identity": _ssim100(sources, targets),
               "slices": len(picked)}
        if training is not None:
            pairs = training.pairs(task.source, task.target)
            row["fit_pairs"] = 0 if pairs is None else len(pairs[0])
            row["local_map"] = None
            if pairs is not None:
                weights = fit_local_map(*pairs)
                predicted = apply_local_map(weights, autoencoder.encode(sources))
                row["local_map"] = _ssim100(autoencoder.decode(predicted, targets.shape[1:]), targets)
        out[name] = row
    return out


class _TrainingLatents:
    """Latents of every training slice per modality, encoded once and shared by the routes."""

    def __init__(self, reader: RecordReader, autoencoder: _Autoencoder, max_records: int):
        chosen = np.unique(np.linspace(0, len(reader) - 1, min(max_records, len(reader))).round().astype(int))
        self.records = [reader[int(i)] for i in chosen] if len(reader) else []
        self.autoencoder = autoencoder
        self._latents: dict[str, dict[int, np.ndarray]] = {}

    def _of(self, modality: str) -> dict[int, np.ndarray]:
        if modality not in self._latents:
            index = [i for i, r in enumerate(self.records) if modality in r["images"]]
            slices = [np.asarray(self.records[i]["images"][modality], np.float32) for i in index]
            latents = self.autoencoder.encode(np.stack(slices)) if slices else []
            self._latents[modality] = dict(zip(index, latents))
        return self._latents[modality]

    def pairs(self, source: str, target: str) -> tuple[np.ndarray, np.ndarray] | None:
        sources, targets = self._of(source), self._of(target)
        both = sorted(set(sources) & set(targets))
        if not both:
            return None
        return np.stack([sources[i] for i in both]), np.stack([targets[i] for i in both])


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.vae_ceiling --vae WORKDIR --data DIR [--split test] [--max-slices 4]``: prints
    :func:`route_ceilings` as a table (reconstruction, local map and identity SSIM×100 per route). ``--vae`` takes
    a stage-0 workdir or any training workdir whose checkpoint holds the VAE (Stage I/II). Returns 2 with a
    one-line error for a missing or unreadable VAE / data folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", required=True, help="stage-0 (or later) training workdir holding the VAE")
    parser.add_argument("--data", required=True, help="built data folder (build-data --out)")
    parser.add_argument("--split", default="test", help="record split (test, as eval)")
    parser.add_argument("--max-slices", type=int, default=4, help="slices per route (4, as quickstart's eval)")
    args = parser.parse_args(argv)
    from synermedgen_jax.inference.loading import InferenceError
    from synermedgen_jax.training.checkpoint import CheckpointError

    try:
        rows = route_ceilings(args.vae, args.data, args.split, args.max_slices)
    except (CheckpointError, InferenceError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("| route | slices | reconstruction SSIM×100 | local map SSIM×100 | identity SSIM×100 |\n"
          "|---|---|---|---|---|")
    for name, row in rows.items():
        local = "-" if row.get("local_map") is None else f"{row['local_map']:.2f}"
        print(f"| {name} | {row['slices']} | {row['reconstruction']:.2f} | {local} | {row['identity']:.2f} |")
    for key, what in (("reconstruction", "reconstruction"), ("local_map", "local map")):
        above = sum(row.get(key) is not None and row[key] > row["identity"] for row in rows.values())
        print(f"{what} above the identity copy on {above} of {len(rows)} routes")
    return 0
