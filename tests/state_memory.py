"""Subprocess body of tests/test_init_from_import.py (8 simulated devices, set before jax starts).

    python tests/state_memory.py DATA_DIR IMPORTED_CKPT WORKDIR  -> prints JSON

Builds the tiny Stage II state on an fsdp=8 mesh the way ``train`` does (abstract plan, sharded init,
``init_from`` an imported BAGEL checkpoint), saves it, restores it, and after each of the three reports the
bytes every device holds (live-array accounting: the shards of every live array, per device), next to the
state's total bytes and the bytes each device should hold by the sharding rules.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import jax
import numpy as np

from synermedgen_jax import sharding
from synermedgen_jax.accounting.memory import tree_bytes
from synermedgen_jax.config import apply_overrides, load_config
from synermedgen_jax.training import checkpoint, loop, optim
from synermedgen_jax.training import step as step_lib


def per_device_bytes() -> dict[str, int]:
    held: dict[str, int] = defaultdict(int)
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            held[str(shard.device.id)] += shard.data.nbytes
    return dict(held)


def expected_per_device(abstract: dict, shardings: dict) -> dict[str, int]:
    held: dict[str, int] = defaultdict(int)
    for leaf, where in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        shard = where.shard_shape(leaf.shape)
        for device in where.device_set:
            held[str(device.id)] += int(np.prod(shard)) * leaf.dtype.itemsize
    return dict(held)


def main() -> None:
    data_dir, imported, workdir = sys.argv[1:4]
    config = loop.resolve_config(apply_overrides(load_config("configs/stage2_ucg.py:tiny"), [
        f"--config.data.dir={data_dir}", f"--config.init_from={imported}", "--config.mesh.fsdp=8",
        "--config.mesh.data=1", "--config.mesh.tensor=1", "--config.init_moe=False", *vae_overrides()]))
    mesh = sharding.make_mesh(config.mesh)
    make_model, codec, _ = loop.build(config)
    tx = optim.make_optimizer(config.train)
    abstract, shardings = step_lib.plan_state(codec, make_model, tx, config.train, mesh)
    total = tree_bytes(abstract)
    replicated = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                     for x, where in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
                     if where.is_fully_replicated)
    out = {"devices": jax.device_count(), "state_bytes": total, "replicated_bytes": replicated,
           "expected": expected_per_device(abstract, shardings)}
    state = step_lib.create_state(codec, make_model, tx, config.train, shardings)
    out["init"] = per_device_bytes()
    state = loop.apply_init(config, state, shardings, tx)
    out["init_from"] = per_device_bytes()
    mngr = checkpoint.manager(workdir, config.train)
    checkpoint.save(mngr, 0, state, None, config, force=True)
    mngr.wait_until_finished()
    del state
    state = checkpoint.restore(mngr, 0, step_lib.with_shardings(abstract, shardings), None)
    assert int(state["step"]) == 0
    out["restore"] = per_device_bytes()
    mngr.close()
    print(json.dumps(out))


def vae_overrides() -> list[str]:
    """The test BAGEL folder's VAE (FLUX-structured: 3 channels, 32 groups, tests/port_fixtures.py)."""
    return ["--config.model.vae.in_channels=3", "--config.model.vae.ch=32", "--config.model.vae.norm_groups=32"]


if __name__ == "__main__":
    main()
