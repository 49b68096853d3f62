"""The autoencoder's ceiling per synthesis route: how well can any prediction score through this VAE?

Every synthesized slice is a VAE decode, so ``decode(encode(target))`` (posterior mean) bounds what Stage II can
reach on a route. :func:`route_ceilings` evaluates that reconstruction with the evaluation's own slice choice and
SSIM, next to the identity baseline (a copy of the source): on a route where the reconstruction does not beat the
copy, no amount of Stage II training will. ``tools/vae_ceiling.py`` prints it; ``quickstart`` reports it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from synermedgen_jax.data.records import RecordReader
from synermedgen_jax.data.volumes import resize_image
from synermedgen_jax.evaluation import metrics
from synermedgen_jax.evaluation.evaluate import ContentIndex, _pick_slices, present_tasks
from synermedgen_jax.evaluation.tasks import get_task


def route_ceilings(vae_workdir: str, data_dir: str, split: str = "test", max_slices: int = 4) -> dict[str, dict]:
    """``{route: {"reconstruction": SSIM×100, "identity": SSIM×100, "slices": n}}`` on the slices ``eval``
    picks for each route (same rule, same count), at the VAE's training image size."""
    from synermedgen_jax.training.checkpoint import load_model
    from synermedgen_jax.training.vae_stage import reconstruct as posterior_mean_reconstruction

    config, model = load_model(vae_workdir)
    size = tuple(config.data.pack.image_size)
    channels = int(config.model.vae.in_channels)
    reconstruct = jax.jit(lambda x: posterior_mean_reconstruction(model, x))
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
