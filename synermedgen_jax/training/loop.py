"""The training loop: build, restore or initialise, step, log, evaluate, checkpoint, handle preemption.

``train(config, workdir)`` resumes automatically from the workdir's latest complete checkpoint. SIGTERM makes
the loop save at the next step boundary and return 0. Metrics are fetched one step late (the device runs
step s+1 while the host logs step s) except at checkpoint steps, whose metrics are checked before saving so a
non-finite step never reaches a checkpoint.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import signal
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from etils.epath import Path  # local paths and gs:// (and other remote) workdirs alike
from flax import nnx
from jax.experimental import multihost_utils

from synermedgen_jax import sharding
from synermedgen_jax.config import to_json
from synermedgen_jax.stages import Stage
from synermedgen_jax.training import checkpoint, inputs, optim
from synermedgen_jax.training import step as step_lib
from synermedgen_jax.training.logging import RunLogger, write_whole
from synermedgen_jax.training.train_eval import Evaluator

NAN_POLICIES = ("stop", "skip")
# (config, codec, workdir, logger) -> grids(state, step, mesh): what renders Stage II sample grids.
SampleGridsFactory = Callable[..., Callable[[dict, int, jax.sharding.Mesh], object]]


class TrainingError(RuntimeError):
    """The run stopped for a reason the message names (non-finite values, bad config)."""


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validated copy with derived fields. The one place that decides Stage II's ``model.llm.freeze_und``:
    ``not train.finetune_und`` (configs set only ``finetune_und``)."""
    config = copy.deepcopy(config)
    optim.trainable_groups(config)  # validates config.stage
    if config.train.nan_policy not in NAN_POLICIES:
        raise TrainingError(f"config.train.nan_policy: {config.train.nan_policy!r}; expected one of {NAN_POLICIES}")
    if config.stage == Stage.STAGE2_UCG:
        config.model.llm.freeze_und = not bool(config.train.finetune_und)
    if int(config.train.rows) % int(config.train.grad_accum):
        raise TrainingError(f"config.train.rows={config.train.rows} is not a multiple of grad_accum")
    if config.stage != Stage.VAE:
        from synermedgen_jax.training.vae_stage import adopt_latent_scale

        adopt_latent_scale(config)  # a stage-0 VAE's fitted latent scale travels with its weights
    return config


def build(config) -> tuple[Callable[[], nnx.Module], step_lib.Codec, step_lib.Objective]:
    """``(make_model, codec, objective)`` for the config's stage. Nothing is allocated: the codec comes from the
    abstract model; ``make_model`` is traced by the sharded init (deterministic in the seed)."""
    seed = int(config.train.seed)
    if config.stage == Stage.VAE:
        from synermedgen_jax.training.vae_stage import VaeObjective, build_vae_model

        make_model = functools.partial(build_vae_model, config.model, seed)
        objective = VaeObjective(float(config.train.l1_weight), float(config.train.l2_weight),
                                 float(config.train.kl_weight), bool(config.model.vae.sample_posterior),
                                 float(config.train.get("ssim_weight", 0.0)))
    else:
        from synermedgen_jax.modeling.synermedgen import build_model

        make_model = functools.partial(build_model, config.model, seed)
        from synermedgen_jax.training.objective import UnifiedObjective

        objective = UnifiedObjective(float(config.train.ce_weight), float(config.train.mse_weight))
    return make_model, step_lib.Codec(nnx.eval_shape(make_model), optim.trainable_predicate(config)), objective


def _weight_targets(state: dict, shardings: dict, sections=("params", "frozen")) -> dict[str, jax.ShapeDtypeStruct]:
    """``{name: ShapeDtypeStruct}`` with each weight's sharding: where a checkpoint read puts it."""
    return {name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=shardings[section][name])
            for section in sections for name, value in state[section].items()}


def _assign(state: dict, shardings: dict, weights: dict) -> None:
    """Puts ``weights`` (already on their shardings, or arrays to place) into ``state['params'|'frozen']``."""
    for section in ("params", "frozen"):
        for name in state[section]:
            if name in weights:
                # A fresh buffer: two names must never share one (init_moe twins, EMA) or donation fails.
                state[section][name] = jax.device_put(weights[name], shardings[section][name], may_alias=False)


