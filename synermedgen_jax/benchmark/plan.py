"""Ahead-of-time plans: lower and compile the REAL sharded train step on (simulated) devices from abstract
inputs and read XLA's memory and cost analyses. Nothing is allocated: parameters, optimizer state and batches
are ``jax.ShapeDtypeStruct`` with their ``NamedSharding``.

The state, shardings and step come from training/step.py (``init_state`` under ``jax.eval_shape``,
``state_shardings``, ``make_train_step``, ``jit_train_step``) exactly as the trainer builds them; the batch
shapes come from a real empty pack row of the config's budget (data/packing.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from synermedgen_jax.benchmark.report import BenchError

MESH_AXES = ("data", "fsdp", "tensor")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}


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


def scale_budget(budget, tokens: int):
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


# ------------------------------------------------------------------------------------------------------------
def _conv(k: int, cin: int, cout: int, h: int, w: int) -> float:
    return 2.0 * k * k * cin * cout * h * w


def vae_encode_flops(vae, height: int, width: int) -> float:
    """Forward FLOPs of the frozen VAE encoder on one image (convolutions + mid attention; the step runs it
    in ``prepare`` to get the clean latents, so it belongs to the step's count)."""
    ch, mult = vae.ch, tuple(vae.ch_mult)
    h, w = height, width
    flops = _conv(3, vae.in_channels, ch, h, w)
    block_in = ch
    for level, level_mult in enumerate(mult):
        block_out = ch * level_mult
        for _ in range(vae.num_res_blocks):
            flops += _conv(3, block_in, block_out, h, w) + _conv(3, block_out, block_out, h, w)
            if block_in != block_out:
                flops += _conv(1, block_in, block_out, h, w)
            block_in = block_out
        if level != len(mult) - 1:
            h, w = h // 2, w // 2
            flops += _conv(3, block_in, block_in, h, w)
    top = block_in
    res_block = 2 * _conv(3, top, top, h, w)
    attention = 4 * _conv(1, top, top, h, w) + 4.0 * (h * w) ** 2 * top  # q/k/v/proj + scores and values
    return flops + 2 * res_block + attention + _conv(3, top, 2 * vae.z_channels, h, w)


def analytic_step_flops(model_config, budget, rows: int, visible_fraction: float | None = None) -> dict:
    """Analytic model FLOPs of one train step over ``rows`` packs (the MFU convention): the MoT forward+backward
    of modeling/flops.py (token routing: each token through its own expert) + the frozen VAE encoder forward.
    ``visible_fraction`` None = dense attention (what the jnp reference and xla_dense compute)."""
    from synermedgen_jax.modeling.flops import step_flops

    breakdown = step_flops(model_config, budget, rows, backward=True, visible_fraction=visible_fraction)
    parts = {k: float(v) for k, v in dataclasses.asdict(breakdown).items()}
    parts["vae_encoder_forward"] = _vae_flops(model_config, budget, rows)
    return {"total": sum(parts.values()), "parts": parts,
            "counted_as": "MoT fwd+bwd with real routing (2·N_expert·T per forward, backward 2x), attention "
                          + ("dense T^2" if visible_fraction is None else f"x visible fraction {visible_fraction:.3f}")
                          + ", lm_head at CE slots, ViT+connector, generation head, frozen VAE encoder fwd"}


def _vae_flops(model_config, budget, rows: int) -> float:
    height, width = budget.image_size
    return float(rows * budget.vae_images * vae_encode_flops(model_config.vae, height, width))


def executed_step_flops(config, budget, rows: int) -> dict:
    """Analytic FLOPs the step of run config ``config`` executes (modeling/flops.py ``executed_step_flops``):
    only trained parts get weight gradients, a detached understanding side gets no backward, the remat policy's
    recomputation and the flash-style attention backward's score recomputation are counted; + the frozen VAE
    encoder forward. This is the count a compiled program should match."""
    from synermedgen_jax.modeling.flops import executed_step_flops as count
    from synermedgen_jax.training.optim import trainable_groups

    groups = trainable_groups(config)
    parts = count(config.model, budget, rows, train_und="und" in groups, train_gen="gen" in groups)
    parts["vae_encoder_forward"] = _vae_flops(config.model, budget, rows)
    return {"total": sum(parts.values()), "parts": parts,
            "counted_as": f"matmul FLOPs the step executes: trained groups {'+'.join(groups)}, "
                          f"freeze_und={bool(config.model.llm.freeze_und)}, remat {config.model.remat} "
                          f"(recomputation counted), attention {config.model.attention_impl} dense T^2"}


# ------------------------------------------------------------------------------------------------------------
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


def abstract_train(config, mesh, rows: int, budget=None) -> AbstractTrain:
    """The trainer's state / batch / step for ``config`` on ``mesh`` as abstract sharded values.

    Composes training/step.py's functions; ``init_state`` runs under ``jax.eval_shape`` on a model built
    inside the trace, so no parameter or optimizer moment is ever materialised.
    """
    import jax

    from synermedgen_jax import sharding
    from synermedgen_jax.data.packing import PackBudget, PackBuilder, SpecialTokens, empty_row
    from synermedgen_jax.training import optim
    from synermedgen_jax.training import step as step_lib
    from synermedgen_jax.training.loop import build, resolve_config

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


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def host_bytes_per_process(state, devices_per_process: int) -> dict:
    """Peak host memory a process needs for the train state at init and at restore, with ``devices_per_process``
    devices per host (process ``p`` holds mesh devices ``[p·n, (p+1)·n)`` in mesh order, as ``jax.make_mesh``
    orders them).

    Init: the state is born on the devices by one jitted program (training/step.py ``create_state``), so no
    state byte passes through the host. Restore: Orbax reads each array's shards for this process's devices
    only; the figure is all of them staged at once (an upper bound). Before the state was born sharded, every
    process built the whole state on its host and device 0: ``whole_state``."""
    import jax
    import numpy as np

    leaves = jax.tree.leaves(state)
    devices = list(leaves[0].sharding.mesh.devices.flat) if leaves else []
    per_process = []
    for start in range(0, len(devices), devices_per_process):
        mine = set(devices[start:start + devices_per_process])
        total = 0
        for leaf in leaves:
            shards = {tuple((s.start, s.stop) for s in index)
                      for device, index in leaf.sharding.devices_indices_map(leaf.shape).items() if device in mine}
            shard = int(np.prod(leaf.sharding.shard_shape(leaf.shape), dtype=np.int64))
            total += len(shards) * shard * np.dtype(leaf.dtype).itemsize
        per_process.append(total)
    whole = sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in leaves)
    return {"devices_per_process": devices_per_process, "processes": len(per_process), "init": 0,
            "restore": max(per_process, default=0), "whole_state": whole}


