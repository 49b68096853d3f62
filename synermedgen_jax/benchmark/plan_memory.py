"""The memory side of a plan: the compiled peak per device next to what any implementation must hold (the
theoretical minimum), the activations the remat policy keeps, the Pallas kernel's working set on the target, the
f32 copies only XLA:CPU makes, and the host memory per process (accounting/memory.py for the analytic figures).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from synermedgen_jax.accounting.memory import (
    activation_estimate,
    host_bytes_per_process,
    kernel_working_set,
    theoretical_minimum,
)
from synermedgen_jax.benchmark.plan_inputs import PlanSetup
from synermedgen_jax.training.optim import trainable_groups

# What a reader of a CPU plan must know before comparing it with an accelerator.
NOTES = ["XLA:CPU computes bf16 dots in f32: it converts bf16 dot operands to f32 copies (FSDP weights may be "
         "gathered in f32) and keeps f32 dot results beside the bf16 ones, so its temporaries exceed an "
         "accelerator's for the same program; the copies live at the peak are counted ('of which f32 copies') "
         "and subtracted in the accelerator-equivalent figure."]


def _kernel_working_set(setup: PlanSetup) -> dict | None:
    """The Pallas attention kernel's device-memory working set, where a stand-in was compiled in its place."""
    if "attention" not in setup.kernels["stand_ins"]:
        return None
    return kernel_working_set(setup.config.model, setup.budget, setup.rows_per_device, setup.mesh_spec,
                              setup.target, vit_trained="und" in trainable_groups(setup.config))


def memory_plan(setup: PlanSetup, state: Any, memory: Mapping[str, int], f32_copies: dict | None,
                device_memory_gb: float, devices_per_host: int) -> dict:
    """The plan's memory fields: ``memory`` is the step's compiled figures per device at the full depth,
    ``f32_copies`` XLA:CPU's f32 copies live at its peak, ``state`` the abstract sharded train state."""
    config = setup.config
    minimum = theoretical_minimum(state)
    per_host = devices_per_host or (4 if setup.target == "tpu" else 8)
    host = host_bytes_per_process(state, min(per_host, setup.mesh.size))
    activations = activation_estimate(config.model, setup.budget, setup.rows_per_device)
    peak, floor = memory["peak_bytes"], minimum["total"]
    limit = device_memory_gb * 1e9
    budget_bytes = 1.5 * floor + activations["total"]
    working_set = _kernel_working_set(setup)
    kernel_bytes = working_set["total"] if working_set else 0
    device_bytes = peak + kernel_bytes
    accelerator = device_bytes - (f32_copies["bytes"] if f32_copies else 0)
    return {
        "kernel_working_set": working_set, "kernel_working_set_bytes_per_device": kernel_bytes,
        "per_device_bytes": device_bytes, "f32_copies": f32_copies,
        "f32_copy_bytes_per_device": f32_copies["bytes"] if f32_copies else None,
        "accelerator_equivalent_peak_bytes_per_device": accelerator,
        "fits_device_accelerator_equivalent": bool(accelerator <= limit),
        "scheduler": "XLA:CPU memory-minimising scheduler (plan_compile.CPU_PLAN_OPTIONS)",
        "notes": NOTES if config.model.compute_dtype == "bfloat16" else [],
        "peak_bytes_per_device": peak, "min_bytes_per_device": floor, "host_bytes_per_process": host,
        "peak_over_min": peak / floor if floor else math.inf,
        "activation_estimate_bytes_per_device": activations["total"],
        "target_bytes_per_device": int(budget_bytes), "within_target": bool(device_bytes <= budget_bytes),
        "device_memory_bytes": int(limit), "fits_device": bool(device_bytes <= limit),
        "memory_per_device": dict(memory), "min_parts_per_device": minimum["parts"],
    }
