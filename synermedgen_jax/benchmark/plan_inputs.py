"""What a plan compiles: the mesh from ``--mesh``, the pack budget (``--tokens``), the config's kernels resolved
for the target with a CPU stand-in for each Pallas kernel, and the trainer's state / batch / step as abstract
sharded values. Nothing is allocated: parameters, optimizer state and batches are ``jax.ShapeDtypeStruct`` with
their ``NamedSharding``.

The state, shardings and step come from training/step.py (``init_state`` under ``jax.eval_shape``,
``state_shardings``, ``make_train_step``, ``jit_train_step``) exactly as the trainer builds them; the batch
shapes come from a real empty pack row of the config's budget (data/packing.py).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax

from synermedgen_jax import sharding
from synermedgen_jax.benchmark.report import BenchError
from synermedgen_jax.data.packing import PackBudget, PackBuilder, SpecialTokens, empty_row
from synermedgen_jax.kernels.dispatch import pallas_backend, resolve_kernels
from synermedgen_jax.sharding import MESH_AXES
from synermedgen_jax.training import optim
from synermedgen_jax.training import step as step_lib
from synermedgen_jax.training.loop import build, resolve_config


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=1,fsdp=64,tensor=1"`` → ``{"data": 1, "fsdp": 64, "tensor": 1}`` (missing axes are 1, one axis
    may be -1 = fill the devices)."""
    out = {axis: 1 for axis in MESH_AXES}
    seen = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise BenchError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in {MESH_AXES}, "
                             f"got {part!r}")
        if name in seen:
            raise BenchError(f"--mesh {text!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise BenchError(f"--mesh {text!r}: size of {name!r} is not an integer: {value!r}") from None
        if size == 0 or size < -1:
            raise BenchError(f"--mesh {text!r}: size of {name!r} must be positive or -1, got {size}")
        seen.add(name)
        out[name] = size
    if not seen:
        raise BenchError(f"--mesh {text!r}: no axis given (e.g. data=1,fsdp=8,tensor=1)")
    if list(out.values()).count(-1) > 1:
        raise BenchError(f"--mesh {text!r}: at most one axis may be -1")
    return out


def resolve_mesh(spec: Mapping[str, int], devices: int) -> dict[str, int]:
    known = math.prod(v for v in spec.values() if v != -1)
    sizes = dict(spec)
    for axis, value in spec.items():
        if value == -1:
            if devices % known:
                raise BenchError(f"--mesh: {devices} devices are not divisible by the fixed axes ({known})")
            sizes[axis] = devices // known
    if math.prod(sizes.values()) != devices:
        raise BenchError(f"--mesh {','.join(f'{k}={v}' for k, v in sizes.items())} needs "
                         f"{math.prod(sizes.values())} devices, --devices is {devices}")
    return sizes


def scale_budget(budget: PackBudget, tokens: int) -> PackBudget:
    """The pack budget scaled to ``tokens`` per row: every capacity (tokens, images, patches, CE slots) by the
    same factor, image sizes kept; generation tokens stay a whole number of VAE slots."""
    factor = tokens / budget.total_tokens
    if factor <= 0:
        raise BenchError(f"--tokens must be positive, got {tokens}")
    per_slot = budget.gen_tokens // budget.vae_images if budget.vae_images else 0
    vae_images = max(1, round(budget.vae_images * factor)) if budget.vae_images else 0
    gen = vae_images * per_slot if per_slot else round(budget.gen_tokens * factor)
    und = tokens - gen
    if und <= 0:
        raise BenchError(f"--tokens {tokens} leaves no understanding tokens after {gen} generation tokens")
    vit_images = max(1, round(budget.vit_images * factor)) if budget.vit_images else 0
    return dataclasses.replace(budget, und_tokens=und, gen_tokens=gen, vae_images=vae_images,
                               vit_patches=round(budget.vit_patches * factor), vit_images=vit_images,
                               ce_tokens=max(1, round(budget.ce_tokens * factor)) if budget.ce_tokens else 0)


# The stand-in a CPU plan compiles for a Pallas kernel of the target: the jnp path of the same memory class.
# Attention: ``chunked`` (online softmax over key chunks, O(T·chunk) temporaries like the kernel's O(T·block),
# never a T² array); flow matching: the jnp reference (row-wise elementwise code, like the kernels').
KERNEL_STAND_INS = {"attention": "chunked", "flow_matching": "reference"}
TARGETS = ("gpu", "tpu")


def kernel_stand_ins(model_config: Any, target: str, mesh_shape: Mapping[str, int] | None = None):
    """``(model config to compile on CPU, description)``: ``model_config`` resolved for ``target``
    (kernels/dispatch.py); every Pallas kernel it resolves to is replaced by its stand-in. The description says
    what runs on the target and what was compiled in its place."""
    if target not in TARGETS:
        raise BenchError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    resolved = resolve_kernels(model_config, target, mesh_shape=dict(mesh_shape or {}))
    compiled = resolved.copy_and_resolve_references()
    stand_ins = {}
    for part, field in (("attention", "attention_impl"), ("flow_matching", "flow_matching_impl")):
        impl = str(resolved[field])
        if impl == "pallas":
            compiled[field] = KERNEL_STAND_INS[part]
            stand_ins[part] = {"target": f"pallas/{pallas_backend(target)}", "compiled": KERNEL_STAND_INS[part]}
    return compiled, {"target": target, "summary": str(resolved.kernels.summary),
                      "requested": {"attention": str(resolved.kernels.attention_requested),
                                    "flow_matching": str(resolved.kernels.flow_matching_requested)},
                      "resolved": {"attention": str(resolved.attention_impl),
                                   "flow_matching": str(resolved.flow_matching_impl)},
                      "stand_ins": stand_ins}


@dataclasses.dataclass
class AbstractTrain:
    """Everything needed to lower the sharded train step without allocating."""

    config: Any
    mesh: Any
    budget: Any
    rows: int
    state: dict  # ShapeDtypeStructs with shardings
    batch: dict
    shardings: dict
    step: Any  # the jitted step (jit_train_step)
    codec: Any


def abstract_train(config: Any, mesh: Any, rows: int, budget: PackBudget | None = None) -> AbstractTrain:
    """The trainer's state / batch / step for ``config`` on ``mesh`` as abstract sharded values.

    Composes training/step.py's functions; ``init_state`` runs under ``jax.eval_shape`` on a model built
    inside the trace, so no parameter or optimizer moment is ever materialised.
    """
    config = resolve_config(config)
    budget = budget or PackBudget.from_config(config.data.pack)
    divisor = sharding.batch_divisor(mesh)
    accum = int(config.train.grad_accum)
    if rows % (divisor * accum):
        raise BenchError(f"rows={rows} must be a multiple of data×fsdp ({divisor}) × grad_accum ({accum})")
    make_model, codec, objective = build(config)  # the trainer's own plan of the state: nothing allocated
    tx = optim.make_optimizer(config.train)
    state, state_sh = step_lib.plan_state(codec, make_model, tx, config.train, mesh)
    # One real (empty) pack row gives the exact keys, shapes and dtypes the data pipeline produces.
    row = empty_row(PackBuilder(budget, SpecialTokens(1, 2, 3, 4), config.model))
    batch = {k: jax.ShapeDtypeStruct((rows, *v.shape), v.dtype) for k, v in row.items()}
    batch_sh = sharding.batch_sharding(mesh, batch)
    state_abs = step_lib.with_shardings(state, state_sh)
    batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch.items()}
    step = step_lib.jit_train_step(step_lib.make_train_step(codec, tx, objective, config.train), state_sh,
                                   batch_sh, mesh)
    return AbstractTrain(config, mesh, budget, rows, state_abs, batch_abs, state_sh, step, codec)


@dataclasses.dataclass(frozen=True)
class PlanSetup:
    """What one plan is of: the run config (kernels resolved for ``target``, each Pallas kernel replaced by its
    CPU stand-in), the mesh of simulated devices and the global batch of ``rows`` packs of ``budget``."""

    config: Any
    mesh: Any
    mesh_spec: dict[str, int]  # as given (--mesh resolved against --devices)
    budget: PackBudget
    rows: int
    target: str
    kernels: dict  # kernel_stand_ins' description

    @property
    def full_layers(self) -> int:
        return int(self.config.model.llm.num_layers)

    @property
    def rows_per_device(self) -> float:
        """Pack rows one device runs per micro-batch (rows over data × fsdp, over grad_accum)."""
        return self.rows / sharding.batch_divisor(self.mesh) / int(self.config.train.grad_accum)


def with_layers(config: Any, layers: int) -> Any:
    """A copy of run config ``config`` with ``layers`` decoder layers (the compiles ``--layers`` extrapolates)."""
    config = copy.deepcopy(config)
    config.model.llm.num_layers = layers
    return config
