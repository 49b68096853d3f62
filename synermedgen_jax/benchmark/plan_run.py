"""The ``plan`` command's work once the simulated devices exist: set up, compile at one or two decoder depths,
bring the figures to the full depth, add the memory and FLOPs accounting, print.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping

import jax

from synermedgen_jax import sharding
from synermedgen_jax.accounting.flops import executed_step_flops
from synermedgen_jax.benchmark.plan_compile import compile_plan, sampler_plan
from synermedgen_jax.benchmark.plan_flops import flops_plan
from synermedgen_jax.benchmark.plan_inputs import (
    AbstractTrain,
    PlanSetup,
    abstract_train,
    kernel_stand_ins,
    scale_budget,
    with_layers,
)
from synermedgen_jax.benchmark.plan_memory import memory_plan
from synermedgen_jax.benchmark.plan_report import print_plan, print_setup
from synermedgen_jax.benchmark.report import BenchError, config_hash, environment
from synermedgen_jax.config import ConfigError, load_config
from synermedgen_jax.data.packing import PackBudget
from synermedgen_jax.kernels.attention import IMPLS
from synermedgen_jax.stages import DataStage, Stage

_MEMORY_KEYS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes")
_F32_COPY_KEYS = ("bytes", "converts_of_bf16_bytes", "f32_dot_results_excess_bytes", "f32_gathers_excess_bytes")


def _load(args: argparse.Namespace):
    """The run config of ``--config`` with the ``--attention`` / ``--remat`` overrides, checked plannable."""
    try:
        config = load_config(args.config)
    except (ConfigError, ValueError) as err:
        raise BenchError(str(err)) from None
    if "train" not in config or "model" not in config or "pack" not in config.get("data", {}):
        raise BenchError(f"{args.config}: plan needs a run config (configs/stage1_gau.py, configs/stage2_ucg.py, "
                         "...) with model, data.pack and train")
    if config.stage == Stage.VAE:
        raise BenchError("plan covers the packed MoT stages; the stage-0 VAE run is not planned")
    if args.attention:
        if args.attention not in IMPLS or args.attention in ("pallas", "auto"):
            raise BenchError(f"--attention {args.attention!r}: on simulated CPU devices use reference, xla_dense, "
                             "chunked or pallas_interpret (without --attention the plan compiles the stand-in of "
                             "the kernel the config resolves to on --target)")
        config.model.attention_impl = args.attention
    if args.remat:
        if args.remat not in ("none", "full", "dots"):
            raise BenchError(f"--remat {args.remat!r}: expected none, full or dots")
        config.model.remat = args.remat
    if args.layers and args.layers >= config.model.llm.num_layers:
        raise BenchError(f"--layers {args.layers} must be below the config's {config.model.llm.num_layers} layers")
    return config


def _setup(args: argparse.Namespace, mesh_spec: dict[str, int]) -> PlanSetup:
    config = _load(args)
    target = getattr(args, "target", "") or "gpu"
    # What runs on the target (kernels/dispatch.py), and the CPU-compilable stand-in of each Pallas kernel.
    config.model, kernels = kernel_stand_ins(config.model, target, mesh_spec)
    budget = PackBudget.from_config(config.data.pack)
    if args.tokens:
        budget = scale_budget(budget, args.tokens)
    try:
        mesh = sharding.make_mesh(mesh_spec, jax.devices()[: math.prod(mesh_spec.values())])
    except ValueError as err:
        raise BenchError(str(err)) from None
    return PlanSetup(config, mesh, mesh_spec, budget, args.rows or int(config.train.rows), target, kernels)


def _extrapolate(low: float, high: float, k_low: int, k_high: int, target: int) -> float:
    return high + (high - low) / (k_high - k_low) * (target - k_high)


def _full_depth(by_depth: Mapping[int, float], full_layers: int) -> float:
    """A figure at the full depth: the one compiled there, or linear from the compiles at 1 and K layers."""
    if len(by_depth) == 1:
        return next(iter(by_depth.values()))
    (k_low, low), (k_high, high) = sorted(by_depth.items())
    return _extrapolate(low, high, k_low, k_high, full_layers)


def _full_depth_memory(by_depth: Mapping[int, dict], full_layers: int) -> dict:
    if len(by_depth) == 1:
        return dict(next(iter(by_depth.values())))
    return {k: int(_full_depth({d: m[k] for d, m in by_depth.items()}, full_layers)) for k in _MEMORY_KEYS}


def _full_depth_f32_copies(by_depth: Mapping[int, dict | None], full_layers: int) -> dict | None:
    """The f32 copies of bf16 operands live at the peak (accounting/hlo.f32_copy_bytes), extrapolated like the
    memory."""
    if any(found is None for found in by_depth.values()):
        return None
    if len(by_depth) == 1:
        return next(iter(by_depth.values()))
    high = by_depth[max(by_depth)]
    grown = {k: int(_full_depth({d: f.get(k, 0) for d, f in by_depth.items()}, full_layers))
             for k in _F32_COPY_KEYS if k in high}
    return {**high, **grown, "extrapolated": True}


def _depths(layers: int, full_layers: int) -> list[int]:
    """The decoder depths compiled: the full one, or 1 and ``--layers`` K to extrapolate from."""
    return [1, layers] if layers else [full_layers]


def _method(layers: int, full_layers: int) -> str:
    if layers:
        return (f"extrapolated linearly from compiles with 1 and {layers} of {full_layers} decoder layers "
                f"(--layers {layers})")
    return f"compiled at the full depth ({full_layers} decoder layers)"


def _compile_step(setup: PlanSetup, full: AbstractTrain, depths: list[int]) -> dict[int, dict]:
    """``{depth: compile_plan figures + "analytic_flops"}`` of the train step at each depth."""
    compiles = {}
    for depth in depths:
        abstract = full if depth == setup.full_layers else abstract_train(with_layers(setup.config, depth),
                                                                          setup.mesh, setup.rows, setup.budget)
        print(f"  compiling the train step with {depth} decoder layer(s) ...", flush=True)
        compiles[depth] = compile_plan(abstract)
        compiles[depth]["analytic_flops"] = executed_step_flops(abstract.config, setup.budget, setup.rows)
        print(f"    lowered in {compiles[depth]['lower_s']:.1f} s, compiled in {compiles[depth]['compile_s']:.1f} s")
    return compiles


def _plan_sampler(args: argparse.Namespace, setup: PlanSetup, depths: list[int]) -> dict | str:
    """The sampler's batch on the same mesh, at the same decoder depths as the train step (extrapolated alike)."""
    config, mesh, full_layers = setup.config, setup.mesh, setup.full_layers
    if config.data.stage != DataStage.STAGE2 or not getattr(args, "sampler_steps", 0):
        return "not planned (Stage II configs only; --sampler-steps 0 skips it)"
    slices = args.sampler_slices or sharding.batch_divisor(mesh)
    plans = {}
    for depth in depths:
        print(f"  compiling the sampler ({slices} slices, {args.sampler_steps} steps, CFG) with {depth} decoder "
              "layer(s) ...", flush=True)
        plans[depth] = sampler_plan(with_layers(config, depth) if depth != full_layers else config, mesh, slices,
                                    args.sampler_steps)
    memory = _full_depth_memory({d: p["memory"] for d, p in plans.items()}, full_layers)
    flops = _full_depth({d: p["compiled_flops_per_device"] for d, p in plans.items()}, full_layers)
    last = plans[depths[-1]]
    return {"slices_per_batch": slices, "steps": args.sampler_steps, "image_size": last["image_size"],
            "peak_bytes_per_device": memory["peak_bytes"], "memory_per_device": memory,
            "params_bytes_per_device": plans[full_layers if full_layers in plans else depths[-1]]["params_bytes"],
            "compiled_flops_per_batch": flops * mesh.size,
            "fits_device": bool(memory["peak_bytes"] <= args.device_memory_gb * 1e9),
            "compiles": {str(d): {"memory": p["memory"], "compile_s": p["compile_s"]} for d, p in plans.items()}}