def theoretical_minimum(abstract: AbstractTrain) -> dict:
    """Per-device bytes that any implementation must hold: all parameters (trained + frozen), one gradient
    per trained parameter (same sharding), the optimizer state and the EMA of the trained parameters."""
    state = abstract.state
    parts = {"params_trained": per_device_bytes(state["params"]), "params_frozen": per_device_bytes(state["frozen"]),
             "grads": per_device_bytes(state["params"]), "optimizer": per_device_bytes(state["opt"]),
             "ema": per_device_bytes(state["ema"])}
    return {"total": sum(parts.values()), "parts": parts}


def activation_estimate(model_config, budget, rows_per_device: float) -> dict:
    """Analytic per-device activation bytes under the configured remat policy (what the step must keep
    beyond the minimum). ``full``: every layer's input is saved (T·E each, in the compute dtype) plus one
    layer's working set during its recomputation; ``dots``: each layer keeps its matmul outputs; ``none``: each
    layer keeps its whole working set. Attention scores are counted densely for the jnp reference / xla_dense
    (T²·Hq f32), per key chunk for ``chunked`` (T·chunk·Hq f32: scores, probabilities, their gradient) and
    not at all for Pallas (tiles in on-chip memory)."""
    import numpy as np

    from synermedgen_jax.kernels.attention.chunked import DEFAULT_CHUNK

    llm = model_config.llm
    tokens = budget.total_tokens * rows_per_device
    b = np.dtype(model_config.compute_dtype).itemsize
    q, kv = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    # q, k, v, attention out, o_proj out, 2 norms, residual; gate, up, act·up, down.
    matmul_outs = tokens * (q + 2 * kv + q + llm.hidden_size + 3 * llm.intermediate_size) * b
    layer_set = matmul_outs + tokens * 3 * llm.hidden_size * b
    if model_config.attention_impl in ("reference", "xla_dense"):
        layer_set += rows_per_device * budget.total_tokens**2 * llm.num_heads * 4 * 2  # scores + probs (f32)
    elif model_config.attention_impl == "chunked":
        layer_set += tokens * min(DEFAULT_CHUNK, budget.total_tokens) * llm.num_heads * 4 * 3
    saved_inputs = llm.num_layers * tokens * llm.hidden_size * b  # the residual stream, in the compute dtype
    policy = model_config.remat
    if policy == "full":
        total = saved_inputs + layer_set
    elif policy == "dots":
        total = llm.num_layers * matmul_outs + saved_inputs + layer_set
    else:
        total = llm.num_layers * layer_set
    return {"total": int(total), "policy": policy, "tokens_per_device": tokens}