def apply_init(config, state: dict, shardings: dict, tx, *, log: Callable[[str], None] | None = None) -> dict:
    """init_from (all weights by name), init_moe (und → gen expert), vae_from (vae.* weights), on a sharded
    state: every weight is read straight onto its sharding, so each process reads only its shards.

    init_moe follows BAGEL's order (``copy_init_moe``, then the checkpoint load overrides): the understanding
    expert is copied only into the generation-expert weights ``init_from`` does not hold (a plain Qwen2, or no
    init_from at all); a generation expert the init checkpoint holds (an import, a training workdir of any stage)
    is kept bit for bit. ``log``: where the one line saying which happened goes (default: this module's logger).
    """
    if not (config.init_from or config.init_moe or config.vae_from):
        return state
    log = log or logging.getLogger(__name__).info
    twins = _expert_twins(config, state) if config.init_moe else {}
    held: set[str] = set()  # names init_from supplied
    if config.init_from:
        targets = _weight_targets(state, shardings)
        weights = checkpoint.read_weights(config.init_from, targets)
        # Generation-expert twins the checkpoint lacks are what init_moe fills; anything else missing is an error.
        missing = sorted(set(targets) - set(weights) - set(twins))
        if missing:
            raise checkpoint.CheckpointError(f"init_from {config.init_from}: {len(missing)} parameters missing, "
                                             f"e.g. {missing[:5]}")
        _assign(state, shardings, weights)
        held = set(weights)
    if config.init_moe:
        everything = {**state["frozen"], **state["params"]}  # after init_from: its understanding expert
        overwrite = bool(config.get("init_moe_overwrite", False))
        copies = {gen: everything[und] for gen, und in twins.items() if overwrite or gen not in held}
        _assign(state, shardings, copies)
        kept = len(twins) - len(copies)
        if not copies:
            log(f"init_moe: kept the generation expert of {config.init_from} ({kept} weights); nothing copied"
                + _import_copied_note(config.init_from))
        else:
            source = f"{config.init_from}'s" if config.init_from else "the initial"
            log(f"init_moe: copied {len(copies)} generation-expert weights from {source} understanding expert"
                + (" (init_moe_overwrite: over the checkpoint's own)" if overwrite and held else "")
                + (f"; kept {kept} the checkpoint holds" if kept else ""))
    if config.vae_from:
        targets = {n: t for n, t in _weight_targets(state, shardings).items() if n.startswith("vae.")}
        weights = checkpoint.read_weights(config.vae_from, targets)
        if not weights:
            raise checkpoint.CheckpointError(f"vae_from {config.vae_from}: no vae.* weights found")
        _assign(state, shardings, weights)
    # Fresh moments (and EMA) for the loaded parameters, born on their shardings.
    state["opt"] = jax.jit(tx.init, out_shardings=shardings["opt"])(state["params"])
    if state["ema"]:
        state["ema"] = {n: jax.device_put(v, shardings["ema"][n], may_alias=False) for n, v in state["params"].items()}
    return state


def _import_copied_note(path: str) -> str:
    """An imported plain-Qwen2 checkpoint already holds a copied generation expert (``import`` copies it when
    the folder has no ``_moe_gen`` key; port.json's notes say so): the log line names that, not a trained one."""
    notes = Path(path) / "port.json"
    if not (checkpoint.is_params_checkpoint(path) and notes.is_file()):
        return ""
    try:
        said = json.loads(notes.read_text()).get("notes", [])
    except ValueError:
        return ""
    copied = any("copied from the understanding expert" in str(note) for note in said)
    return " (import copied it from the understanding expert: the BAGEL folder had no _moe_gen key)" if copied else ""


