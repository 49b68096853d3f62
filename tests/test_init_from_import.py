"""Fine-tuning from imported weights, sharded: ``import`` a BAGEL-layout folder, then the real ``train`` command
with ``--config.init_from`` on a simulated fsdp=4 mesh; the first step's parameters are the imported tensors.
And the state is born sharded: after init, after ``init_from`` and after a restore, each of 8 simulated devices
holds its share of the state (the bytes the sharding rules give it), not the whole state.

``init_moe`` in BAGEL's order (copy_init_moe, then the checkpoint load): the understanding expert fills only the
generation-expert weights the init checkpoint lacks; a generation expert it holds (an import with ``_moe_gen``
keys, a training workdir) is kept bit for bit."""

from __future__ import annotations

import json
import sys

import jax
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
                 "--config.mesh.data=1", "--config.mesh.tensor=1", *vae_overrides()]  # Stage II: init_moe=True
    result = h.run(h.train_cmd("configs/stage2_ucg.py:tiny", workdir, overrides), h.env(tmp_path / "cache", 4),
                   timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # The import's _moe_gen tensors are kept (checked bit for bit below), and the run says so.
    assert "init_moe: kept the generation expert" in result.stderr, result.stderr[-3000:]
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


# ------------------------------------------------------------------------------------------------------------
# init_moe against what the init checkpoint holds, in process on one device (apply_init as ``train`` calls it).
def _stage2(init_from, init_moe: bool = True):
    from synermedgen_jax import sharding
    from synermedgen_jax.config import apply_overrides, load_config
    from synermedgen_jax.training import loop, optim
    from synermedgen_jax.training import step as step_lib

    config = loop.resolve_config(apply_overrides(load_config("configs/stage2_ucg.py:tiny"), [
        f"--config.init_from={init_from}", f"--config.init_moe={init_moe}", "--config.mesh.fsdp=1",
        *vae_overrides()]))
    make_model, codec, _ = loop.build(config)
    tx = optim.make_optimizer(config.train)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    abstract, shardings = step_lib.plan_state(codec, make_model, tx, config.train, mesh)
    create = lambda: step_lib.create_state(codec, make_model, tx, config.train, shardings)  # noqa: E731
    return config, create, shardings, tx, abstract


def _init(init_from, init_moe: bool = True) -> tuple[dict, dict, list[str]]:
    """``(weights after apply_init by name, the generation→understanding twins, the lines it logged)``."""
    from synermedgen_jax.training import loop

    config, create, shardings, tx, _ = _stage2(init_from, init_moe)
    lines: list[str] = []
    state = loop.apply_init(config, create(), shardings, tx, log=lines.append)
    weights = {n: np.asarray(v) for section in ("params", "frozen") for n, v in state[section].items()}
    return weights, loop._expert_twins(config, state), lines


def _imported_leaves(folder) -> dict[str, np.ndarray]:
    from synermedgen_jax.port import orbax_io

    return orbax_io.read_leaves(folder, sorted(orbax_io.checkpoint_shapes(folder)))


def _same(a: dict, b: dict, names) -> list[str]:
    return [n for n in names if not np.array_equal(a[n], b[n])]


def test_init_moe_keeps_an_imported_generation_expert(imported):
    expected = _imported_leaves(imported)
    weights, twins, lines = _init(imported)
    assert not _same(weights, expected, expected)
    # The release's two experts differ, so a copy would show.
    assert _same(weights, weights | {g: weights[u] for g, u in twins.items()}, twins)
    assert len(lines) == 1 and "kept the generation expert" in lines[0] and "import copied" not in lines[0], lines


def test_init_moe_with_a_plain_qwen2_import(tmp_path, tiny_config):
    """No _moe_gen key: ``import`` itself copies und → gen (BAGEL's init_moe), so the checkpoint holds a
    generation expert equal to its understanding twin; init_moe keeps it (the same bits either way) and says
    that the import made it."""
    from synermedgen_jax.__main__ import main as cli

    make_bagel_folder(tmp_path / "qwen2", port_test_config(tiny_config), seed=12, moe=False, dtype=torch.bfloat16)
    assert cli(["import", "--bagel", str(tmp_path / "qwen2"), "--out", str(tmp_path / "ck"), "--dtype", "f32"]) == 0
    expected = _imported_leaves(tmp_path / "ck")
    for init_moe in (True, False):
        weights, twins, lines = _init(tmp_path / "ck", init_moe)
        assert not _same(weights, expected, expected)
        assert not _same(weights, {g: weights[u] for g, u in twins.items()}, twins)
        if init_moe:
            assert len(lines) == 1 and "kept the generation expert" in lines[0] and "import copied" in lines[0], lines


def test_init_moe_fills_only_what_the_checkpoint_lacks(imported, tmp_path):
    """A checkpoint without (some) generation-expert weights: those get their understanding twin (from the
    checkpoint), the ones it holds are kept; any other missing weight, or a missing twin without init_moe, is an
    error."""
    from synermedgen_jax.port import orbax_io
    from synermedgen_jax.training import loop
    from synermedgen_jax.training.checkpoint import CheckpointError

    expected = _imported_leaves(imported)
    config, _, shardings, tx, abstract = _stage2(imported)
    twins = loop._expert_twins(config, abstract)
    dropped = sorted(twins)[::2]  # every other generation weight (norms, kernels, biases of both kinds)

    def without(names, out):
        config = orbax_io.read_config(imported)
        orbax_io.write_params_checkpoint(out, config, ((n, v) for n, v in expected.items() if n not in names))
        return out

    partial = without(set(dropped), tmp_path / "partial")
    weights, _, lines = _init(partial)
    assert not _same(weights, {g: expected[twins[g]] for g in dropped}, dropped)
    assert not _same(weights, expected, set(expected) - set(dropped))
    assert len(lines) == 1 and f"copied {len(dropped)} generation-expert weights" in lines[0], lines
    assert f"kept {len(twins) - len(dropped)}" in lines[0], lines
    # The errors come from the read, before any array is made: the abstract state is enough to see them.
    with pytest.raises(CheckpointError, match="parameters missing"):
        loop.apply_init(_stage2(partial, init_moe=False)[0], abstract, shardings, tx)
    no_connector = without({"connector.fc1.kernel"}, tmp_path / "no_connector")
    with pytest.raises(CheckpointError, match="connector.fc1.kernel"):
        loop.apply_init(_stage2(no_connector)[0], abstract, shardings, tx)


def test_init_moe_keeps_a_training_workdirs_generation_expert(imported, tmp_path):
    """Stage I → Stage II: a training workdir holds the whole model (params and frozen), so its generation
    expert (here BAGEL's, imported) is what Stage II starts from, not a copy of the understanding expert."""
    from synermedgen_jax.training import checkpoint, loop

    config, create, shardings, tx, _ = _stage2(imported, init_moe=False)
    state = loop.apply_init(config, create(), shardings, tx)
    twins = loop._expert_twins(config, state)
    # A trained generation expert that no longer equals the import: one step's worth of change.
    for section in ("params", "frozen"):
        state[section] = {n: v + 0.25 if n in twins else v for n, v in state[section].items()}
    saved = {n: np.asarray(v) for section in ("params", "frozen") for n, v in state[section].items()}
    mngr = checkpoint.manager(tmp_path / "stage1", config.train)
    checkpoint.save(mngr, 3, state, None, config, force=True)
    mngr.wait_until_finished()
    mngr.close()
    weights, _, lines = _init(tmp_path / "stage1")
    assert not _same(weights, saved, saved)
    assert len(lines) == 1 and "kept the generation expert" in lines[0], lines
