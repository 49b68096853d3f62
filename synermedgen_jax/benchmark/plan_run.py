"""The ``plan`` command's work once the simulated devices exist: build, compile, extrapolate, print."""

from __future__ import annotations

import copy
import math
import time

from synermedgen_jax.benchmark import plan as plan_lib
from synermedgen_jax.benchmark.report import BenchError, config_hash, environment, gib, table

_MEMORY_KEYS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes")


def _load(args):
    from synermedgen_jax.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except (ConfigError, ValueError) as err:
        raise BenchError(str(err)) from None
    if "train" not in config or "model" not in config or "pack" not in config.get("data", {}):
        raise BenchError(f"{args.config}: plan needs a run config (configs/stage1_gau.py, configs/stage2_ucg.py, "
                         "...) with model, data.pack and train")
    if config.stage == "vae":
        raise BenchError("plan covers the packed MoT stages; the stage-0 VAE run is not planned")
    if args.attention:
        from synermedgen_jax.kernels.attention import IMPLS

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


def _with_layers(config, layers: int):
    config = copy.deepcopy(config)
    config.model.llm.num_layers = layers
    return config


def _extrapolate(low: float, high: float, k_low: int, k_high: int, target: int) -> float:
    return high + (high - low) / (k_high - k_low) * (target - k_high)