def _expert_twins(config, state: dict) -> dict[str, str]:
    """``{generation-expert weight: its understanding twin}`` by state name, from the decoder's declared module
    pairs; both of each pair must be in the train state."""
    from synermedgen_jax.modeling.synermedgen import build_model, expert_twin_names

    twins = expert_twin_names(nnx.eval_shape(lambda: build_model(config.model, 0)))
    everything = {*state["frozen"], *state["params"]}
    absent = sorted(name for pair in twins.items() for name in pair if name not in everything)
    if absent:
        raise checkpoint.CheckpointError(f"init_moe: expert twins missing from the train state: {absent[:5]}")
    return twins


class _Preemption:
    """Preemption notices checked at step boundaries.

    One process: SIGTERM sets a flag. Several: JAX's preemption service (started by ``jax.distributed``)
    catches SIGTERM on any process, agrees in the background on the first step every process will reach, and
    :func:`~jax.experimental.multihost_utils.reached_preemption_sync_point` turns true there on all of them:
    a local check each step, no collective on the step's path.
    """

    def __init__(self):
        self.requested = False
        self.multi = jax.process_count() > 1
        # The preemption service installs its own SIGTERM handler; a Python one would replace it.
        self._previous = None if self.multi else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def check(self, step: int) -> bool:
        if self.multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _tokens(batch: dict) -> int:
    if "sample_id" in batch:
        return int(np.sum(batch["sample_id"] >= 0))
    return int(np.prod(batch["image"].shape[:3]))


# metrics.jsonl / TensorBoard name -> (data/packing.real_counts key, the pack array whose axis holds its slots, axis)
REAL_FRACTIONS = {"und": ("und_tokens", "token_ids", -1), "gen": ("gen_tokens", "latent_index", -1),
                  "vit": ("vit_patches", "vit_image_id", -1), "vae": ("vae_images", "vae_images", -4),
                  "ce": ("ce_tokens", "ce_mask", -1)}


