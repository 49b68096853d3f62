"""Compiling what a plan lowers (the train step, one sampler batch) for simulated CPU devices and reading XLA's
figures of the result through the one HLO reader (accounting/hlo.py): per-device memory, FLOPs with every loop
body counted per trip, the buffers live at the memory peak and the f32 copies XLA:CPU adds.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from flax import nnx

from synermedgen_jax.accounting import hlo
from synermedgen_jax.accounting.memory import per_device_bytes
from synermedgen_jax.benchmark.plan_inputs import AbstractTrain
from synermedgen_jax.benchmark.report import BenchError
from synermedgen_jax.data.packing import SpecialTokens
from synermedgen_jax.inference.sampler import Sampler, SamplerConfig
from synermedgen_jax.modeling.synermedgen import build_model

# XLA:CPU's default scheduler orders for thread concurrency and starts independent work (weight all-gathers,
# recomputations) as early as it can, which holds buffers far longer than an accelerator's memory-aware
# scheduler would (the 7B plan measured 28 GB of temporaries at 2 layers with it, 20 GB without). Plans
# compile with the memory-minimising list scheduler instead. (The DebugOptions field is the enum below; the
# XLA_FLAGS spelling --xla_cpu_enable_concurrency_optimized_scheduler=false is an alias that only the flag parser
# knows, and as a compile option it silently does nothing.)
CPU_PLAN_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(platform: str, dump_dir: str | None = None) -> dict:
    """XLA options the plan compiles with on ``platform``; ``dump_dir`` also dumps the optimised module with
    its buffer live ranges (read by :func:`accounting.hlo.peak_live_buffers`)."""
    options = dict(CPU_PLAN_OPTIONS) if platform == "cpu" else {}
    if dump_dir:
        options.update(xla_dump_to=dump_dir, xla_dump_hlo_pass_re="^$")  # final module only, no pass dumps
    return options


def memory_figures(compiled: Any) -> dict:
    """:func:`accounting.hlo.memory_figures`, an error where the backend gives none (a plan is about memory)."""
    figures = hlo.memory_figures(compiled)
    if figures is None:
        raise BenchError("this backend's compiled executable gives no memory analysis")
    return figures


def _f32_copies(config: Any, live_text: str, hlo_text: str) -> dict | None:
    """The f32 copies of bf16 operands live at the peak (``None`` without a live-range dump)."""
    if not live_text:
        return None
    if str(config.model.compute_dtype) == "bfloat16":
        return hlo.f32_copy_bytes(live_text, hlo_text)
    return {"bytes": 0, "values": 0, "method": "compute in float32: no bf16 operand to copy"}


def compile_plan(abstract: AbstractTrain) -> dict:
    """Lowers and compiles the step; memory, FLOPs (XLA's and loop-corrected), the buffers live at the memory
    peak (largest values when XLA's dump is unavailable) and the wall time of each phase."""
    t0 = time.perf_counter()
    lowered = abstract.step.lower(abstract.state, abstract.batch)
    t1 = time.perf_counter()
    platform = abstract.mesh.devices.flat[0].platform
    with tempfile.TemporaryDirectory(prefix="smg_plan_") as dump_dir:
        compiled = lowered.compile(compiler_options=compiler_options(platform, dump_dir))
        t2 = time.perf_counter()
        live_text = hlo.live_range_text(dump_dir)
    memory = memory_figures(compiled)
    hlo_text = compiled.as_text()
    xla_flops, loop_extra, loops = hlo.loop_corrected_flops(compiled, hlo_text)
    try:
        peak = hlo.peak_live_buffers(live_text, hlo_text) if live_text else None
        f32_copies = _f32_copies(abstract.config, live_text, hlo_text)
    except ValueError:
        peak = f32_copies = None
    buffers = peak["buffers"] if peak else hlo.largest_buffers(hlo_text)
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "memory": memory,
            "compiled_flops_per_device": xla_flops + loop_extra, "xla_flops_per_device": xla_flops,
            "loop_flops_added_per_device": loop_extra,
            "loops": sorted(loops, key=lambda loop: -loop["body_flops"] * (loop["trips"] or 1))[:6],
            "peak_live": {k: v for k, v in peak.items() if k != "buffers"} if peak else None,
            "largest_buffers": buffers, "buffers_kind": "live at the peak" if peak else "largest values",
            "f32_copies": f32_copies}


def sampler_plan(config: Any, mesh: Any, slices: int, steps: int, instruction_tokens: int = 32) -> dict:
    """Lowers and compiles one batch of the CFG flow-matching sampler (inference/sampler.py: KV-cache prefill of
    the three context packs, ``steps`` Euler steps, VAE decode) on ``mesh`` with abstract parameters placed by
    the sharding rules; ``slices`` per batch (a multiple of data × fsdp). Returns the per-device memory figures
    and XLA's FLOPs (loop bodies counted once per trip, as for the train step)."""
    pack = config.data.pack
    model = nnx.eval_shape(lambda: build_model(config.model, int(config.train.seed)))
    sampler = Sampler(model, SpecialTokens(1, 2, 3, 4), tuple(pack.image_size), tuple(pack.vit_image_size),
                      SamplerConfig(num_steps=steps), mesh=mesh)
    instruction = [5 + i % max(1, config.model.llm.vocab_size - 5) for i in range(instruction_tokens)]
    t0 = time.perf_counter()
    try:
        lowered = sampler.lower(slices, instruction)
    except ValueError as err:
        raise BenchError(f"sampler plan: {err}") from None
    compiled = lowered.compile(compiler_options=compiler_options(mesh.devices.flat[0].platform))
    xla_flops, loop_extra, _ = hlo.loop_corrected_flops(compiled)
    return {"slices_per_batch": slices, "steps": steps, "image_size": list(pack.image_size),
            "memory": memory_figures(compiled), "params_bytes": per_device_bytes(sampler.state),
            "compiled_flops_per_device": xla_flops + loop_extra, "compile_s": time.perf_counter() - t0}
