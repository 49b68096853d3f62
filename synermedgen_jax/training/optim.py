"""What each stage trains, the optax optimizer (AdamW + warm-up schedule + clipping) and the EMA rule.

Parameters are handled as flat dicts ``{"language_model.layers.0.mlp.up_proj.kernel": array}``. The train step
differentiates only the *trainable* dict, so frozen parameters have neither gradients nor optimizer state
(cheaper than optax.masked/set_to_zero over the full tree, which still materialises zero gradients).

Parameter groups are declared once (:data:`GROUPS`, :data:`VISION_TOWER`) as nnx filters: predicates
``(path, variable) -> bool`` over a variable's path in the model, e.g.
``("language_model", "layers", 0, "mlp_moe_gen", "up_proj", "kernel")``. The train state's split
(``step.Codec``) and the optimizer's masks both read them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from synermedgen_jax.stages import UNDERSTANDING_STAGES, Stage


def _under(*modules: str) -> Callable:
    """Variables of the model's top-level attributes ``modules``."""
    return lambda path, _: str(path[0]) in modules


def _generation_expert(path, _) -> bool:
    """The decoder's generation expert: every ``*_moe_gen`` twin module of ``MoTLanguageModel.expert_pairs``
    (BAGEL's names, which the checkpoints keep)."""
    return str(path[0]) == "language_model" and any(str(part).endswith("_moe_gen") for part in path[1:])


# The parameter groups. "und" = ViT + connector + the understanding expert with the shared embedding /
# lm_head; "gen" = the generation expert + vae2llm/llm2vae/time embedder; "vae" = the autoencoder.
GROUPS: dict[str, nnx.filterlib.Filter] = {
    "vae": _under("vae"),
    "und": nnx.Any(_under("vit_model", "connector"), nnx.All(_under("language_model"), nnx.Not(_generation_expert))),
    "gen": nnx.Any(_generation_expert, _under("vae2llm", "llm2vae", "time_embedder")),
}
VISION_TOWER: nnx.filterlib.Filter = _under("vit_model")  # its learning rate scales by train.vit_lr_scale
# Frozen with train.freeze_vit_patch_embedding: a ViT trained from scratch keeps its random patch projection.
VIT_PATCH_EMBEDDING: nnx.filterlib.Filter = nnx.All(VISION_TOWER, nnx.PathContains("patch_embedding"))

# Which groups each stage trains.
STAGE_GROUPS: dict[Stage, tuple[str, ...]] = {
    Stage.VAE: ("vae",),
    **{stage: ("und",) for stage in sorted(UNDERSTANDING_STAGES)},
    Stage.STAGE2_UCG: ("gen",),
}


def trainable_groups(config) -> tuple[str, ...]:
    if config.stage not in STAGE_GROUPS:
        raise ValueError(f"config.stage: unknown stage {config.stage!r}; expected one of "
                         f"{sorted(map(str, STAGE_GROUPS))}")
    groups = STAGE_GROUPS[config.stage]
    if config.stage == Stage.STAGE2_UCG and config.train.get("finetune_und", False):
        groups = groups + ("und",)
    return groups


def trainable_predicate(config) -> Callable:
    """The nnx filter (``(path, variable) -> bool``) of the parameters ``config.stage`` trains."""
    trained = nnx.Any(*(GROUPS[group] for group in trainable_groups(config)))
    if config.train.get("freeze_vit_patch_embedding", False):
        trained = nnx.All(trained, nnx.Not(VIT_PATCH_EMBEDDING))
    return nnx.filterlib.to_predicate(trained)


def learning_rate_schedule(train) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup`` steps, then constant or cosine to ``lr·min_lr_ratio``."""
    lr, warmup, steps = float(train.lr), int(train.warmup), int(train.steps)
    if train.schedule == "constant":
        if warmup <= 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    if train.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), max(steps, warmup + 1),
                                                  end_value=lr * float(train.min_lr_ratio))
    raise ValueError(f"config.train.schedule: unknown schedule {train.schedule!r}; expected constant or cosine")


def _decay_mask(params: dict) -> dict:
    # No weight decay on norms and biases (1-D parameters).
    return {name: jnp.ndim(value) >= 2 for name, value in params.items()}


def make_optimizer(train) -> optax.GradientTransformation:
    """BAGEL's AdamW (β 0.9/0.95, eps 1e-15, wd 0 by default) after global-norm clipping."""
    chain = []
    if float(train.clip) > 0:
        chain.append(optax.clip_by_global_norm(float(train.clip)))
    chain.append(optax.adamw(learning_rate_schedule(train), b1=float(train.b1), b2=float(train.b2),
                             eps=float(train.eps), weight_decay=float(train.weight_decay), mask=_decay_mask))
    vit_scale = float(train.vit_lr_scale)
    if vit_scale != 1.0:
        # The vision tower's learning rate is lr·vit_lr_scale (docs/experiments.md says why small
        # models trained from scratch need it).
        chain.append(optax.masked(optax.scale(vit_scale), _vit_mask))
    return optax.chain(*chain)


def _vit_mask(params: dict) -> dict:
    vision = nnx.filterlib.to_predicate(VISION_TOWER)
    return {name: vision(tuple(name.split(".")), value) for name, value in params.items()}


def ema_decay(train, step: jax.Array) -> jax.Array:
    """EMA decay at ``step``; with ``ema_warmup`` the decay ramps as ``(1+s)/(10+s)`` so short runs' EMA
    weights are not stuck at initialisation (BAGEL's 0.9999 assumes 100k+ steps)."""
    decay = jnp.asarray(float(train.ema), jnp.float32)
    if train.get("ema_warmup", True):
        step = step.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return decay


def update_ema(ema: dict, params: dict, decay: jax.Array) -> dict:
    """``ema ← decay·ema + (1−decay)·params`` (optax.incremental_update)."""
    return optax.incremental_update(params, ema, 1.0 - decay)