def real_fractions(batch: dict, model_config) -> dict[str, float]:
    """``{"real_frac/<region>": real / slots}`` of a host-side (numpy) pack batch: every slot costs the step the
    same whether it holds data or padding, so these say how much of the step's work was real. ``tokens`` is the
    whole sequence (und + gen); a region with no slots in this budget (Stage I's gen / VAE) has no entry. Empty
    for stage-0 image batches, which carry no padding."""
    if "sample_id" not in batch:
        return {}
    from synermedgen_jax.data.packing import real_counts

    counts = real_counts(batch, model_config)
    rows = batch["sample_id"].shape[0]
    out = {"real_frac/tokens": float(np.sum(batch["sample_id"] >= 0)) / batch["sample_id"].size}
    for name, (key, array, axis) in REAL_FRACTIONS.items():
        slots = batch[array].shape[axis] * rows
        if slots:
            out[f"real_frac/{name}"] = float(np.sum(counts[key])) / slots
    return out


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, stop_at: int | None = None,
          devices: list | None = None, sample_grids: SampleGridsFactory | None = None) -> int:
    """Runs (or resumes) a stage. Returns 0 when finished or preempted cleanly. ``devices``: the mesh's
    devices (default all; a subset lets one process compare layouts). ``sample_grids``: the Stage II sample
    grid renderer, built as ``sample_grids(config, codec, workdir, logger)`` and called as
    ``grids(state, step, mesh)`` every ``train.image_every`` steps (commands/train.py passes
    inference/sample_grids.SampleGrids; None: no grids)."""
    config = resolve_config(config)
    workdir = Path(workdir)
    tcfg = config.train
    mesh = sharding.make_mesh(config.mesh, devices)
    from synermedgen_jax.kernels.dispatch import resolve_kernels  # "auto" → concrete, logged by RunLogger

    config.model = resolve_kernels(config.model, mesh.devices.flat[0].platform, mesh_shape=dict(mesh.shape))
    if int(tcfg.rows) % sharding.batch_divisor(mesh):
        raise TrainingError(f"config.train.rows={tcfg.rows} must be a multiple of data×fsdp = "
                            f"{sharding.batch_divisor(mesh)} on mesh {dict(mesh.shape)}")
    make_model, codec, objective = build(config)
    tx = optim.make_optimizer(tcfg)
    # The state is planned abstractly and created (or restored) straight onto its shardings: no process ever
    # holds the whole state, on the host or on one device.
    abstract, shardings = step_lib.plan_state(codec, make_model, tx, tcfg, mesh)
    if jax.process_count() == 1:  # several processes may share a disk or not: each would misjudge its part
        problem = checkpoint.free_space_problem(workdir, abstract)
        if problem:
            raise TrainingError(problem)
    batches = inputs.train_batches(config)
    mngr = checkpoint.manager(workdir, tcfg)
    n_trainable = sum(int(np.prod(v.shape)) for v in abstract["params"].values())
    logger = RunLogger(workdir, config, n_trainable, mesh.size) if jax.process_index() == 0 else None
    preemption = _Preemption()
    try:
        latest = mngr.latest_step()
        if latest is not None:  # the newest restorable step; damaged newer ones are named and set aside
            latest, state = _restore_latest(mngr, workdir, step_lib.with_shardings(abstract, shardings), batches,
                                            logger)
            if logger:
                logger.message(f"resumed from {workdir}/{latest}")
        else:
            state = step_lib.create_state(codec, make_model, tx, tcfg, shardings)
            state = apply_init(config, state, shardings, tx, log=logger.message if logger else None)
            if jax.process_index() == 0:
                workdir.mkdir(parents=True, exist_ok=True)
                write_whole(workdir / "config.json", to_json(config))
        start = int(jax.device_get(state["step"]))
        if logger:
            logger.forget_after(start)  # rows of steps the resumed run recomputes are written once, by it
        total = int(tcfg.steps)
        if start >= total:
            if logger:
                logger.message(f"{workdir} already holds step {start} >= train.steps={total}; nothing to do")
            _after_training(config, codec, state, workdir, logger)
            return 0
        first = next(batches)
        batch_sh = sharding.batch_sharding(mesh, first)
        train_step = step_lib.jit_train_step(step_lib.make_train_step(codec, tx, objective, tcfg), shardings,
                                             batch_sh, mesh)
        evaluator = Evaluator(config, codec, objective, shardings, mesh, logger) if int(tcfg.eval_every) else None
        grids = (sample_grids(config, codec, workdir, logger)
                 if sample_grids is not None and int(tcfg.image_every) > 0 and config.stage == Stage.STAGE2_UCG
                 else None)
        pending = None  # (step, metrics on device, tokens, real fractions of the local rows)
        local_batch = first
        last_time = time.perf_counter()
        compiled = False
        for current in range(start, total):
            if preemption.check(current) or (stop_at is not None and current >= stop_at):
                _finish_pending(pending, logger, tcfg, last_time)
                pending = None
                if current not in mngr.all_steps():  # a checkpoint step may already hold this state
                    checkpoint.save(mngr, current, state, batches, config, force=True)
                checkpoint.wait_until_finished(mngr)
                if logger:
                    logger.message(f"stopped at step {current} (checkpoint saved); rerun the same command to resume")
                return 0
            if local_batch is None:
                local_batch = next(batches)
            global_batch = sharding.global_batch(local_batch, mesh)
            tokens = _tokens(local_batch) * jax.process_count()
            # Read off this process's rows on the host, before placement: no device time, no collective. With
            # several processes this is the fraction of this process's rows only (what process 0 logs): the loop
            # does no host reduction (tokens above scales the local count too), and every process packs its own
            # shards with the same budget and packer, so its fill is a fair sample of the step's.
            fractions = real_fractions(local_batch, config.model)
            local_batch = None
            if not compiled:
                if logger:
                    logger.message(f"compiling the train step (can take a minute), then steps {current}..{total}")
                train_step = train_step.lower(state, global_batch).compile()
                _wait_for_all_processes("train step compiled")
                compiled, last_time = True, time.perf_counter()
            state, metrics = train_step(state, global_batch)
            if pending is not None:
                last_time = _finish_pending(pending, logger, tcfg, last_time)
            pending = (current, metrics, tokens, fractions)
            done = current + 1
            if done % int(tcfg.checkpoint_every) == 0 or done == total:
                last_time = _finish_pending(pending, logger, tcfg, last_time)
                pending = None
                checkpoint.save(mngr, done, state, batches, config, force=True)
            if evaluator is not None and (done % int(tcfg.eval_every) == 0 or done == total):
                evaluator(state, done)
            if grids is not None and done % int(tcfg.image_every) == 0:
                grids(state, done, mesh)
        _finish_pending(pending, logger, tcfg, last_time)
        checkpoint.wait_until_finished(mngr)
        _after_training(config, codec, state, workdir, logger)
        if logger:
            logger.message(f"finished {total} steps in {workdir}")
        return 0
    finally:
        preemption.close()
        try:
            checkpoint.wait_until_finished(mngr)  # a failed async save: an OSError naming the step and errno
        finally:
            mngr.close()
        if logger:
            logger.close()