# The stand-in a CPU plan compiles for a Pallas kernel of the target: the jnp path of the same memory class.
# Attention: ``chunked`` (online softmax over key chunks, O(T·chunk) temporaries like the kernel's O(T·block),
# never a T² array); flow matching: the jnp reference (row-wise elementwise code, like the kernels').
KERNEL_STAND_INS = {"attention": "chunked", "flow_matching": "reference"}
TARGETS = ("gpu", "tpu")


def kernel_stand_ins(model_config, target: str, mesh_shape: Mapping[str, int] | None = None):
    """``(model config to compile on CPU, description)``: ``model_config`` resolved for ``target``
    (kernels/dispatch.py); every Pallas kernel it resolves to is replaced by its stand-in. The description says
    what runs on the target and what was compiled in its place."""
    from synermedgen_jax.kernels.dispatch import pallas_backend, resolve_kernels

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


def kernel_working_set(model_config, budget, rows_per_device: float, mesh_sizes: Mapping[str, int],
                       target: str, vit_trained: bool = True) -> dict:
    """Per-device bytes the Pallas attention kernel adds in device memory on ``target`` (an upper bound, added
    to the stand-in's compiled peak whose own equivalents stay counted). Per call, on the local rows and heads:
    the padded (T to the block multiple, Triton head_dim to a power of two) and, for Mosaic, head-major copies
    of q/k/v (and of dO in the backward), the output, the saved log-sum-exp per query row and head (f32), the
    backward's delta (f32), dq/dk/dv, and the visible-block lists of the forward and backward tilings. The
    output and log-sum-exp stay saved between forward and backward for every layer the remat policy does not
    recompute (``none``: all decoder layers; ``full``/``dots`` recompute the kernel's outputs) and for every ViT
    layer when the ViT is trained (``vit_trained``; a frozen ViT has no backward). The tiles
    themselves live in on-chip memory (shared memory / VMEM), not in the device-memory figure."""
    import numpy as np

    from synermedgen_jax.kernels.attention.pallas import default_block_sizes, triton_head_dim

    backend = "mosaic" if target == "tpu" else "triton"
    b = np.dtype(model_config.compute_dtype).itemsize
    tensor = int(mesh_sizes.get("tensor", 1))

    def call(tokens: int, q_heads: int, kv_heads: int, head_dim: int, rows: float) -> dict:
        lanes = triton_head_dim(head_dim) if backend == "triton" else head_dim
        sizes = default_block_sizes(backend, lanes, False)
        padded = -(-tokens // sizes.multiple) * sizes.multiple
        if q_heads % tensor == 0 and kv_heads % tensor == 0:
            q_heads, kv_heads = q_heads // tensor, kv_heads // tensor
        q = rows * padded * q_heads * lanes * b
        kv = 2 * rows * padded * kv_heads * lanes * b
        stats = rows * q_heads * padded * 4  # one f32 per query row and head
        copies = (q + kv) * (padded != tokens or lanes != head_dim)
        if backend == "mosaic":
            copies += q + kv + q  # head-major q, k, v and the output transposed back
        lists = 0
        for bq, bk in ((sizes.block_q, sizes.block_k), (sizes.block_q_bwd, sizes.block_k_bwd)):
            nq, nk = padded // bq, padded // bk
            lists += rows * nq * nk * (1 + 4 + 4) + rows * (nq + nk) * 4  # block map, kv/q index lists, counts
        forward = copies + q + stats + lists / 2
        backward = copies + (q if backend == "mosaic" else 0) + q + stats + stats + q + kv + lists / 2
        return {"saved": q + stats, "transient": forward + backward}

    llm, vit = model_config.llm, model_config.vit
    decoder = call(budget.total_tokens, llm.num_heads, llm.num_kv_heads, llm.head_dim, rows_per_device)
    vit_call = call(max(1, budget.vit_patches), vit.num_heads, vit.num_heads, vit.hidden_size // vit.num_heads,
                    rows_per_device)
    kept_layers = llm.num_layers if model_config.remat == "none" else 0
    vit_layers = vit.num_layers if vit_trained else 0
    saved = kept_layers * decoder["saved"] + vit_layers * vit_call["saved"]
    transient = max(decoder["transient"], vit_call["transient"])
    return {"total": int(saved + transient), "saved_between_passes": int(saved), "one_call": int(transient),
            "backend": backend, "decoder_layers_saved": kept_layers,
            "counted_as": "padded/relayout copies of q, k, v, dO; output; log-sum-exp and delta (f32 per query row "
                          "and head); dq, dk, dv; visible-block lists; outputs and log-sum-exp kept for "
                          f"{kept_layers} decoder + {vit_layers} ViT layers (remat {model_config.remat})"}


# ------------------------------------------------------------------------------------------------------------
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\]")


