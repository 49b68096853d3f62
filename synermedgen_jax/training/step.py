"""Train state, its shardings, and the jitted train / eval steps.

The train state is a plain pytree (so Orbax, ``jax.jit`` shardings and donation treat it uniformly)::

    {"step": int32 [], "params": {name: array} (trained), "frozen": {name: array} (frozen params and tables),
     "opt": optax state of "params", "ema": {name: array} (EMA of "params"; {} when train.ema == 0),
     "rng": uint32 [2] (the run's base key; step keys are fold_in(rng, step))}

Names are the dotted nnx paths (``language_model.layers.0.self_attn.q_proj.kernel``). ``Codec`` turns the two
flat dicts back into a model inside the traced step. An *objective* (``objective.UnifiedObjective`` for
Stages I/II, ``vae_stage.VaeObjective`` for stage 0) owns the loss; the step adds gradient accumulation,
clipping, AdamW, the EMA and the non-finite guard.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from synermedgen_jax import sharding
from synermedgen_jax.training import optim


def path_name(path: tuple) -> str:
    return ".".join(str(part) for part in path)


class Codec:
    """Flat ``{name: array}`` dicts <-> an nnx model of one fixed structure.

    Built from an abstract model (``nnx.eval_shape``): it keeps the graph, the variable types and their
    metadata, never an array. The flat dotted names are the checkpoint keys (the Orbax train state,
    ``init_from`` / ``vae_from`` reads, the BAGEL port in port/): an ``nnx.State`` tree would nest them and
    change the keys on disk, so the state stays flat and only this class maps names to variables."""

    def __init__(self, model: nnx.Module, is_trainable: Callable[[tuple, nnx.Variable], bool]):
        """``is_trainable``: an nnx filter predicate over ``(path, variable)`` (``optim.trainable_predicate``);
        only ``nnx.Param`` variables can be trainable."""
        self.graphdef, state = nnx.split(model)
        self.templates: dict[str, tuple[tuple, nnx.Variable]] = {}
        self.axes: dict[str, tuple | None] = {}
        self.trainable: list[str] = []
        self.frozen: list[str] = []
        for path, variable in nnx.to_flat_state(state):
            name = path_name(path)
            self.templates[name] = (path, variable)
            self.axes[name] = variable.get_metadata().get("logical_axes")
            trainable = isinstance(variable, nnx.Param) and is_trainable(path, variable)
            (self.trainable if trainable else self.frozen).append(name)
        if not self.trainable:
            raise ValueError("the stage trains no parameter of this model (check config.stage)")

    def split_values(self, model: nnx.Module) -> tuple[dict, dict]:
        flat = {path_name(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
        return {n: flat[n] for n in self.trainable}, {n: flat[n] for n in self.frozen}

    def model(self, params: Mapping[str, Any], frozen: Mapping[str, Any]) -> nnx.Module:
        values = {**frozen, **params}
        flat = [(path, variable.replace(values[name])) for name, (path, variable) in self.templates.items()]
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))

    def shardings(self, names: list[str], values: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
        return {n: NamedSharding(mesh, sharding.logical_spec(self.axes[n], np.shape(values[n]), mesh)) for n in names}


class Objective(Protocol):
    """The loss of a stage. ``prepare`` runs once per global batch outside the gradient and turns the host's
    ``{name: array}`` batch into everything the loss reads (frozen encoders, noise draws; a pytree whose
    leaves all lead with the batch axis, which micro-batching splits); ``loss`` runs per micro-batch and
    returns a loss already normalised by the *global* totals, so summing micro-batch gradients gives exactly
    the full-batch gradient."""

    def prepare(self, model: nnx.Module, batch: dict, key: jax.Array) -> Any: ...
    def totals(self, inputs: Any) -> dict: ...
    def loss(self, model: nnx.Module, micro: Any, totals: dict) -> tuple[jax.Array, dict]: ...
    def metrics(self, sums: dict, totals: dict) -> dict: ...


# ----------------------------------------------------------------------------------------------------------
def init_state(codec: Codec, model: nnx.Module, tx: optax.GradientTransformation, train) -> dict:
    """A fresh train state from ``model`` (traceable: :func:`abstract_state` and :func:`create_state` trace it)."""
    params, frozen = codec.split_values(model)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "frozen": frozen,
        "opt": tx.init(params),
        "ema": {n: jnp.array(v, copy=True) for n, v in params.items()} if float(train.ema) > 0 else {},
        "rng": jax.random.key_data(jax.random.PRNGKey(int(train.seed))),
    }


def abstract_state(codec: Codec, make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, train
                   ) -> dict:
    """The train state's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves); nothing is allocated."""
    return jax.eval_shape(lambda: init_state(codec, make_model(), tx, train))


