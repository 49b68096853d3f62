"""Run the compiled Pallas kernels on this machine's accelerator against the jnp references.

Unlike the test suite (interpret mode on CPU), this compiles the real kernels (``impl="pallas"``: Triton on a
GPU, Mosaic on a TPU) and compares them, forward and backward, with the jnp references computed in float32
at ``highest`` matmul precision on the same (dtype-rounded) inputs. It covers BAGEL's packed split masks
(causal text, full ViT/VAE splits, noise splits, several samples per row, padding, rows that see nothing),
GQA, head_dim 64/72/128, sequence lengths that are not multiples of the tiles, several tile sizes, and the
flow-matching kernels (noising, velocity MSE, CFG + Euler with each renorm). Fresh random values each run
(``--seed``). Prints one line per case and a pass/fail table; exits 1 when a case fails or raises.

Errors are ``max |kernel − reference|``; a case passes when, for every output, that error is at most
``tol · max(max |reference|, 1)`` (attention tol: 2e-4 for float32 traced at ``highest`` precision (IEEE
dots), 3e-3 for float32 at the default precision ("tf32": Triton and XLA use TF32 tensor cores on GPU), 3e-2 for
bfloat16; flow matching: 1e-5 float32, 1e-2 bfloat16).

Usage::

    python -m tools.gpu_kernel_check                     # on a GPU/TPU machine
    python -m tools.gpu_kernel_check --quick             # a few small cases
    python -m tools.gpu_kernel_check --interpret --quick # same code path on CPU, interpret mode (slow)
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from synermedgen_jax.kernels import flow_matching as fm
from synermedgen_jax.kernels.attention import packed_attention, reference_attention
from synermedgen_jax.kernels.attention.pallas import BlockSizes
from synermedgen_jax.kernels.attention.tile_math import FULL, NOISE
from synermedgen_jax.kernels.synthetic_packs import (
    GEN,
    UND,
    causal_samples,
    layout_pack,
    random_samples,
    stage1_samples,
    stage2_samples,
)

TOL = {"float32": 2e-4, "tf32": 3e-3, "bfloat16": 3e-2}
FM_TOL = {"float32": 1e-5, "bfloat16": 1e-2}


# ------------------------------------------------------------------------------------------------ packs


def _pack(kind: str, seq_len: int, rng: np.random.Generator):
    unit = max(seq_len // 32, 1)
    if kind == "stage2":  # 4 x (prompt + ViT source + clean VAE + noised VAE target), und then gen region
        return layout_pack(stage2_samples(4, unit, 2 * unit, 2 * unit), seq_len)
    if kind == "stage1":  # 8 x (question + ViT + answer)
        return layout_pack(stage1_samples(8, 3 * unit // 4, 2 * unit, max(unit // 4, 1)), seq_len)
    if kind == "causal":
        return layout_pack(causal_samples(1, seq_len), seq_len)
    if kind == "docs":
        return layout_pack(causal_samples(4, seq_len // 4), seq_len)
    if kind == "full":  # one bidirectional split (a ViT image alone)
        return layout_pack([[(FULL, seq_len, UND)]], seq_len)
    if kind == "blind":  # a noise split with padding around: padding rows see nothing
        return layout_pack([[(NOISE, seq_len // 3, GEN)]], seq_len, region_gap=seq_len // 3)
    if kind == "random":
        gap = int(rng.integers(0, 9))  # the samples leave room for the gap between the two regions
        return layout_pack(random_samples(rng, seq_len - gap), seq_len, region_gap=gap)
    raise ValueError(kind)


def _meta(kinds: tuple[str, ...], seq_len: int, rng):
    rows = [_pack(k, seq_len, rng) for k in kinds]
    return tuple(jnp.asarray(np.stack(x)) for x in zip(*rows))


# ------------------------------------------------------------------------------------------- attention


def _attention_case(name, kinds, seq_len, hq, hkv, dim, dtype, sizes, impl, seed):
    """``dtype``: jnp.float32 (kernel traced at ``highest`` precision: IEEE float32 dots), "tf32" (float32 at the
    default precision, which on GPU lets Triton and XLA use TF32 tensor cores) or jnp.bfloat16."""
    label = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    precision = "highest" if label == "float32" else None
    dtype = jnp.float32 if label == "tf32" else dtype
    rng = np.random.default_rng(seed)
    meta = _meta(kinds, seq_len, rng)
    batch = len(kinds)
    q = jnp.asarray(rng.normal(size=(batch, seq_len, hq, dim)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(batch, seq_len, hkv, dim)), dtype) for _ in range(2))
    w = jnp.asarray(rng.normal(size=(batch, seq_len, hq, dim)), dtype)  # random cotangent

    def vjp(fn, q, k, v, w):
        out, pullback = jax.vjp(fn, q, k, v)
        return (out, *pullback(w.astype(out.dtype)))

    kernel = jax.jit(lambda q, k, v, w: vjp(
        lambda q, k, v: packed_attention(q, k, v, *meta, impl=impl, block_sizes=sizes), q, k, v, w))
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(lambda q, k, v, w: vjp(lambda q, k, v: reference_attention(q, k, v, *meta), q, k, v, w))
        expected = ref(*(x.astype(jnp.float32) for x in (q, k, v, w)))
    with jax.default_matmul_precision(precision):
        got = kernel(q, k, v, w)
    tol = TOL[label]
    errs, rels, finite = {}, {}, True
    for output, g, r in zip(("out", "dq", "dk", "dv"), got, expected):
        g32 = np.asarray(g.astype(jnp.float32))
        r32 = np.asarray(r)
        finite &= bool(np.all(np.isfinite(g32)))
        errs[output] = float(np.max(np.abs(g32 - r32)))
        rels[output] = errs[output] / max(float(np.max(np.abs(r32))), 1.0)
    # Rows that see nothing (padding) must give exact zeros, forward and backward.
    blind = np.asarray(meta[0] < 0)
    zeros_ok = bool(np.all(np.asarray(got[0].astype(jnp.float32))[blind] == 0)
                    and np.all(np.asarray(got[1].astype(jnp.float32))[blind] == 0))
    ok = finite and zeros_ok and all(r <= tol for r in rels.values())
    blocks = "default" if sizes is None else f"{sizes.block_q}x{sizes.block_k}/{sizes.block_q_bwd}x{sizes.block_k_bwd}"
    return dict(kind="attention", case=name, B=batch, T=seq_len, Hq=hq, Hkv=hkv, D=dim, dtype=label,
                blocks=blocks, **{f"err_{k}": v for k, v in errs.items()}, worst_rel=max(rels.values()), tol=tol,
                finite=finite, padding_zero=zeros_ok, ok=ok)


def attention_cases(quick: bool):
    b64 = BlockSizes(64, 64, 64, 64)
    b128 = BlockSizes(128, 128, 64, 128, num_warps=8, num_stages=2)
    b32 = BlockSizes(32, 32, 32, 32, num_warps=4, num_stages=2)
    cases = [
        # name, kinds per batch row, T, Hq, Hkv, D, dtype, block sizes
        ("stage2 GQA7:1 D128", ("stage2",), 1024, 7, 1, 128, jnp.float32, None),
        ("stage2 GQA7:1 D128", ("stage2",), 1024, 7, 1, 128, jnp.bfloat16, None),
        ("random B2 odd T GQA3:1 D64", ("random", "random"), 777, 6, 2, 64, jnp.float32, None),
        ("random B2 odd T GQA3:1 D64", ("random", "random"), 777, 6, 2, 64, jnp.bfloat16, None),
        ("SigLIP full D72 T729", ("full",), 729, 4, 4, 72, jnp.bfloat16, None),
    ]
    if quick:
        return cases
    return cases + [
        ("stage2 GQA7:1 D128", ("stage2",), 1024, 7, 1, 128, "tf32", None),
        ("stage1 MHA D64", ("stage1",), 1024, 8, 8, 64, jnp.bfloat16, None),
        ("causal odd T GQA2:1 D128", ("causal",), 1000, 4, 2, 128, "tf32", None),
        ("causal odd T GQA2:1 D128", ("causal",), 1000, 4, 2, 128, jnp.bfloat16, None),
        ("docs+blind B2 D128", ("docs", "blind"), 640, 4, 1, 128, jnp.bfloat16, None),
        ("SigLIP full D72 T729", ("full",), 729, 4, 4, 72, jnp.float32, None),
        ("stage2 BAGEL-7B heads 28:4 D128", ("stage2",), 2048, 28, 4, 128, jnp.bfloat16, None),
        ("random B3 T333 tiles 32", ("random",) * 3, 333, 4, 2, 64, jnp.float32, b32),
        ("random B3 T333 tiles 32", ("random",) * 3, 333, 4, 2, 64, jnp.bfloat16, b32),
        ("stage2 tiles 64", ("stage2", "random"), 1500, 8, 2, 128, jnp.bfloat16, b64),
        ("stage2 tiles 128", ("stage2", "random"), 1500, 8, 2, 128, jnp.bfloat16, b128),
    ]


# ---------------------------------------------------------------------------------------- flow matching


def _rel(got, want):
    got, want = np.asarray(jnp.asarray(got, jnp.float32)), np.asarray(jnp.asarray(want, jnp.float32))
    return float(np.max(np.abs(got - want))), float(np.max(np.abs(got - want))) / max(float(np.max(np.abs(want))), 1.0)


def _fm_case(name, n, c, dtype, fn, impl, seed):
    rng = np.random.default_rng(seed)
    arrays = [jnp.asarray(rng.normal(size=(n, c)), dtype) for _ in range(4)]
    t = jnp.asarray(rng.uniform(size=(n,)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(n,)) < 0.7)
    pairs = fn(arrays, t, mask, impl)
    tol = FM_TOL[jnp.dtype(dtype).name]
    errs = {label: _rel(g, r) for label, (g, r) in pairs.items()}
    finite = all(bool(np.all(np.isfinite(np.asarray(jnp.asarray(g, jnp.float32))))) for g, _ in pairs.values())
    worst = max(r for _, r in errs.values())
    return dict(kind="flow_matching", case=name, N=n, C=c, dtype=jnp.dtype(dtype).name,
                **{f"err_{k}": a for k, (a, _) in errs.items()}, worst_rel=worst, tol=tol, finite=finite,
                ok=finite and worst <= tol)


def _noised(arrays, t, mask, impl):
    x0, noise, g, _ = arrays

    def run(which):
        fn = lambda x0, noise, t: fm.noised_latents(x0, noise, t, impl=which)
        out, pullback = jax.vjp(fn, x0, noise, t)
        return (out, *pullback(g.astype(out.dtype)))

    got = jax.jit(lambda: run(impl))()
    with jax.default_matmul_precision("highest"):
        want = jax.jit(lambda: run("reference"))()
    return dict(zip(("out", "dx0", "dnoise", "dt"), zip(got, want)))


def _mse(arrays, t, mask, impl):
    pred, x0, noise, _ = arrays

    def run(which):
        return jax.value_and_grad(lambda p, a, b: fm.velocity_mse_sum(p, a, b, mask, impl=which),
                                  argnums=(0, 1, 2))(pred, x0, noise)

    (loss, grads) = jax.jit(lambda: run(impl))()
    (ref_loss, ref_grads) = jax.jit(lambda: run("reference"))()
    # The loss is a sum over N tokens: compare it per token.
    n = pred.shape[0]
    return dict(loss_per_token=(loss / n, ref_loss / n), dpred=(grads[0], ref_grads[0]), dx0=(grads[1], ref_grads[1]),
                dnoise=(grads[2], ref_grads[2]))


def _step(renorm, cfg_img, t_value):
    def fn(arrays, t, mask, impl):
        x, v, vt, vi = arrays
        vt = (v.astype(jnp.float32) + 0.5 * vt.astype(jnp.float32)).astype(v.dtype)
        kwargs = dict(cfg_text=4.0, cfg_img=cfg_img, cfg_interval=(0.1, 1.0), renorm=renorm, renorm_min=0.0)
        step = lambda which: jax.jit(lambda x, v, vt, vi, t: fm.cfg_euler_step(
            x, v, vt, vi, t, 0.02, impl=which, **kwargs))(x, v, vt, vi, jnp.float32(t_value))
        return dict(x_next=(step(impl), step("reference")))

    return fn


def flow_matching_cases(quick: bool):
    cases = [("noised_latents", _noised), ("velocity_mse_sum", _mse),
             ("cfg_euler text_channel", _step("text_channel", 1.5, 0.6))]
    if not quick:
        cases += [("cfg_euler channel", _step("channel", 1.5, 0.6)), ("cfg_euler global", _step("global", 1.5, 0.6)),
                  ("cfg_euler global cfg_img=1", _step("global", 1.0, 0.6)),
                  ("cfg_euler outside interval", _step("text_channel", 1.5, 0.05))]
    shapes = [(1000, 64, jnp.float32), (1000, 64, jnp.bfloat16), (333, 48, jnp.float32)]
    if not quick:
        shapes += [(4096, 64, jnp.bfloat16), (333, 48, jnp.bfloat16)]
    return [(name, n, c, dtype, fn) for name, fn in cases for n, c, dtype in shapes]


# ------------------------------------------------------------------------------------------------- main


def _format(row: dict) -> str:
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few small cases only")
    parser.add_argument("--interpret", action="store_true", help="interpret-mode kernels (runs on CPU)")
    parser.add_argument("--only", choices=("attention", "flow_matching"), help="one kernel family only")
    parser.add_argument("--seed", type=int, default=None, help="value seed (default: fresh each run)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    impl = "pallas_interpret" if args.interpret else "pallas"
    print(f"# platform={jax.default_backend()} devices={jax.devices()} jax={jax.__version__} impl={impl} seed={seed}",
          flush=True)
    jobs = []
    if args.only in (None, "attention"):
        cases = attention_cases(args.quick)
        if args.interpret:  # interpret mode is slow: an eighth of T (odd lengths stay odd)
            cases = [(*c[:2], max(64, c[2] // 8) | (c[2] & 1), *c[3:]) for c in cases]
        jobs += [(c[0], lambda c=c, i=i: _attention_case(*c, impl, seed + i)) for i, c in enumerate(cases)]
    if args.only in (None, "flow_matching"):
        jobs += [(c[0], lambda c=c, i=i: _fm_case(*c, impl, seed + 1000 + i))
                 for i, c in enumerate(flow_matching_cases(args.quick))]
    rows = []
    for name, job in jobs:
        start = time.perf_counter()
        try:
            row = job()
        except Exception as e:  # noqa: BLE001 (report every case, then fail)
            traceback.print_exc()
            row = dict(case=name, ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(("PASS " if row["ok"] else "FAIL ") + _format(row), flush=True)
    failed = [r for r in rows if not r["ok"]]
    print(f"\n# {len(rows) - len(failed)}/{len(rows)} passed")
    print(f"{'result':6} {'kind':13} {'case':34} {'shape':28} {'dtype':8} {'worst rel':>9} {'max abs errors'}")
    for r in rows:
        shape = (f"B{r['B']} T{r['T']} H{r['Hq']}/{r['Hkv']} D{r['D']} {r['blocks']}" if r.get("kind") == "attention"
                 else f"N{r.get('N')} C{r.get('C')}")
        errs = " ".join(f"{k[4:]}={v:.2e}" for k, v in r.items() if k.startswith("err_"))
        print(f"{'PASS' if r['ok'] else 'FAIL':6} {r.get('kind', '?'):13} {r['case'][:34]:34} {shape[:28]:28} "
              f"{r.get('dtype', '?'):8} {r.get('worst_rel', float('nan')):9.2e} {errs or r.get('error', '')}")
    if args.json:
        args.json.write_text(json.dumps(dict(platform=jax.default_backend(), seed=seed, rows=rows), indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
