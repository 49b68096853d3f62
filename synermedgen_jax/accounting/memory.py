"""Analytic memory of a train step per device: what the sharded state occupies (:func:`per_device_bytes`,
:func:`theoretical_minimum`, :func:`host_bytes_per_process`), the activations the remat policy keeps
(:func:`activation_estimate`) and the device-memory working set of the Pallas attention kernel
(:func:`kernel_working_set`), which a CPU plan cannot compile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from synermedgen_jax.kernels.attention.chunked import DEFAULT_CHUNK
from synermedgen_jax.kernels.attention.pallas import default_block_sizes, triton_head_dim


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def tree_bytes(tree: Any) -> int:
    """Bytes of every leaf of ``tree`` (arrays or ShapeDtypeStructs) whole, whatever its sharding."""
    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def host_bytes_per_process(state: Any, devices_per_process: int) -> dict:
    """Peak host memory a process needs for the train state at init and at restore, with ``devices_per_process``
    devices per host (process ``p`` holds mesh devices ``[p·n, (p+1)·n)`` in mesh order, as ``jax.make_mesh``
    orders them).

    Init: the state is born on the devices by one jitted program (training/step.py ``create_state``), so no
    state byte passes through the host. Restore: Orbax reads each array's shards for this process's devices
    only; the figure is all of them staged at once (an upper bound). Before the state was born sharded, every
    process built the whole state on its host and device 0: ``whole_state``."""
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
    return {"devices_per_process": devices_per_process, "processes": len(per_process), "init": 0,
            "restore": max(per_process, default=0), "whole_state": tree_bytes(state)}


def theoretical_minimum(state: Mapping[str, Any]) -> dict:
    """Per-device bytes that any implementation must hold of the train state ``state`` (sharded
    ShapeDtypeStructs): all parameters (trained + frozen), one gradient per trained parameter (same sharding),
    the optimizer state and the EMA of the trained parameters."""
    parts = {"params_trained": per_device_bytes(state["params"]), "params_frozen": per_device_bytes(state["frozen"]),
             "grads": per_device_bytes(state["params"]), "optimizer": per_device_bytes(state["opt"]),
             "ema": per_device_bytes(state["ema"])}
    return {"total": sum(parts.values()), "parts": parts}


def activation_estimate(model_config: Any, budget: Any, rows_per_device: float) -> dict:
    """Analytic per-device activation bytes under the configured remat policy (what the step must keep
    beyond the minimum). ``full``: every layer's input is saved (T·E each, in the compute dtype) plus one
    layer's working set during its recomputation; ``dots``: each layer keeps its matmul outputs; ``none``: each
    layer keeps its whole working set. Attention scores are counted densely for the jnp reference / xla_dense
    (T²·Hq f32), per key chunk for ``chunked`` (T·chunk·Hq f32: scores, probabilities, their gradient) and
    not at all for Pallas (tiles in on-chip memory)."""
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


def kernel_working_set(model_config: Any, budget: Any, rows_per_device: float, mesh_sizes: Mapping[str, int],
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
