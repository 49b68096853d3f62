"""Orbax checkpoints of training runs, and ``load_model`` for the other commands.

A workdir holds ``<step>/`` folders written by an Orbax ``CheckpointManager`` (async, keep-last-N). Items:
  state     the train state pytree (training/step.py): step, params, frozen, opt, ema, rng
  data      the input iterator state, one JSON file per process (Grain's checkpoint handler)
  config    the full run config as JSON (never pickle)
  manifest  ``{section: {name: [shape, dtype]}}`` of params/frozen/ema, checked before any restore so an
            incompatible checkpoint fails with the mismatching names and shapes
Orbax writes a step into a temporary folder and renames it when every item is complete, so a save killed
half-way leaves no ``<step>/`` folder and is never restored (``cleanup_tmp_directories`` removes it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain.checkpoint as grain_ckpt
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from synermedgen_jax.config import from_json, to_json

SECTIONS = ("params", "frozen", "ema")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (missing, incomplete or incompatible)."""


def manager(workdir: str | Path, train, *, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(train.keep) if train is not None else None,
        enable_async_checkpointing=bool(train.async_checkpoint) if train is not None else False,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": grain_ckpt.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(), "manifest": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(workdir).absolute(), options=options, item_handlers=handlers)


def manifest_of(state: dict) -> dict:
    return {section: {name: [list(np.shape(v)), str(np.dtype(v.dtype))] for name, v in state[section].items()}
            for section in SECTIONS}


def check_compatible(saved: dict, expected: dict, *, what: str, sections=SECTIONS) -> None:
    """Raises CheckpointError naming every parameter whose presence or shape differs."""
    problems = []
    for section in sections:
        have, want = saved.get(section, {}), expected.get(section, {})
        for name in sorted(set(have) | set(want)):
            if name not in have:
                problems.append(f"{section}.{name}: missing in checkpoint (expected shape {want[name][0]})")
            elif name not in want:
                problems.append(f"{section}.{name}: in checkpoint (shape {have[name][0]}) but not in this model")
            elif list(have[name][0]) != list(want[name][0]):
                problems.append(f"{section}.{name}: checkpoint shape {have[name][0]} != model shape {want[name][0]}")
    if problems:
        shown = "\n  ".join(problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise CheckpointError(f"{what} does not match this config ({len(problems)} mismatches):\n  {shown}{more}")


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_iter: Any, config, *, force: bool = False
         ) -> bool:
    args = {"state": ocp.args.PyTreeSave(state), "config": ocp.args.JsonSave(json.loads(to_json(config))),
            "manifest": ocp.args.JsonSave(manifest_of(state))}
    if data_iter is not None:
        args["data"] = grain_ckpt.CheckpointSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def _abstract(tree: Any) -> Any:
    def leaf(x):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(leaf, tree)


def restore(mngr: ocp.CheckpointManager, step: int, target: dict, data_iter: Any) -> dict:
    """Restores ``state`` (onto ``target``'s shardings, so a different mesh reshards) and the iterator."""
    saved = mngr.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))["manifest"]
    check_compatible(saved, manifest_of(target), what=f"checkpoint {mngr.directory}/{step}")
    abstract = _abstract(target)
    args = {"state": ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
        abstract))}
    if data_iter is not None:
        args["data"] = grain_ckpt.CheckpointRestore(data_iter)
    return mngr.restore(step, args=ocp.args.Composite(**args))["state"]


def resolve(path: str | Path) -> tuple[Path, int]:
    """A workdir (its latest complete step) or a step directory -> ``(workdir, step)``."""
    path = Path(path)
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    steps = [int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "state").is_dir()]
    if not steps:
        raise CheckpointError(f"{path} holds no complete checkpoint")
    return path, max(steps)


def read_config(path: str | Path) -> ml_collections.ConfigDict:
    workdir, step = resolve(path)
    return from_json((workdir / str(step) / "config" / "metadata").read_text())


def load_weights(path: str | Path, sections: tuple[str, ...] = SECTIONS, *, sharding=None
                 ) -> tuple[ml_collections.ConfigDict, dict[str, dict[str, jax.Array]]]:
    """Only the weight sections of a checkpoint (no optimizer state is read): ``(config, {section: flat})``."""
    workdir, step = resolve(path)
    mngr = manager(workdir, None, read_only=True)
    try:
        saved = mngr.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore(),
                                                             config=ocp.args.JsonRestore()))
        manifest = saved["manifest"]
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {section: {name: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)
                            for name, (shape, dtype) in manifest[section].items()}
                  for section in sections if manifest.get(section)}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=restore_args, partial_restore=True)))["state"]
    finally:
        mngr.close()
    return ml_collections.ConfigDict(saved["config"]), {s: dict(state.get(s, {})) for s in sections}


def load_model(path: str, *, ema: bool = True) -> tuple[ml_collections.ConfigDict, Any]:
    """``(run config, SynerMedGen)`` from a workdir (latest checkpoint) or a step directory.

    With ``ema=True`` the EMA of the trained parameters replaces them when the run kept one. Stage-0 (VAE)
    checkpoints return a model whose ``vae`` holds the trained autoencoder and whose other parts are random.
    """
    from flax import nnx

    from synermedgen_jax.modeling.synermedgen import build_model
    from synermedgen_jax.training.step import path_name

    config, weights = load_weights(path)
    model = build_model(config.model, seed=int(config.train.seed))
    flat = {**weights["frozen"], **weights["params"]}
    if ema and weights.get("ema"):
        flat.update(weights["ema"])
    state = nnx.state(model)
    expected = {path_name(p): [list(v.get_value().shape), str(v.get_value().dtype)]
                for p, v in nnx.to_flat_state(state)}
    if config.stage == "vae":
        expected = {n: s for n, s in expected.items() if n.startswith("vae.")}
    check_compatible({"params": {n: [list(v.shape), str(v.dtype)] for n, v in flat.items()}},
                     {"params": expected}, what=f"checkpoint {path}", sections=("params",))
    for p, variable in nnx.to_flat_state(state):
        name = path_name(p)
        if name in flat:
            variable.set_value(flat[name])
    nnx.update(model, state)
    return config, model
