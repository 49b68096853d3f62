"""The FLOPs side of a plan: the compiled step's FLOPs (XLA's cost analysis with every loop body counted per
trip) next to the analytic count of what the step executes and the model FLOPs of the MFU convention
(accounting/flops.py).
"""

from __future__ import annotations

import math
from typing import Any

from synermedgen_jax.accounting.flops import analytic_step_flops, executed_step_flops
from synermedgen_jax.benchmark.plan_inputs import PlanSetup

COMPILED_FLOPS_METHOD = ("XLA cost_analysis() + (trip count - 1) x the dot/convolution FLOPs of every while-loop "
                         "body with a known trip count, read from the optimised HLO (cost_analysis counts a loop "
                         "body once)")


def flops_plan(setup: PlanSetup, trainer_config: Any, per_device: float, xla_per_device: float,
               loops: list[dict]) -> dict:
    """The plan's FLOPs fields: ``per_device`` / ``xla_per_device`` are the step's compiled FLOPs per device at
    the full depth (loop-corrected / XLA's own), ``loops`` the largest loops of the last compile;
    ``trainer_config`` the config as the trainer resolves it (its ``freeze_und`` decides the executed count)."""
    analytic = executed_step_flops(trainer_config, setup.budget, setup.rows)
    model_flops = analytic_step_flops(setup.config.model, setup.budget, setup.rows)
    compiled_total = per_device * setup.mesh.size
    return {
        "compiled_flops": compiled_total, "compiled_flops_per_device": per_device,
        "xla_cost_analysis_flops": xla_per_device * setup.mesh.size, "compiled_flops_method": COMPILED_FLOPS_METHOD,
        "loops_per_device": loops,
        "analytic_flops": analytic["total"], "analytic_parts": analytic["parts"],
        "analytic_counted_as": analytic["counted_as"],
        "flops_ratio": compiled_total / analytic["total"] if analytic["total"] else math.inf,
        "analytic_model_flops": model_flops["total"], "analytic_model_counted_as": model_flops["counted_as"],
    }