def run_plan(args, mesh_spec: dict[str, int]) -> dict:
    import jax

    from synermedgen_jax import sharding
    from synermedgen_jax.data.packing import PackBudget

    config = _load(args)
    target = getattr(args, "target", "") or "gpu"
    # What runs on the target (kernels/dispatch.py), and the CPU-compilable stand-in of each Pallas kernel.
    config.model, kernels = plan_lib.kernel_stand_ins(config.model, target, mesh_spec)
    budget = PackBudget.from_config(config.data.pack)
    if args.tokens:
        budget = plan_lib.scale_budget(budget, args.tokens)
    rows = args.rows or int(config.train.rows)
    try:
        mesh = sharding.make_mesh(mesh_spec, jax.devices()[: math.prod(mesh_spec.values())])
    except ValueError as err:
        raise BenchError(str(err)) from None
    divisor = sharding.batch_divisor(mesh)
    full_layers = int(config.model.llm.num_layers)
    print(f"plan: {args.config} ({config.stage}, model {config.model.variant}), mesh {dict(mesh.shape)} on "
          f"{mesh.size} simulated {jax.devices()[0].platform} devices")
    print(f"  batch: {rows} rows x {budget.total_tokens:,d} tokens (und {budget.und_tokens:,d} + gen "
          f"{budget.gen_tokens:,d}, {budget.vae_images} VAE / {budget.vit_images} ViT images, {budget.ce_tokens} "
          f"CE slots), {rows / divisor:g} rows per data shard, grad_accum {config.train.grad_accum}")
    print(f"  kernels on {target}: {kernels['summary']}")
    for part, stand_in in kernels["stand_ins"].items():
        print(f"    {part.replace('_', ' ')}: {stand_in['target']} cannot be compiled on CPU; compiling "
              f"'{stand_in['compiled']}' in its place (same memory class: {_STAND_IN_WHY[part]})")
    print(f"  model: attention {config.model.attention_impl}, remat {config.model.remat}, compute "
          f"{config.model.compute_dtype}, params {config.model.param_dtype}")

    t0 = time.perf_counter()
    full = plan_lib.abstract_train(config, mesh, rows, budget)
    minimum = plan_lib.theoretical_minimum(full)
    per_host = getattr(args, "devices_per_host", 0) or (4 if target == "tpu" else 8)
    host = plan_lib.host_bytes_per_process(full.state, min(per_host, mesh.size))
    depths = [1, args.layers] if args.layers else [full_layers]
    compiles = {}
    for depth in depths:
        abstract = full if depth == full_layers else plan_lib.abstract_train(_with_layers(config, depth), mesh,
                                                                             rows, budget)
        print(f"  compiling the train step with {depth} decoder layer(s) ...", flush=True)
        compiles[depth] = plan_lib.compile_plan(abstract)
        compiles[depth]["analytic_flops"] = plan_lib.executed_step_flops(abstract.config, budget, rows)
        print(f"    lowered in {compiles[depth]['lower_s']:.1f} s, compiled in {compiles[depth]['compile_s']:.1f} s")

    if args.layers:
        lo, hi = compiles[1], compiles[args.layers]
        grow = lambda low, high: _extrapolate(low, high, 1, args.layers, full_layers)  # noqa: E731
        memory = {k: int(grow(lo["memory"][k], hi["memory"][k])) for k in _MEMORY_KEYS}
        per_device = grow(lo["compiled_flops_per_device"], hi["compiled_flops_per_device"])
        xla_per_device = grow(lo["xla_flops_per_device"], hi["xla_flops_per_device"])
        method = (f"extrapolated linearly from compiles with 1 and {args.layers} of {full_layers} decoder layers "
                  f"(--layers {args.layers})")
        last = hi
    else:
        last = compiles[full_layers]
        memory = dict(last["memory"])
        per_device, xla_per_device = last["compiled_flops_per_device"], last["xla_flops_per_device"]
        method = f"compiled at the full depth ({full_layers} decoder layers)"
    analytic = plan_lib.executed_step_flops(full.config, budget, rows)  # resolved: freeze_und is the trainer's
    model_flops = plan_lib.analytic_step_flops(config.model, budget, rows)
    compiled_total = per_device * mesh.size
    activations = plan_lib.activation_estimate(config.model, budget, rows / divisor / int(config.train.grad_accum))
    peak, floor = memory["peak_bytes"], minimum["total"]
    limit = args.device_memory_gb * 1e9
    budget_bytes = 1.5 * floor + activations["total"]
    rows_per_device = rows / divisor / int(config.train.grad_accum)
    from synermedgen_jax.training.optim import trainable_groups

    working_set = (plan_lib.kernel_working_set(config.model, budget, rows_per_device, mesh_spec, target,
                                               vit_trained="und" in trainable_groups(config))
                   if "attention" in kernels["stand_ins"] else None)
    kernel_bytes = working_set["total"] if working_set else 0
    f32_copies = _f32_copies(compiles, depths, full_layers)
    device_bytes = peak + kernel_bytes
    accelerator = device_bytes - (f32_copies["bytes"] if f32_copies else 0)
    result = {
        "command": "plan", "config": args.config, "config_hash": config_hash(config), "stage": config.stage,
        "variant": config.model.variant, "devices": mesh.size, "mesh": dict(mesh.shape), "rows": rows,
        "tokens_per_row": budget.total_tokens, "tokens_per_step": rows * budget.total_tokens,
        "attention_impl": config.model.attention_impl, "remat": config.model.remat, "method": method,
        "target": target, "kernels": kernels, "kernel_working_set": working_set,
        "kernel_working_set_bytes_per_device": kernel_bytes,
        "per_device_bytes": device_bytes, "f32_copies": f32_copies,
        "f32_copy_bytes_per_device": f32_copies["bytes"] if f32_copies else None,
        "accelerator_equivalent_peak_bytes_per_device": accelerator,
        "fits_device_accelerator_equivalent": bool(accelerator <= limit),
        "scheduler": "XLA:CPU memory-minimising scheduler (plan.CPU_PLAN_OPTIONS)",
        "notes": _NOTES if config.model.compute_dtype == "bfloat16" else [],
        "peak_bytes_per_device": peak, "min_bytes_per_device": floor, "host_bytes_per_process": host,
        "peak_over_min": peak / floor if floor else math.inf,
        "activation_estimate_bytes_per_device": activations["total"],
        "target_bytes_per_device": int(budget_bytes), "within_target": bool(device_bytes <= budget_bytes),
        "device_memory_bytes": int(limit), "fits_device": bool(device_bytes <= limit),
        "memory_per_device": memory, "min_parts_per_device": minimum["parts"],
        "compiled_flops": compiled_total, "compiled_flops_per_device": per_device,
        "xla_cost_analysis_flops": xla_per_device * mesh.size,
        "compiled_flops_method": "XLA cost_analysis() + (trip count - 1) x the dot/convolution FLOPs of every "
                                 "while-loop body with a known trip count, read from the optimised HLO "
                                 "(cost_analysis counts a loop body once)",
        "loops_per_device": last["loops"],
        "analytic_flops": analytic["total"], "analytic_parts": analytic["parts"],
        "analytic_counted_as": analytic["counted_as"],
        "flops_ratio": compiled_total / analytic["total"] if analytic["total"] else math.inf,
        "analytic_model_flops": model_flops["total"], "analytic_model_counted_as": model_flops["counted_as"],
        "largest_buffers": last["largest_buffers"], "buffers_kind": last["buffers_kind"],
        "peak_live": last["peak_live"],
        "compiles": {str(d): {"decoder_layers": d, "lower_s": c["lower_s"], "compile_s": c["compile_s"],
                              "memory": c["memory"], "compiled_flops": c["compiled_flops_per_device"] * mesh.size,
                              "xla_cost_analysis_flops": c["xla_flops_per_device"] * mesh.size,
                              "analytic_flops": c["analytic_flops"]["total"]} for d, c in compiles.items()},
        "wall_s": time.perf_counter() - t0, "environment": environment(),
        "sampler": _plan_sampler(args, config, mesh, depths, full_layers),
    }
    _print(result)
    return result