def largest_buffers(hlo_text: str, top: int = 8) -> list[dict]:
    """The largest array values of the compiled per-device HLO outside fusion bodies (what XLA may have to
    allocate), as ``{name, dtype, shape, bytes}``. Fused computations' internals never hit memory, so they
    are skipped."""
    found: dict[str, dict] = {}
    in_fused = False
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and ("computation" in stripped.split("(")[0] or stripped.startswith(("%", "ENTRY"))):
            head = stripped.split("(")[0].split()[-1].lstrip("%")
            in_fused = "fused" in head or "fusion" in head
            continue
        if in_fused:
            continue
        match = _INSTR.match(line)
        if not match or match.group(2) not in _DTYPE_BYTES:
            continue
        dims = [int(d) for d in match.group(3).split(",") if d]
        size = math.prod(dims) * _DTYPE_BYTES[match.group(2)]
        name = match.group(1)
        if name not in found or found[name]["bytes"] < size:
            found[name] = {"name": name, "dtype": match.group(2), "shape": dims, "bytes": size}
    return sorted(found.values(), key=lambda r: -r["bytes"])[:top]


def memory_figures(compiled) -> dict:
    stats = compiled.memory_analysis()
    if stats is None:
        raise BenchError("this backend's compiled executable gives no memory analysis")
    argument, output = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
    alias, temp = int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes)
    code = int(getattr(stats, "generated_code_size_in_bytes", 0))
    # Donated state aliases the output: those bytes are counted once.
    peak = argument + output - alias + temp + code
    return {"argument_bytes": argument, "output_bytes": output, "alias_bytes": alias, "temp_bytes": temp,
            "generated_code_bytes": code, "peak_bytes": peak}


# XLA:CPU's default scheduler orders for thread concurrency and starts independent work (weight all-gathers,
# recomputations) as early as it can, which holds buffers far longer than an accelerator's memory-aware
# scheduler would (the 7B plan measured 28 GB of temporaries at 2 layers with it, 20 GB without). Plans
# compile with the memory-minimising list scheduler instead. (The DebugOptions field is the enum below; the
# XLA_FLAGS spelling --xla_cpu_enable_concurrency_optimized_scheduler=false is an alias that only the flag parser
# knows, and as a compile option it silently does nothing.)
CPU_PLAN_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(platform: str, dump_dir: str | None = None) -> dict:
    """XLA options the plan compiles with on ``platform``; ``dump_dir`` also dumps the optimised module with
    its buffer live ranges (read by :func:`peak_live_buffers`)."""
    options = dict(CPU_PLAN_OPTIONS) if platform == "cpu" else {}
    if dump_dir:
        options.update(xla_dump_to=dump_dir, xla_dump_hlo_pass_re="^$")  # final module only, no pass dumps
    return options


_LIVE = re.compile(r"^\s+([\w.\-]+)\{[^}]*\}: (\d+) bytes", re.M)
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def peak_live_buffers(live_range_text: str, hlo_text: str, top: int = 12) -> dict:
    """The values live at the memory peak of a compiled module, from XLA's live-range dump
    (``*after_optimizations-live-range.txt``): ``{"position", "bytes", "buffers": [{name, dtype, shape, bytes,
    op}]}`` with the ``top`` largest (``op``: the JAX name stack of the defining op, where XLA kept it)."""
    start = live_range_text.find("(peak):")
    if start < 0:
        raise ValueError("no '(peak):' section in the live-range dump")
    position = re.search(r"Live ranges at (\d+) \(peak\)", live_range_text)
    section = live_range_text[start:]
    end = section.find("Stack trace")
    rows = _LIVE.findall(section[: end if end > 0 else None])
    shapes, ops = {}, {}
    for line in hlo_text.splitlines():
        match = _DEF.match(line)
        if match:
            shapes[match.group(1)] = (match.group(2), [int(d) for d in match.group(3).split(",") if d])
            op = _OP_NAME.search(line)
            if op:
                ops[match.group(1)] = op.group(1)
    buffers = []
    for name, size in sorted(rows, key=lambda r: -int(r[1]))[:top]:
        dtype, shape = shapes.get(name, ("", []))
        buffers.append({"name": name, "dtype": dtype, "shape": shape, "bytes": int(size), "op": ops.get(name, "")})
    return {"position": int(position.group(1)) if position else None, "bytes": sum(int(r[1]) for r in rows),
            "count": len(rows), "buffers": buffers}


