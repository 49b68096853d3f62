"""Train-step and sampling throughput on the local devices, with synthetic packs of the config's budget.

Packs are filled by the real packer (data/packing.py) with synthetic samples shaped like the stage's data
(Stage II: prompt + ViT source + clean VAE source + noised VAE target; Stage I: question + ViT image + answer),
random pixels and token ids, so the step does exactly the work of a real batch of that budget. The step costs
what its slots cost, real or padding, so throughput and MFU are reported both per slot (every slot of the pack
counted as work, the model-FLOPs convention of accounting/flops.py) and per real token (the same formula evaluated
at each row's real counts, data/packing.real_counts).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from synermedgen_jax import sharding
from synermedgen_jax.accounting.flops import analytic_step_flops
from synermedgen_jax.accounting.hlo import compiled_flops
from synermedgen_jax.benchmark import peaks
from synermedgen_jax.benchmark.report import BenchError
from synermedgen_jax.data.packing import (
    CAUSAL,
    LOOKAHEAD,
    NOISE,
    PackBudget,
    PackBuilder,
    SpecialTokens,
    Text,
    VaeImage,
    VitImage,
    fill_row,
    real_counts,
    stack_rows,
)
from synermedgen_jax.inference.sampler import Sampler, SamplerConfig
from synermedgen_jax.kernels.attention.block_map import block_skip_fraction
from synermedgen_jax.kernels.attention.pallas import default_block_sizes
from synermedgen_jax.kernels.dispatch import resolve_kernels
from synermedgen_jax.modeling.synermedgen import build_model
from synermedgen_jax.stages import Stage
from synermedgen_jax.training import optim
from synermedgen_jax.training import step as step_lib
from synermedgen_jax.training.loop import build, resolve_config

SPECIAL_IDS = (1, 2, 3, 4)  # bos, eos, vision_start, vision_end of the synthetic packs (never sampled as text)


def _sample(stage: Stage | str, budget, rng: np.random.Generator, vocab: int, vit_patch: int) -> list:
    def text(n: int, loss: bool = False) -> Text:
        return Text(rng.integers(8, vocab, size=n).tolist(), loss=loss)

    vh, vw = budget.vit_image_size
    vit = VitImage(rng.uniform(-1, 1, size=(vh - vh % vit_patch, vw - vw % vit_patch)).astype(np.float32))
    if stage == Stage.STAGE2_UCG:
        h, w = budget.image_size
        return [text(12), vit, VaeImage(rng.uniform(-1, 1, size=(h, w)).astype(np.float32)),
                VaeImage(rng.uniform(-1, 1, size=(h, w)).astype(np.float32), noised=True)]
    return [text(24), vit, text(4, loss=True)]


def synthetic_batch(config, budget, rows: int, seed: int = 0) -> tuple[dict, dict]:
    """``(batch, counts)``: ``rows`` packs of synthetic samples of ``config.stage``, packed by the pipeline's rule
    (``data.packing.fill_row`` over ``config.data.lookahead`` samples)."""
    rng = np.random.default_rng(seed)
    builder = PackBuilder(budget, SpecialTokens(*SPECIAL_IDS), config.model)
    lookahead = int(config.data.get("lookahead", LOOKAHEAD)) if "data" in config else LOOKAHEAD
    window: list = []
    totals = {"samples": 0, "images": 0}

    def refill() -> bool:
        window.append(_sample(config.stage, budget, rng, int(config.model.llm.vocab_size),
                              int(config.model.vit.patch_size)))
        return True

    def take(sample) -> None:
        builder.add(sample, rng)
        totals["samples"] += 1
        totals["images"] += sum(type(item).__name__ in ("VitImage", "VaeImage") for item in sample)

    out = []
    for _ in range(rows):
        fill_row(window, refill, builder.fits, take, lookahead)
        if builder.empty:
            raise BenchError(f"one synthetic {config.stage} sample does not fit the pack budget {budget}")
        out.append(builder.build())
    batch = stack_rows(out)
    tokens = int(np.sum(batch["sample_id"] >= 0))
    return batch, {**totals, "tokens": tokens, "slot_tokens": rows * budget.total_tokens}


def visible_pairs(sample_id: np.ndarray, split_id: np.ndarray, split_kind: np.ndarray) -> np.ndarray:
    """Per-row count of the (query, key) pairs the visibility rule lets attend (docs/packing.md), ``[B]``.

    Counted from the splits, never a dense ``T×T`` mask (a 7B row has 10k tokens): a query of split k sees its
    own split (a causal split its lower triangle, ``n(n+1)/2`` pairs; a full / noise split all ``n²``) and every
    earlier non-noise split of its sample. Padding sees and is seen by nothing, so only real pairs count.
    """
    out = np.zeros(sample_id.shape[0], np.int64)
    for row in range(sample_id.shape[0]):
        real = sample_id[row] >= 0
        if not real.any():
            continue
        keys = np.stack([sample_id[row][real], split_id[row][real]], axis=1)
        # (sample, split) sorted lexicographically: each sample's splits in order, contiguously
        splits, first, sizes = np.unique(keys, axis=0, return_index=True, return_counts=True)
        sizes = sizes.astype(np.int64)
        kinds = split_kind[row][real][first]
        own = np.where(kinds == CAUSAL, sizes * (sizes + 1) // 2, sizes * sizes)
        context = np.where(kinds == NOISE, 0, sizes)
        before = np.cumsum(context) - context  # non-noise tokens of all earlier (sample, split) entries
        _, sample_start = np.unique(splits[:, 0], return_index=True)
        group = np.searchsorted(sample_start, np.arange(len(splits)), side="right") - 1
        earlier = before - before[sample_start][group]  # ... of earlier splits of the same sample only
        out[row] = int(np.sum(own + sizes * earlier))
    return out


def real_step_flops(model_config, budget, batch: dict, visible_blocks: bool) -> dict:
    """Model FLOPs of the *real* contents of ``batch``: :func:`~synermedgen_jax.accounting.flops.analytic_step_flops`
    (accounting/flops.step_flops + the frozen VAE encoder) evaluated per row at that row's real counts (und / gen
    tokens, ViT patches, CE slots, VAE images) instead of the slot counts, summed over rows. Not slots × fill:
    attention (decoder and ViT) is quadratic in the counts.

    Attention follows the slot figure's convention: dense over the row's real tokens when the model's attention
    computes every pair (``visible_blocks`` False), else the exact number of visible real (query, key) pairs
    (:func:`visible_pairs`), which the slot figure's visible key blocks bound from above.
    """
    counts = real_counts(batch, model_config)
    pairs = visible_pairs(batch["sample_id"], batch["split_id"], batch["split_kind"]) if visible_blocks else None
    parts: dict[str, float] = {}
    for row in range(batch["sample_id"].shape[0]):
        real = dataclasses.replace(
            budget, und_tokens=int(counts["und_tokens"][row]), gen_tokens=int(counts["gen_tokens"][row]),
            vit_patches=int(counts["vit_patches"][row]), vit_images=int(counts["vit_images"][row]),
            vae_images=int(counts["vae_images"][row]), ce_tokens=int(counts["ce_tokens"][row]))
        tokens = real.und_tokens + real.gen_tokens
        fraction = None if pairs is None else (float(pairs[row]) / tokens**2 if tokens else 0.0)
        for name, value in analytic_step_flops(model_config, real, 1, fraction)["parts"].items():
            parts[name] = parts.get(name, 0.0) + float(value)
    attention = ("over the visible real (query, key) pairs" if visible_blocks
                 else "dense over each row's real tokens")
    return {"total": sum(parts.values()), "parts": parts,
            "counted_as": f"the slot formula at each row's real counts; attention {attention}"}


def real_fractions(batch: dict, budget, model_config) -> dict[str, float]:
    """``{region: real / slots}`` over all rows of ``batch`` (data/packing.real_counts); regions without slots
    in ``budget`` are left out."""
    counts = real_counts(batch, model_config)
    rows = batch["sample_id"].shape[0]
    slots = {"tokens": budget.total_tokens, "und": budget.und_tokens, "gen": budget.gen_tokens,
             "vit": budget.vit_patches, "vit_images": budget.vit_images, "vae": budget.vae_images,
             "ce": budget.ce_tokens}
    real = {"tokens": counts["und_tokens"] + counts["gen_tokens"], "und": counts["und_tokens"],
            "gen": counts["gen_tokens"], "vit": counts["vit_patches"], "vit_images": counts["vit_images"],
            "vae": counts["vae_images"], "ce": counts["ce_tokens"]}
    return {name: float(np.sum(real[name])) / (n * rows) for name, n in slots.items() if n}


def memory_in_use() -> dict:
    """Device memory from ``memory_stats()`` where the backend has it (GPU/TPU), else this process's RSS."""
    import psutil  # optional (not in requirements.txt): only a CPU run reads its RSS

    stats = jax.local_devices()[0].memory_stats()
    if stats and "bytes_in_use" in stats:
        return {"source": "device.memory_stats()", "bytes_in_use": int(stats["bytes_in_use"]),
                "peak_bytes_in_use": int(stats.get("peak_bytes_in_use", 0)),
                "bytes_limit": int(stats.get("bytes_limit", 0))}
    return {"source": "process RSS (no device memory stats on this backend)",
            "bytes_in_use": int(psutil.Process().memory_info().rss)}


