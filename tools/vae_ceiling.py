"""The autoencoder's ceiling per synthesis route: how well can any prediction score through this VAE?

Every synthesized slice is a VAE decode, so ``decode(encode(target))`` (posterior mean) bounds what Stage II can
reach on a route. This tool evaluates that reconstruction with the evaluation's own slice choice and SSIM, next
to the identity baseline (a copy of the source): on a route where the reconstruction does not beat the copy, no
amount of Stage II training will.

Usage::

    python tools/vae_ceiling.py --vae runs/quickstart/vae --data runs/quickstart/data [--split test] [--max-slices 4]

``--vae`` takes a stage-0 workdir or any training workdir whose checkpoint holds the VAE (Stage I/II).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from synermedgen_jax.data.records import RecordReader  # noqa: E402
from synermedgen_jax.data.volumes import resize_image  # noqa: E402
from synermedgen_jax.evaluation import metrics  # noqa: E402
from synermedgen_jax.evaluation.evaluate import ContentIndex, _pick_slices, present_tasks  # noqa: E402
from synermedgen_jax.evaluation.tasks import get_task  # noqa: E402


def route_ceilings(vae_workdir: str, data_dir: str, split: str = "test", max_slices: int = 4) -> dict[str, dict]:
    """``{route: {"reconstruction": SSIM×100, "identity": SSIM×100, "slices": n}}`` on the slices ``eval``
    picks for each route (same rule, same count), at the VAE's training image size."""
    from synermedgen_jax.training.checkpoint import load_model

    config, model = load_model(vae_workdir)
    size = tuple(config.data.pack.image_size)
    channels = int(config.model.vae.in_channels)
    reconstruct = jax.jit(lambda x: model.vae.decoder(model.vae.posterior(x)[0]))
    reader = RecordReader(data_dir, split)
    tasks, _ = present_tasks(reader, [])
    content = ContentIndex(reader)
    out = {}
    for name, records in tasks.items():
        task = get_task(name)
        picked, data = _pick_slices(reader, records, task, max_slices, content)
        if not picked:
            continue
        sources = np.stack([np.asarray(r["images"][task.source], np.float32) for r in data])
        targets = np.stack([np.asarray(r["images"][task.target], np.float32) for r in data])
        inputs = np.stack([np.repeat(resize_image(t, size)[..., None], channels, axis=-1) for t in targets])
        recon = np.asarray(reconstruct(jnp.asarray(inputs)))[..., 0]
        recon = np.stack([resize_image(r, targets.shape[1:]) for r in recon])
        out[name] = {"reconstruction": 100.0 * float(np.mean(metrics.ssim(recon, targets, data_range=2.0))),
                     "identity": 100.0 * float(np.mean(metrics.ssim(sources, targets, data_range=2.0))),
                     "slices": len(picked)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    print("| route | slices | reconstruction SSIM×100 | identity SSIM×100 |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['slices']} | {row['reconstruction']:.2f} | {row['identity']:.2f} |")
    above = sum(row["reconstruction"] > row["identity"] for row in rows.values())
    print(f"\nreconstruction above the identity copy on {above} of {len(rows)} routes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