_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\]\S*\s+([\w\-]+)\((.*)$")
_PASS_THROUGH = {"bitcast", "reshape", "transpose", "copy", "broadcast", "slice", "dynamic-slice"}
_GATHERS = {"all-gather", "all-gather-start", "all-gather-done"}


def _hlo_values(hlo_text: str) -> tuple[dict, dict]:
    """``({name: (dtype, op, operands, called computation)}, {computation: root name})`` of an HLO module."""
    values, roots, computation = {}, {}, None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and "=" not in stripped.split("(")[0]:
            computation = stripped.split("(")[0].split()[-1].lstrip("%")
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        root, name, dtype, _, op, rest = match.groups()
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0]) if op != "parameter" else []
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        values[name] = (dtype, op, operands, called.group(1) if called else None)
        if root and computation:
            roots[computation] = name
    return values, roots


def _f32_from_bf16(name: str, values: dict, roots: dict, depth: int = 0) -> bool:
    """Whether value ``name`` is an f32 convert of a bf16 value (directly, through layout-only ops, or as the
    root of the fusion that defines it)."""
    if name not in values or depth > 8:
        return False
    dtype, op, operands, called = values[name]
    if op == "convert":
        return dtype == "f32" and bool(operands) and values.get(operands[0], ("",))[0] == "bf16"
    if op in _PASS_THROUGH and operands:
        return _f32_from_bf16(operands[0], values, roots, depth + 1)
    if op in ("fusion", "call") and called in roots:
        return dtype == "f32" and _f32_from_bf16(roots[called], values, roots, depth + 1)
    return False


def _dot_result(name: str, values: dict, roots: dict) -> bool:
    """Whether ``name`` is made by a dot (directly or as the root of its fusion, e.g. XLA:CPU's YNNPACK
    ``ynn_fusion``)."""
    _, op, _, called = values[name]
    if op == "dot":
        return True
    root = roots.get(called) if op == "fusion" else None
    return root is not None and values.get(root, ("", ""))[1] == "dot"


def f32_copy_bytes(live_range_text: str, hlo_text: str) -> dict:
    """Bytes of the values live at the memory peak that exist in f32 only because XLA:CPU computes bf16 dots in
    f32 (its float normalisation turns each bf16 dot into converts to f32, an f32 dot and a convert back):

    * f32 converts of bf16 values (the dot operands): all their bytes;
    * f32 dot results whose every user makes bf16 (the convert back): half their bytes (an accelerator's dot
      writes the bf16 result, accumulating in f32 on chip);
    * f32 all-gathers: half their bytes (the FSDP weight gathers, which an accelerator performs on the bf16
      weights after the model's cast, while XLA:CPU drops the f32→bf16→f32 round trip and gathers f32).

    Read from XLA's live-range dump (every value live at the peak) and the optimised module (each value's
    defining instruction, a fusion by its root, and its users). Subtracting these bytes from the peak gives the
    same program point without the copies; values the classification does not recognise stay counted, so the
    accelerator-equivalent figure errs high. For programs that compute in bf16 (an f32 model's f32 gathers are
    its own)."""
    start = live_range_text.find("(peak):")
    if start < 0:
        raise ValueError("no '(peak):' section in the live-range dump")
    section = live_range_text[start:]
    end = section.find("Stack trace")
    live = [(name, int(size)) for name, size in _LIVE.findall(section[: end if end > 0 else None])]
    values, roots = _hlo_values(hlo_text)
    users: dict[str, list[str]] = {}
    for name, (_, _, operands, _) in values.items():
        for operand in operands:
            users.setdefault(operand, []).append(name)
    converts = dots = gathers = count = 0
    for name, size in live:
        value = values.get(name)
        if value is None or value[0] != "f32":
            continue
        if _f32_from_bf16(name, values, roots):
            converts, count = converts + size, count + 1
        elif value[1] in _GATHERS:
            gathers, count = gathers + size // 2, count + 1
        elif (_dot_result(name, values, roots) and users.get(name)
              and all(values[user][0] == "bf16" for user in users[name])):
            dots, count = dots + size // 2, count + 1
    return {"bytes": converts + dots + gathers, "converts_of_bf16_bytes": converts,
            "f32_dot_results_excess_bytes": dots, "f32_gathers_excess_bytes": gathers,
            "values": count, "live_bytes": sum(size for _, size in live),
            "method": "values live at the peak (XLA live-range dump): f32 converts of bf16 values (whole), f32 dot "
                      "results only converted to bf16 (half), f32 all-gathers (half: bf16 on an accelerator)"}