def plan_state(codec: Codec, make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, train,
               mesh: Mesh) -> tuple[dict, dict]:
    """``(abstract state, its shardings on mesh)``: everything known about the state before it exists."""
    abstract = abstract_state(codec, make_model, tx, train)
    return abstract, state_shardings(codec, abstract, tx, mesh)


def create_state(codec: Codec, make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, train,
                 shardings: dict) -> dict:
    """A fresh train state born sharded: one jitted init whose outputs have ``shardings``, so each device
    materialises only its own shards (random parameters are drawn per shard) and no host or device ever holds
    the whole state."""
    return jax.jit(lambda: init_state(codec, make_model(), tx, train), out_shardings=shardings)()


def with_shardings(abstract: dict, shardings: dict) -> dict:
    """``abstract`` with each leaf's sharding set (the restore target of a sharded checkpoint read)."""
    return jax.tree.map(lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), abstract, shardings)


def state_shardings(codec: Codec, state: dict, tx: optax.GradientTransformation, mesh: Mesh) -> dict:
    """NamedShardings for every leaf of ``state`` (params by their logical axes; optimizer moments like
    their parameters; scalars replicated)."""
    params = codec.shardings(list(state["params"]), state["params"], mesh)
    rep = sharding.replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, state["opt"], params,
                                transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))
    return {"step": rep, "params": params, "frozen": codec.shardings(list(state["frozen"]), state["frozen"], mesh),
            "opt": opt, "ema": {n: params[n] for n in state["ema"]}, "rng": rep}


def _split_micro(tree: dict, accum: int) -> dict:
    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {accum} micro-batches")
        return x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
    return jax.tree.map(split, tree)


def make_train_step(codec: Codec, tx: optax.GradientTransformation, objective: Objective, train
                    ) -> Callable[[dict, dict], tuple[dict, dict]]:
    """``(state, batch) -> (state, metrics)`` (not jitted; see :func:`jit_train_step`)."""
    accum = int(train.grad_accum)
    schedule = optim.learning_rate_schedule(train)
    skip_bad = train.nan_policy == "skip"

    def micro_loss(params, frozen, micro, totals):
        return objective.loss(codec.model(params, frozen), micro, totals)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params, frozen = state["params"], state["frozen"]
        model = codec.model(params, frozen)
        full = jax.lax.stop_gradient(objective.prepare(model, batch, key))
        totals = objective.totals(full)
        if accum == 1:
            (_, sums), grads = grad_fn(params, frozen, full, totals)
        else:
            def body(carry, micro):
                (_, sums), grads = grad_fn(params, frozen, micro, totals)
                return jax.tree.map(jnp.add, carry, (sums, grads)), None
            micro_all = _split_micro(full, accum)
            zero_sums = jax.eval_shape(lambda: grad_fn(params, frozen, jax.tree.map(lambda x: x[0], micro_all),
                                                       totals)[0][1])
            zero = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums),
                    jax.tree.map(jnp.zeros_like, params))
            (sums, grads), _ = jax.lax.scan(body, zero, micro_all)
        metrics = objective.metrics(sums, totals)
        grad_norm = optax.global_norm(grads)
        updates, opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        new_ema = state["ema"]
        if new_ema:
            new_ema = optim.update_ema(new_ema, new_params, optim.ema_decay(train, state["step"]))
        new_state = {**state, "step": state["step"] + 1, "params": new_params, "opt": opt, "ema": new_ema}
        if skip_bad:
            # Keep the old parameters/optimizer/EMA on a non-finite step; the step counter still advances.
            kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                {k: new_state[k] for k in ("params", "opt", "ema")},
                                {k: state[k] for k in ("params", "opt", "ema")})
            new_state.update(kept)
        metrics.update(grad_norm=grad_norm, lr=schedule(state["step"]), finite=finite.astype(jnp.float32))
        return new_state, metrics

    return step


def jit_train_step(step_fn, state_sh: dict, batch_sh: dict, mesh: Mesh):
    """Jitted with explicit in/out shardings; the state argument is donated. Tracing happens with the mesh's
    activation sharding installed, so the model's layer-boundary constraints keep rows split over the batch
    axes."""
    return jax.jit(sharding.traced_on_mesh(step_fn, mesh), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)),
                   donate_argnums=0)


# ----------------------------------------------------------------------------------------------------------
def make_eval_step(codec: Codec, objective, *, use_ema: bool = True):
    """``(state, batch) -> metrics`` with token accuracy, answer exact-match sums and losses
    (``objective.UnifiedObjective.evaluate`` on the whole batch; the velocity MSE by its jnp reference)."""

    def step(state: dict, batch: dict) -> dict:
        params = state["ema"] if (use_ema and state["ema"]) else state["params"]
        model = codec.model(params, state["frozen"])
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 2**31 - 1)
        return objective.evaluate(model, objective.prepare(model, batch, key), flow_impl="reference")

    return step