def _restore_latest(mngr, workdir: Path, target: dict, batches, logger) -> tuple[int, dict]:
    """``(step, state)`` of the newest step that restores and matches its saved fingerprints
    (``checkpoint.restore_newest``); newer damaged steps are reported (step and file or array) and renamed
    ``damaged-<step>`` (kept, ignored by Orbax) so this run can save those steps again. None restorable: a
    CheckpointError naming each step, never a silent start from step 0."""
    log = logger.message if logger else (lambda text: None)
    latest, state, damaged = checkpoint.restore_newest(mngr, target, batches, log=log)
    if damaged:
        if jax.process_index() == 0:
            checkpoint.set_aside_damaged(workdir, [step for step, _ in damaged], log=log)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("set_aside_damaged")
        mngr.reload()
    return latest, state


def _wait_for_all_processes(name: str) -> None:
    """A host barrier through jax.distributed's coordination service (no device collective), so the processes'
    first collective starts together whatever each one's compile time took: CPU (gloo) collectives give up when
    a peer is more than ~30 s late."""
    if jax.process_count() > 1:
        from jax._src import distributed  # the coordination client; JAX exposes no public host barrier

        distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=3_600_000)


def _after_training(config, codec, state: dict, workdir: Path, logger) -> None:
    """Stage 0 with ``train.fit_latent_scale``: measure the trained VAE's latent scale (every process computes,
    process 0 writes; also on a rerun of a finished run whose file is missing)."""
    if config.stage != Stage.VAE or not config.train.get("fit_latent_scale", False):
        return
    from synermedgen_jax.training import vae_stage

    if (workdir / vae_stage.LATENT_SCALE_FILE).exists():
        return
    model = codec.model(state["params"], state["frozen"])
    stats = vae_stage.fit_latent_scale(model, inputs.record_images(config, 512))
    if jax.process_index() == 0:
        vae_stage.write_latent_scale_file(workdir, stats)
    if logger:
        logger.message(f"latent scale on {stats['images']} training slices: scale_factor {stats['scale_factor']:.4f}, "
                       f"shift_factor {stats['shift_factor']:.4f} ({workdir / vae_stage.LATENT_SCALE_FILE})")


def _finish_pending(pending, logger, tcfg, last_time: float) -> float:
    """Fetches a dispatched step's metrics, applies the non-finite guard and logs. Returns the fetch time."""
    if pending is None:
        return last_time
    step, metrics, tokens, fractions = pending
    values = {key: float(value) for key, value in jax.device_get(metrics).items()}
    now = time.perf_counter()
    if not values.pop("finite", 1.0) or not all(math.isfinite(v) for v in values.values()):
        bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v)) or "non-finite gradients"
        if tcfg.nan_policy == "stop":
            raise TrainingError(f"non-finite loss or gradients at step {step} ({bad}); stopped without saving, "
                                "the last checkpoint is intact (set train.nan_policy=skip to skip such steps)")
        if logger:
            logger.message(f"step {step}: non-finite values ({bad}); update skipped")
    if logger:
        logger.step(step, values, tokens, now - last_time, real_frac=fractions)
    return now
