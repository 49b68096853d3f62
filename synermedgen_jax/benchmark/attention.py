"""Benchmark and check the fused packed-split attention kernel.

On CPU (or with ``--mode cpu``): for typical packs, prints the fraction of ``block_q × block_k`` blocks the
kernels compute (from the block map) next to the ideal fraction (blocks holding at least one visible pair,
brute force from the dense mask), and the max error of the interpret-mode kernels against the jnp reference
(forward and gradients) on scaled-down copies of the packs.

On a GPU or TPU (``--mode accelerator``): median wall time (ms) and TFLOP/s of ``pallas`` vs ``xla_dense`` vs
``reference`` (and, on GPU, ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` with the dense
mask as a bias; ``xla_dense`` is the same call with XLA's implementation) at T = 4k, 8k, 16k (head_dim 128,
GQA 7:1, bf16), forward and forward+backward. FLOPs count only the visible (query, key) pairs: forward
4·D·Hq per pair, forward+backward 3.5× that (the usual flash-attention convention), the same numerator for
every implementation so the numbers compare. ``--sweep`` times the Pallas kernel over a few tile sizes at
the first ``--seq-lens`` value.

Usage::

    python -m tools.bench_attention                       # CPU checks + block-skip fractions
    python -m tools.bench_attention --mode accelerator --seq-lens 4096 8192 16384 --json out.json
    python -m tools.bench_attention --mode accelerator --no-check --impls pallas cudnn xla_dense
    python -m tools.bench_attention --mode accelerator --no-check --sweep --seq-lens 8192
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from synermedgen_jax.kernels.attention import packed_attention, visibility_mask
from synermedgen_jax.kernels.attention.block_map import block_skip_fraction
from synermedgen_jax.kernels.attention.pallas import BlockSizes, default_block_sizes
from synermedgen_jax.kernels.attention.tile_math import CAUSAL, NOISE
from synermedgen_jax.kernels.synthetic_packs import (
    causal_samples,
    layout_pack,
    stage1_samples,
    stage2_samples,
)


def typical_packs(seq_len: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Packs filling about 7/8 of ``seq_len`` (rest padding), ``[1, T]`` metadata each."""
    unit = seq_len // 32  # 128 tokens at T = 4096
    return {
        # 4 samples x (prompt + ViT source + clean VAE source + noised VAE target); und region, then gen region.
        "stage2_4x(text+vit+vae+noise)": layout_pack(stage2_samples(4, unit, 2 * unit, 2 * unit), seq_len),
        # 8 understanding samples x (question + ViT image + answer), und region only.
        "stage1_8x(text+vit+answer)": layout_pack(stage1_samples(8, 3 * unit // 4, 2 * unit, unit // 4), seq_len),
        "causal_1x": layout_pack(causal_samples(1, seq_len), seq_len),
        "causal_4x_docs": layout_pack(causal_samples(4, seq_len // 4), seq_len),
    }


def _batch(meta):
    return tuple(jnp.asarray(x[None]) for x in meta)


def ideal_fraction(meta, block_q: int, block_k: int) -> float:
    """Brute force: fraction of blocks holding a visible pair, from the dense mask one query block at a time."""
    sample, split, kind = meta
    t = sample.shape[0]
    hits = 0
    for start in range(0, t, block_q):
        rows = slice(start, start + block_q)
        mask = _mask_rows(sample, split, kind, rows)
        hits += int(mask.reshape(-1, t // block_k, block_k).any(axis=(0, 2)).sum())
    return hits / ((t // block_q) * (t // block_k))


def _mask_rows(sample, split, kind, rows: slice) -> np.ndarray:
    """numpy visibility of query rows ``rows`` against all keys (the rule of ``attention.visibility_mask``)."""
    pos = np.arange(sample.shape[0])
    qs, qp, qk, qpos = (x[rows, None] for x in (sample, split, kind, pos))
    same_sample = (qs == sample[None]) & (qs >= 0)
    causal_ok = (qk != CAUSAL) | (pos[None] <= qpos)
    context = (split[None] < qp) & (kind[None] != NOISE)
    return same_sample & (((split[None] == qp) & causal_ok) | context)


def skip_report(seq_len: int, sizes: dict[str, BlockSizes]) -> list[dict]:
    rows = []
    for name, meta in typical_packs(seq_len).items():
        for label, bs in sizes.items():
            for phase, (bq, bk) in (("fwd", (bs.block_q, bs.block_k)), ("bwd", (bs.block_q_bwd, bs.block_k_bwd))):
                computed = float(block_skip_fraction(*_batch(meta), bq, bk))
                rows.append(dict(pack=name, T=seq_len, blocks=f"{label}:{phase}:{bq}x{bk}", computed=computed,
                                 ideal=ideal_fraction(meta, bq, bk)))
    return rows


def _inputs(meta, num_q_heads, num_kv_heads, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    t = meta[0].shape[-1]
    q = jnp.asarray(rng.normal(size=(1, t, num_q_heads, head_dim)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(1, t, num_kv_heads, head_dim)), dtype) for _ in range(2))
    return q, k, v


def cudnn_dense_attention(q, k, v, sample_id, split_id, split_kind):
    """cuDNN's fused attention with the dense mask (as a bias); rows that see nothing give zeros."""
    mask = visibility_mask(sample_id, split_id, split_kind)[:, None]  # [B, 1, Tq, Tk]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    return jnp.where(jnp.any(mask, axis=-1)[:, 0, :, None, None], out, 0).astype(q.dtype)


def _attend(q, k, v, meta, impl, block_sizes=None):
    if impl == "cudnn":
        return cudnn_dense_attention(q, k, v, *meta)
    return packed_attention(q, k, v, *meta, impl=impl, block_sizes=block_sizes)


def _fwd_bwd(impl, meta, block_sizes=None):
    def loss(q, k, v):
        return jnp.sum(_attend(q, k, v, meta, impl, block_sizes).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def correctness_report(seq_len: int, impl: str = "pallas_interpret", block_sizes: BlockSizes | None = None,
                       head_dims: tuple[int, ...] = (64,), dtypes: tuple = (jnp.float32,)) -> list[dict]:
    """A Pallas kernel vs the jnp reference on typical packs (GQA 7:1): forward and gradients.

    On CPU the interpret-mode kernel runs on scaled-down packs with 32x32 tiles; on an accelerator the compiled
    kernel (``impl="pallas"``) runs with the platform's tiles. The reference runs at ``highest`` matmul precision
    in float32 (no TF32), so the errors reported are the kernel's own; bf16 inputs are compared against the
    float32 reference on the same (rounded) inputs.
    """
    rows = []
    for head_dim in head_dims:
        for dtype in dtypes:
            for name, meta in typical_packs(seq_len).items():
                meta = _batch(meta)
                q, k, v = _inputs(meta, 7, 1, head_dim, dtype, seed=len(rows) + 1)
                with jax.default_matmul_precision("highest"):
                    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
                    ref_out = jax.jit(lambda q, k, v, m=meta: packed_attention(q, k, v, *m, impl="reference"))(*f32)
                    _, ref_grads = _fwd_bwd("reference", meta)(*f32)
                # float32 kernels at "highest" too (IEEE dots): the default lets GPUs use TF32.
                with jax.default_matmul_precision("highest" if dtype == jnp.float32 else None):
                    out = jax.jit(lambda q, k, v, m=meta: packed_attention(
                        q, k, v, *m, impl=impl, block_sizes=block_sizes))(q, k, v)
                    _, grads = _fwd_bwd(impl, meta, block_sizes)(q, k, v)
                grad_err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r))) for g, r in zip(grads, ref_grads))
                grad_scale = max(float(jnp.max(jnp.abs(r))) for r in ref_grads)
                rows.append(dict(pack=name, impl=impl, T=seq_len, head_dim=head_dim, dtype=jnp.dtype(dtype).name,
                                 fwd_max_err=float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out))),
                                 grad_max_err=grad_err, grad_max_abs=grad_scale,
                                 any_nan=bool(any(jnp.any(jnp.isnan(g)) for g in grads))))
    return rows


def _median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


SWEEP = (  # block_q, block_k, block_q_bwd, block_k_bwd, num_warps, num_stages (the backward's: the same)
    BlockSizes(128, 64, 64, 64, 8, 2), BlockSizes(128, 64, 64, 64, 4, 3), BlockSizes(128, 128, 64, 64, 8, 2),
    BlockSizes(128, 128, 64, 64, 8, 3), BlockSizes(64, 64, 64, 64, 4, 2), BlockSizes(128, 64, 64, 128, 8, 2),
    BlockSizes(128, 64, 128, 64, 8, 2), BlockSizes(64, 128, 32, 64, 4, 2),
)


def timing_report(seq_lens, repeats: int, impls, sweep: tuple[BlockSizes, ...] = ()) -> list[dict]:
    """Timings of ``impls`` (or, with ``sweep``, of ``pallas`` at each of those tile sizes)."""
    rows = []
    num_q_heads, num_kv_heads, head_dim = 28, 4, 128  # BAGEL-7B: GQA 7:1
    variants = [(f"pallas{b.block_q}x{b.block_k}/{b.block_q_bwd}x{b.block_k_bwd}w{b.num_warps}s{b.num_stages}"
                 + (f"/bwd:w{b.num_warps_bwd}s{b.num_stages_bwd}" if b.num_warps_bwd else ""), "pallas", b)
                for b in sweep] or [(impl, impl, None) for impl in impls]
    for seq_len in seq_lens:
        for pack_name in ("stage2_4x(text+vit+vae+noise)", "causal_1x"):
            meta_np = typical_packs(seq_len)[pack_name]
            meta = _batch(meta_np)
            pairs = float(jnp.sum(visibility_mask(*meta)))
            fwd_flops = 4.0 * head_dim * num_q_heads * pairs
            q, k, v = _inputs(meta, num_q_heads, num_kv_heads, head_dim, jnp.bfloat16)
            for label, impl, sizes in variants:
                fwd = jax.jit(lambda q, k, v, i=impl, m=meta, b=sizes: _attend(q, k, v, m, i, b))
                for phase, fn, flops in (("fwd", fwd, fwd_flops),
                                         ("fwd+bwd", _fwd_bwd(impl, meta, sizes), 3.5 * fwd_flops)):
                    try:
                        ms = _median_ms(fn, (q, k, v), repeats)
                        rows.append(dict(T=seq_len, pack=pack_name, impl=label, phase=phase, ms=ms,
                                         tflops=flops / (ms * 1e-3) / 1e12))
                    except Exception as e:  # noqa: BLE001 (e.g. the dense reference running out of memory)
                        rows.append(dict(T=seq_len, pack=pack_name, impl=label, phase=phase,
                                         error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
                    print(_format(rows[-1]), flush=True)
    return rows


def _format(row: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--mode", choices=("auto", "cpu", "accelerator"), default="auto",
                        help="auto: accelerator timings on GPU/TPU, CPU checks otherwise")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384],
                        help="sequence lengths for timings and block-skip fractions")
    parser.add_argument("--check-seq-len", type=int, default=256,
                        help="T of the correctness check (interpret mode on CPU, compiled kernel on GPU/TPU)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats (median reported)")
    parser.add_argument("--impls", nargs="*", default=["pallas", "xla_dense", "reference"],
                        help="packed_attention impls to time, and/or cudnn (GPU)")
    parser.add_argument("--no-check", action="store_true", help="accelerator mode: skip the correctness check")
    parser.add_argument("--sweep", action="store_true", help="time the Pallas kernel over the SWEEP tile sizes "
                        "(at the first --seq-lens value) instead of --impls")
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file")
    args = parser.parse_args(argv)

    platform = jax.default_backend()
    accelerator = args.mode == "accelerator" or (args.mode == "auto" and platform in ("gpu", "cuda", "tpu"))
    backend = "mosaic" if platform == "tpu" else "triton"
    sizes = {backend: default_block_sizes(backend, 128, interpret=False)}
    if not accelerator:
        sizes = {name: default_block_sizes(name, 128, interpret=False) for name in ("triton", "mosaic")}
    results: dict = {"platform": platform, "devices": [str(d) for d in jax.devices()]}
    print(f"# block-skip fractions (computed by the block map vs ideal), platform={platform}")
    results["block_skip"] = [r for t in args.seq_lens for r in skip_report(t, sizes)]
    for row in results["block_skip"]:
        print(_format(row))
    if accelerator:
        if not args.no_check:
            print(f"# compiled kernel vs reference on {platform} (T={args.check_seq_len}, GQA 7:1; reference f32 "
                  "highest)")
            results["correctness"] = correctness_report(args.check_seq_len, "pallas", None, (64, 128),
                                                        (jnp.float32, jnp.bfloat16))
            for row in results["correctness"]:
                print(_format(row), flush=True)
        print("# timings (median ms, TFLOP/s over visible pairs)")
        seq_lens = args.seq_lens[:1] if args.sweep else args.seq_lens
        results["timings"] = timing_report(seq_lens, args.repeats, args.impls, SWEEP if args.sweep else ())
    else:
        print(f"# interpret-mode kernels vs reference (T={args.check_seq_len}, f32, GQA 7:1, head_dim 64)")
        results["correctness"] = correctness_report(args.check_seq_len, "pallas_interpret", BlockSizes(32, 32, 32, 32))
        for row in results["correctness"]:
            print(_format(row))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