def loop_corrected_flops(compiled, hlo_text: str | None = None) -> tuple[float, float, list[dict]]:
    """``(XLA's cost_analysis FLOPs, FLOPs to add, loops)`` per device: cost_analysis counts every while-loop
    body once, so the dot/convolution FLOPs of each body's remaining ``trips - 1`` runs are added."""
    from synermedgen_jax.modeling.flops import compiled_flops, hlo_matmul_flops

    matmuls = hlo_matmul_flops(hlo_text if hlo_text is not None else compiled.as_text())
    return compiled_flops(compiled), matmuls["with_trips"] - matmuls["once"], matmuls["loops"]


def compile_plan(abstract: AbstractTrain) -> dict:
    """Lowers and compiles the step; memory, FLOPs (XLA's and loop-corrected), the buffers live at the memory
    peak (largest values when XLA's dump is unavailable) and the wall time of each phase."""
    import glob
    import tempfile

    t0 = time.perf_counter()
    lowered = abstract.step.lower(abstract.state, abstract.batch)
    t1 = time.perf_counter()
    platform = abstract.mesh.devices.flat[0].platform
    with tempfile.TemporaryDirectory(prefix="smg_plan_") as dump_dir:
        compiled = lowered.compile(compiler_options=compiler_options(platform, dump_dir))
        t2 = time.perf_counter()
        live = sorted(glob.glob(f"{dump_dir}/*after_optimizations-live-range.txt"), key=len)
        live_text = Path(live[0]).read_text() if live else ""
    memory = memory_figures(compiled)
    hlo_text = compiled.as_text()
    xla_flops, loop_extra, loops = loop_corrected_flops(compiled, hlo_text)
    try:
        peak = peak_live_buffers(live_text, hlo_text) if live_text else None
        f32_copies = None
        if live_text and str(abstract.config.model.compute_dtype) == "bfloat16":
            f32_copies = f32_copy_bytes(live_text, hlo_text)
        elif live_text:
            f32_copies = {"bytes": 0, "values": 0, "method": "compute in float32: no bf16 operand to copy"}
    except ValueError:
        peak = f32_copies = None
    buffers = peak["buffers"] if peak else largest_buffers(hlo_text)
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "memory": memory,
            "compiled_flops_per_device": xla_flops + loop_extra, "xla_flops_per_device": xla_flops,
            "loop_flops_added_per_device": loop_extra,
            "loops": sorted(loops, key=lambda loop: -loop["body_flops"] * (loop["trips"] or 1))[:6],
            "peak_live": {k: v for k, v in peak.items() if k != "buffers"} if peak else None,
            "largest_buffers": buffers, "buffers_kind": "live at the peak" if peak else "largest values",
            "f32_copies": f32_copies}


def sampler_plan(config, mesh, slices: int, steps: int, instruction_tokens: int = 32) -> dict:
    """Lowers and compiles one batch of the CFG flow-matching sampler (inference/sampler.py: KV-cache prefill of
    the three context packs, ``steps`` Euler steps, VAE decode) on ``mesh`` with abstract parameters placed by
    the sharding rules; ``slices`` per batch (a multiple of data × fsdp). Returns the per-device memory figures
    and XLA's FLOPs (loop bodies counted once per trip, as for the train step)."""
    from flax import nnx

    from synermedgen_jax.data.packing import SpecialTokens
    from synermedgen_jax.inference.sampler import Sampler, SamplerConfig
    from synermedgen_jax.modeling.synermedgen import build_model

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
    xla_flops, loop_extra, _ = loop_corrected_flops(compiled)
    return {"slices_per_batch": slices, "steps": steps, "image_size": list(pack.image_size),
            "memory": memory_figures(compiled), "params_bytes": per_device_bytes(sampler.state),
            "compiled_flops_per_device": xla_flops + loop_extra, "compile_s": time.perf_counter() - t0}