def _setup_fields(args: argparse.Namespace, setup: PlanSetup, method: str) -> dict:
    config, budget = setup.config, setup.budget
    return {"command": "plan", "config": args.config, "config_hash": config_hash(config), "stage": config.stage,
            "variant": config.model.variant, "devices": setup.mesh.size, "mesh": dict(setup.mesh.shape),
            "rows": setup.rows, "tokens_per_row": budget.total_tokens,
            "tokens_per_step": setup.rows * budget.total_tokens,
            "attention_impl": config.model.attention_impl, "remat": config.model.remat, "method": method,
            "target": setup.target, "kernels": setup.kernels}


def _compiles_fields(compiles: dict[int, dict], devices: int) -> dict:
    return {str(d): {"decoder_layers": d, "lower_s": c["lower_s"], "compile_s": c["compile_s"], "memory": c["memory"],
                     "compiled_flops": c["compiled_flops_per_device"] * devices,
                     "xla_cost_analysis_flops": c["xla_flops_per_device"] * devices,
                     "analytic_flops": c["analytic_flops"]["total"]} for d, c in compiles.items()}


def run_plan(args: argparse.Namespace, mesh_spec: dict[str, int]) -> dict:
    """Plans ``args.config`` on the mesh ``mesh_spec`` of simulated devices; prints the plan and returns its
    figures (the ``--json`` payload)."""
    setup = _setup(args, mesh_spec)
    print_setup(args.config, setup, jax.devices()[0].platform)
    t0 = time.perf_counter()
    full = abstract_train(setup.config, setup.mesh, setup.rows, setup.budget)
    depths = _depths(args.layers, setup.full_layers)
    compiles = _compile_step(setup, full, depths)
    last = compiles[depths[-1]]
    memory = _full_depth_memory({d: c["memory"] for d, c in compiles.items()}, setup.full_layers)
    f32_copies = _full_depth_f32_copies({d: c.get("f32_copies") for d, c in compiles.items()}, setup.full_layers)
    per_device = _full_depth({d: c["compiled_flops_per_device"] for d, c in compiles.items()}, setup.full_layers)
    xla_per_device = _full_depth({d: c["xla_flops_per_device"] for d, c in compiles.items()}, setup.full_layers)
    result = {
        **_setup_fields(args, setup, _method(args.layers, setup.full_layers)),
        **memory_plan(setup, full.state, memory, f32_copies, args.device_memory_gb,
                      getattr(args, "devices_per_host", 0)),
        **flops_plan(setup, full.config, per_device, xla_per_device, last["loops"]),
        "largest_buffers": last["largest_buffers"], "buffers_kind": last["buffers_kind"],
        "peak_live": last["peak_live"], "compiles": _compiles_fields(compiles, setup.mesh.size),
        "wall_s": time.perf_counter() - t0, "environment": environment(),
    }
    result["sampler"] = _plan_sampler(args, setup, depths)
    print_plan(result)
    return result