_STAND_IN_WHY = {"attention": "online softmax over key chunks, O(T·chunk) temporaries like the kernel's O(T·block), "
                              "no T² array; the kernel's own working set is added below",
                 "flow_matching": "row-wise elementwise code, as the kernels"}


def _f32_copies(compiles: dict, depths: list[int], full_layers: int) -> dict | None:
    """The f32 copies of bf16 operands live at the peak (plan.f32_copy_bytes), extrapolated like the memory."""
    found = [compiles[d].get("f32_copies") for d in depths]
    if any(f is None for f in found):
        return None
    if len(depths) == 1:
        return found[0]
    low, high = found
    grow = lambda key: int(_extrapolate(low.get(key, 0), high.get(key, 0), depths[0], depths[1],  # noqa: E731
                                        full_layers))
    keys = ("bytes", "converts_of_bf16_bytes", "f32_dot_results_excess_bytes", "f32_gathers_excess_bytes")
    return {**high, **{k: grow(k) for k in keys if k in high}, "extrapolated": True}


# What a reader of a CPU plan must know before comparing it with an accelerator.
_NOTES = ["XLA:CPU computes bf16 dots in f32: it converts bf16 dot operands to f32 copies (FSDP weights may be "
          "gathered in f32) and keeps f32 dot results beside the bf16 ones, so its temporaries exceed an "
          "accelerator's for the same program; the copies live at the peak are counted ('of which f32 copies') "
          "and subtracted in the accelerator-equivalent figure."]


def _plan_sampler(args, config, mesh, depths: list[int], full_layers: int) -> dict | str:
    """The sampler's batch on the same mesh, at the same decoder depths as the train step (extrapolated alike)."""
    if config.data.stage != "stage2" or not getattr(args, "sampler_steps", 0):
        return "not planned (Stage II configs only; --sampler-steps 0 skips it)"
    from synermedgen_jax import sharding

    slices = args.sampler_slices or sharding.batch_divisor(mesh)
    plans = {}
    for depth in depths:
        print(f"  compiling the sampler ({slices} slices, {args.sampler_steps} steps, CFG) with {depth} decoder "
              "layer(s) ...", flush=True)
        plans[depth] = plan_lib.sampler_plan(_with_layers(config, depth) if depth != full_layers else config, mesh,
                                             slices, args.sampler_steps)
    if len(depths) == 2:
        lo, hi = plans[depths[0]], plans[depths[1]]
        memory = {k: int(_extrapolate(lo["memory"][k], hi["memory"][k], depths[0], depths[1], full_layers))
                  for k in _MEMORY_KEYS}
        flops = _extrapolate(lo["compiled_flops_per_device"], hi["compiled_flops_per_device"], depths[0], depths[1],
                             full_layers)
    else:
        memory, flops = plans[depths[0]]["memory"], plans[depths[0]]["compiled_flops_per_device"]
    last = plans[depths[-1]]
    return {"slices_per_batch": slices, "steps": args.sampler_steps, "image_size": last["image_size"],
            "peak_bytes_per_device": memory["peak_bytes"], "memory_per_device": memory,
            "params_bytes_per_device": plans[full_layers if full_layers in plans else depths[-1]]["params_bytes"],
            "compiled_flops_per_batch": flops * mesh.size,
            "fits_device": bool(memory["peak_bytes"] <= args.device_memory_gb * 1e9),
            "compiles": {str(d): {"memory": p["memory"], "compile_s": p["compile_s"]} for d, p in plans.items()}}


def _print(r: dict) -> None:
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