def timed(fn: Callable[[], object], steps: int, warmup: int) -> list[float]:
    """Wall seconds of ``steps`` calls after ``warmup`` calls; ``fn`` must block until its result is ready."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_train(config, *, steps: int, warmup: int, rows: int = 0, peak_tflops: float | None = None) -> dict:
    """Median device-synchronised step time of the real jitted, sharded train step, throughput, FLOPs, MFU."""
    config = resolve_config(config)
    if config.stage == Stage.VAE:
        raise BenchError("bench --what train covers the packed MoT stages, not the stage-0 VAE")
    try:
        mesh = sharding.make_mesh(config.mesh)
    except ValueError as err:
        raise BenchError(str(err)) from None
    config.model = resolve_kernels(config.model, mesh.devices.flat[0].platform, mesh_shape=dict(mesh.shape))
    rows = rows or int(config.train.rows)
    if rows % (sharding.batch_divisor(mesh) * int(config.train.grad_accum)):
        raise BenchError(f"rows={rows} must be a multiple of data×fsdp ({sharding.batch_divisor(mesh)}) × "
                         f"grad_accum ({config.train.grad_accum})")
    budget = PackBudget.from_config(config.data.pack)
    make_model, codec, objective = build(config)
    tx = optim.make_optimizer(config.train)
    _, state_sh = step_lib.plan_state(codec, make_model, tx, config.train, mesh)
    state = step_lib.create_state(codec, make_model, tx, config.train, state_sh)
    local, counts = synthetic_batch(config, budget, rows, seed=int(config.train.seed))
    batch = sharding.global_batch(local, mesh)
    fn = step_lib.jit_train_step(step_lib.make_train_step(codec, tx, objective, config.train), state_sh,
                                 sharding.batch_sharding(mesh, local), mesh)
    start = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    times = timed(one_step, steps, warmup)
    step_s = statistics.median(times)

    visible = None
    attention_note = f"dense T^2 ({config.model.attention_impl} computes every (query, key) pair)"
    if config.model.attention_impl.startswith("pallas"):
        interpret = config.model.attention_impl == "pallas_interpret"
        backend = "mosaic" if jax.default_backend() == "tpu" else "triton"
        sizes = default_block_sizes(backend, int(config.model.llm.head_dim), interpret)
        meta = _padded_meta(local, max(sizes.block_q, sizes.block_k))
        visible = float(block_skip_fraction(*meta, sizes.block_q, sizes.block_k))
        attention_note = (f"visible key blocks only: block_skip_fraction {visible:.3f} of "
                          f"{sizes.block_q}x{sizes.block_k} blocks (Pallas kernel)")
    analytic = analytic_step_flops(config.model, budget, rows, visible)
    real = real_step_flops(config.model, budget, local, visible_blocks=visible is not None)
    devices = mesh.size
    kind = jax.devices()[0].device_kind
    peak, peak_source = peaks.peak_flops(kind, peak_tflops)
    achieved = analytic["total"] / step_s
    achieved_real = real["total"] / step_s
    return {
        "name": "train", "config_stage": config.stage, "rows": rows, "devices": devices, "mesh": dict(mesh.shape),
        "kernels": config.model.kernels.summary,
        "steps": steps, "warmup": warmup, "compile_s": compile_s, "step_times_s": times,
        "step_time_s": step_s, "tokens_per_step": counts["tokens"], "slot_tokens_per_step": counts["slot_tokens"],
        "images_per_step": counts["images"], "samples_per_step": counts["samples"],
        "real_fraction": real_fractions(local, budget, config.model),
        # tokens_per_s (and per device) count real tokens, as before; the _slots / _real pair names both sides.
        "tokens_per_s": counts["tokens"] / step_s, "tokens_per_s_per_device": counts["tokens"] / step_s / devices,
        "tokens_per_s_slots": counts["slot_tokens"] / step_s, "tokens_per_s_real": counts["tokens"] / step_s,
        "images_per_s": counts["images"] / step_s, "images_per_s_per_device": counts["images"] / step_s / devices,
        "analytic_flops_per_step": analytic["total"], "analytic_flops_parts": analytic["parts"],
        "flops_counted_as": analytic["counted_as"] + "; " + attention_note,
        "compiled_flops_per_step": compiled_flops(compiled) * devices,
        "analytic_flops_per_step_real": real["total"], "analytic_flops_parts_real": real["parts"],
        "flops_real_counted_as": real["counted_as"],
        "achieved_tflops_per_device": achieved / devices / 1e12,
        "achieved_tflops_per_device_real": achieved_real / devices / 1e12,
        "peak_tflops_per_device": None if peak is None else peak / 1e12, "peak_source": peak_source,
        # mfu: every slot counted as work (as before, = mfu_slots); mfu_real: the real tokens' FLOPs only
        "mfu": None if peak is None else achieved / (peak * devices),
        "mfu_slots": None if peak is None else achieved / (peak * devices),
        "mfu_real": None if peak is None else achieved_real / (peak * devices),
        "memory": memory_in_use(),
    }


def _padded_meta(batch: dict, multiple: int) -> tuple:
    """Metadata padded (sample_id = -1) to a multiple of the kernel block size, as the kernel pads it."""
    length = batch["sample_id"].shape[1]
    pad = (-length) % multiple
    out = []
    for key, fill in (("sample_id", -1), ("split_id", 0), ("split_kind", 0)):
        out.append(jnp.pad(jnp.asarray(batch[key]), ((0, 0), (0, pad)), constant_values=fill))
    return tuple(out)


def bench_sample(config, *, steps: int, warmup: int, slices: int = 2, num_steps: int = 50) -> dict:
    """Slices/s of the CFG flow-matching sampler (3 passes per Euler step) with the KV cache on and off."""
    budget = PackBudget.from_config(config.data.pack)
    model_config = resolve_kernels(config.model)
    model = build_model(model_config, int(config.train.seed))
    rng = np.random.default_rng(0)
    sources = rng.uniform(-1, 1, size=(slices, *budget.image_size)).astype(np.float32)
    instruction = rng.integers(8, int(config.model.llm.vocab_size), size=12).tolist()
    rows = []
    for use_cache in (True, False):
        sampler = Sampler(model, SpecialTokens(*SPECIAL_IDS), budget.image_size, budget.vit_image_size,
                          SamplerConfig(num_steps=num_steps, use_cache=use_cache))

        def run(sampler=sampler):
            jax.block_until_ready(sampler.generate(sources, instruction, batch_size=slices))

        start = time.perf_counter()
        run()  # compiles
        first = time.perf_counter() - start
        times = timed(run, steps, max(0, warmup - 1))
        median = statistics.median(times)
        rows.append({"name": f"kv_cache_{'on' if use_cache else 'off'}", "kv_cache": use_cache,
                     "batch_slices": slices, "first_call_s": first, "batch_time_s": median,
                     "slices_per_s": slices / median, "ms_per_slice": 1e3 * median / slices})
    return {"name": "sample", "num_steps": num_steps, "cfg": "text 4.0 / image 1.5, text_channel renorm (3 passes)",
            "kernels": model_config.kernels.summary,
            "image_size": list(budget.image_size), "results": rows,
            "cache_speedup": rows[1]["batch_time_s"] / rows[0]["batch_time_s"]}
