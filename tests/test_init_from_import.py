"""Fine-tuning from imported weights, sharded: ``import`` a BAGEL-layout folder, then the real ``train`` command
with ``--config.init_from`` on a simulated fsdp=4 mesh; the first step's parameters are the imported tensors.
And the state is born sharded: after init, after ``init_from`` and after a restore, each of 8 simulated devices
holds its share of the state (the bytes the sharding rules give it), not the whole state."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import train_helpers as h
from port_fixtures import make_bagel_folder, port_test_config
from state_memory import vae_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return h.build_data(tmp_path_factory.mktemp("initdata"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_config):
    from synermedgen_jax.__main__ import main as cli

    root = tmp_path_factory.mktemp("import")
    make_bagel_folder(root / "release", port_test_config(tiny_config), seed=11, dtype=torch.bfloat16)
    assert cli(["import", "--bagel", str(root / "release"), "--out", str(root / "ck"), "--dtype", "f32"]) == 0
    return root / "ck"


def test_train_init_from_import_on_a_mesh(data, imported, tmp_path):
    from synermedgen_jax.port import orbax_io
    from synermedgen_jax.training.checkpoint import model_targets, read_weights

    workdir = tmp_path / "run"
    # warmup > 0: the first step's learning rate is 0, so step 1 holds exactly the weights training started from.
    overrides = [f"--config.data.dir={data}", f"--config.init_from={imported}", "--config.train.steps=1",
                 "--config.train.warmup=10", "--config.train.checkpoint_every=1", "--config.train.eval_every=0",
                 "--config.train.image_every=0", "--config.train.progress=False", "--config.mesh.fsdp=4",
                 "--config.mesh.data=1", "--config.mesh.tensor=1", "--config.init_moe=False", *vae_overrides()]
    result = h.run(h.train_cmd("configs/stage2_ucg.py:tiny", workdir, overrides), h.env(tmp_path / "cache", 4),
                   timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(orbax_io.checkpoint_shapes(imported))
    expected = orbax_io.read_leaves(imported, names)
    from flax import nnx

    from synermedgen_jax.modeling.synermedgen import build_model
    from synermedgen_jax.training.checkpoint import read_config

    config = read_config(workdir)
    targets = model_targets(nnx.eval_shape(lambda: build_model(config.model, 0)))
    trained = read_weights(workdir, targets)
    assert sorted(trained) == names
    differing = [n for n in names if not np.array_equal(np.asarray(trained[n]), expected[n])]
    assert not differing, differing[:5]


def test_state_is_born_sharded(data, imported, tmp_path):
    result = h.run([sys.executable, str(h.REPO / "tests" / "state_memory.py"), str(data), str(imported),
                    str(tmp_path / "ck")], h.env(tmp_path / "cache", 8), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    total, replicated, expected = out["state_bytes"], out["replicated_bytes"], out["expected"]
    assert sorted(expected) == [str(i) for i in range(8)]
    # Everything the rules split is split 8 ways (fsdp=8); what stays whole on every device is what the rules
    # replicate (norms, biases, the frozen VAE, indivisible dims), not the state.
    assert max(expected.values()) <= replicated + (total - replicated) / 8 * 1.01, (expected, total, replicated)
    assert replicated < 0.75 * total, (replicated, total)
    for moment in ("init", "init_from", "restore"):
        held = out[moment]
        assert sorted(held) == sorted(expected), (moment, held)
        for device, bytes_held in held.items():
            # The state's shards plus a little else alive in the process (the step counter, constants).
            assert expected[device] <= bytes_held <= expected[device] + 64 * 1024, (moment, device, held, expected)
