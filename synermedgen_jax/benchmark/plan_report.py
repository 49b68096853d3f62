"""The ``plan`` command's printed report: the setup before compiling, then the memory table, the FLOPs and the
buffers live at the memory peak, and the sampler's batch.
"""

from __future__ import annotations

from typing import Any

from synermedgen_jax import sharding
from synermedgen_jax.benchmark.plan_inputs import PlanSetup
from synermedgen_jax.benchmark.report import gib, table

_STAND_IN_WHY = {"attention": "online softmax over key chunks, O(T·chunk) temporaries like the kernel's O(T·block), "
                              "no T² array; the kernel's own working set is added below",
                 "flow_matching": "row-wise elementwise code, as the kernels"}


def print_setup(config_path: str, setup: PlanSetup, platform: str) -> None:
    """What is planned: config, mesh, batch, the kernels on the target and their CPU stand-ins, the model."""
    config, mesh, budget, kernels = setup.config, setup.mesh, setup.budget, setup.kernels
    print(f"plan: {config_path} ({config.stage}, model {config.model.variant}), mesh {dict(mesh.shape)} on "
          f"{mesh.size} simulated {platform} devices")
    print(f"  batch: {setup.rows} rows x {budget.total_tokens:,d} tokens (und {budget.und_tokens:,d} + gen "
          f"{budget.gen_tokens:,d}, {budget.vae_images} VAE / {budget.vit_images} ViT images, {budget.ce_tokens} "
          f"CE slots), {setup.rows / sharding.batch_divisor(mesh):g} rows per data shard, grad_accum "
          f"{config.train.grad_accum}")
    print(f"  kernels on {setup.target}: {kernels['summary']}")
    for part, stand_in in kernels["stand_ins"].items():
        print(f"    {part.replace('_', ' ')}: {stand_in['target']} cannot be compiled on CPU; compiling "
              f"'{stand_in['compiled']}' in its place (same memory class: {_STAND_IN_WHY[part]})")
    print(f"  model: attention {config.model.attention_impl}, remat {config.model.remat}, compute "
          f"{config.model.compute_dtype}, params {config.model.param_dtype}")


def print_plan(r: dict[str, Any]) -> None:
    """The plan's figures (the result of ``plan_run.run_plan``) as text."""
    mem = r["memory_per_device"]
    print(f"\nper device ({r['method']}):")
    rows = [{"what": "arguments (state shard + batch shard)", "bytes": gib(mem["argument_bytes"])},
            {"what": "outputs", "bytes": gib(mem["output_bytes"])},
            {"what": "  aliased with arguments (donated state)", "bytes": gib(mem["alias_bytes"])},
            {"what": "temporaries", "bytes": gib(mem["temp_bytes"])},
            {"what": "PEAK (args + outputs - aliased + temps)", "bytes": gib(r["peak_bytes_per_device"])}]
    if r.get("kernel_working_set"):
        ws = r["kernel_working_set"]
        rows += [{"what": f"+ Pallas attention working set on {r['target']} ({ws['backend']}, not in the stand-in)",
                  "bytes": gib(ws["total"])},
                 {"what": "PER DEVICE (peak + kernel working set)", "bytes": gib(r["per_device_bytes"])}]
    if r.get("f32_copies") and r["f32_copies"].get("bytes"):
        rows += [{"what": "  of which f32 copies of bf16 operands (XLA:CPU only)",
                  "bytes": gib(r["f32_copies"]["bytes"])},
                 {"what": "ACCELERATOR-EQUIVALENT (per device - f32 copies)",
                  "bytes": gib(r["accelerator_equivalent_peak_bytes_per_device"])}]
    host = r["host_bytes_per_process"]
    rows += [{"what": f"host per process ({host['devices_per_process']} devices each): init (state born on device)",
              "bytes": gib(host["init"])},
             {"what": "host per process: restore (this process's shards, all staged at once)",
              "bytes": gib(host["restore"])},
             {"what": "  (before the state was born sharded: the whole state, on every host)",
              "bytes": gib(host["whole_state"])}]
    rows += [{"what": "theoretical minimum", "bytes": gib(r["min_bytes_per_device"])}]
    rows += [{"what": f"  {k}", "bytes": gib(v)} for k, v in r["min_parts_per_device"].items()]
    rows += [{"what": f"activation estimate (remat {r['remat']}, attention {r['attention_impl']})",
              "bytes": gib(r["activation_estimate_bytes_per_device"])},
             {"what": "target: 1.5 x minimum + activations", "bytes": gib(r["target_bytes_per_device"])}]
    print(table(rows, [("what", "memory"), ("bytes", "per device")]))
    for note in r.get("notes", []):
        print(f"note: {note}")
    print(f"peak / minimum = {r['peak_over_min']:.2f}; within target: {r['within_target']}; fits "
          f"{r['device_memory_bytes'] / 1e9:g} GB: {r['fits_device']} (per device {r['per_device_bytes'] / 1e9:.1f} GB"
          f", accelerator-equivalent {r['accelerator_equivalent_peak_bytes_per_device'] / 1e9:.1f} GB)")
    if r.get("f32_copies") and r["f32_copies"].get("bytes"):
        print(f"  f32 copies = {r['f32_copies']['method']}")
    print(f"\nFLOPs per step: compiled {r['compiled_flops']:.4g} ({r['compiled_flops_per_device']:.4g} per device x "
          f"{r['devices']}), analytic {r['analytic_flops']:.4g}, ratio {r['flops_ratio']:.3f}")
    print(f"  compiled = {r['compiled_flops_method']}; XLA's own figure: {r['xla_cost_analysis_flops']:.4g}")
    for loop in r["loops_per_device"]:
        print(f"    loop: {loop['trips']} trips x {loop['body_flops']:.4g} FLOPs per device")
    print(f"  analytic = {r['analytic_counted_as']}")
    for name, value in r["analytic_parts"].items():
        print(f"    {name:26} {value:.4g}")
    print(f"  model FLOPs (MFU convention, fwd + 2x bwd of everything, no recomputation): "
          f"{r['analytic_model_flops']:.4g}")
    where = r["peak_live"]
    title = (f"buffers live at the memory peak ({where['count']} values, {gib(where['bytes'])} incl. arguments)"
             if where else "largest values of the compiled per-device HLO (outside fusions)")
    print(f"\n{title}:")
    print(table([{"name": b["name"], "dtype": b.get("dtype", ""), "shape": str(b.get("shape", "")),
                  "size": gib(b["bytes"]), "op": _short_op(b.get("op", ""))} for b in r["largest_buffers"]],
                [("name", "value"), ("dtype", "dtype"), ("shape", "shape"), ("size", "size"), ("op", "made by")]))
    sampler = r["sampler"]
    if isinstance(sampler, str):
        print(f"\nsampler: {sampler}")
    else:
        mem = sampler["memory_per_device"]
        print(f"\nsampler (one batch of {sampler['slices_per_batch']} slices {sampler['image_size']}, "
              f"{sampler['steps']} steps, 3-pass CFG, KV cache): peak {gib(sampler['peak_bytes_per_device'])} per "
              f"device (arguments {gib(mem['argument_bytes'])}, temporaries {gib(mem['temp_bytes'])}); fits: "
              f"{sampler['fits_device']}; compiled FLOPs per batch {sampler['compiled_flops_per_batch']:.4g}")
    print(f"planned in {r['wall_s']:.1f} s")


def _short_op(op: str, width: int = 60) -> str:
    """The tail of a JAX name stack (the op and its nearest scopes)."""
    return op if len(op) <= width else "…" + op[-(width - 1):]
