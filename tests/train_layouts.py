"""Subprocess body of the mesh tests (needs XLA_FLAGS with 8 host devices set before jax is imported).

    python tests/train_layouts.py DATA_DIR OUT_DIR   -> prints {"layout": {step: loss}} as JSON
Runs the same tiny Stage I config for 3 steps on one device and on 8-device meshes (fsdp-only, data-only,
fsdp×tensor), always with data.shards=2 so the batches equal those of the two-process launcher test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

LAYOUTS = {"single": (1, 1, 1), "fsdp": (1, 8, 1), "data": (8, 1, 1), "fsdp_tensor": (1, 4, 2)}


def overrides(data_dir: str) -> list[str]:
    return [f"--config.data.dir={data_dir}", "--config.train.steps=3", "--config.train.checkpoint_every=100",
            "--config.train.eval_every=0", "--config.train.progress=False", "--config.data.shards=2",
            "--config.train.keep=1"]


def main() -> None:
    from train_helpers import read_metrics

    from synermedgen_jax.config import apply_overrides, load_config
    from synermedgen_jax.training.loop import train

    jax.config.update("jax_default_matmul_precision", "highest")
    data_dir, out = sys.argv[1], Path(sys.argv[2])
    results = {}
    for name, (data, fsdp, tensor) in LAYOUTS.items():
        config = apply_overrides(load_config("configs/stage1_gau.py:tiny"), overrides(data_dir) + [
            f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={tensor}"])
        devices = jax.devices()[: data * fsdp * tensor]
        assert train(config, out / name, devices=devices) == 0
        results[name] = {step: rec["loss"] for step, rec in read_metrics(out / name).items()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
