"""Throughput of the jitted batched SSIM against a scikit-image loop on the same CPU.

Usage:
    python3 tools/bench_metrics.py --n 64 --size 256 [--repeats 5] [--json OUT.json]

Both sides get the same float32 images (a random target and a noisy prediction in [0, 1],
data_range 1). The JAX side is timed after compilation, blocking on the result; each side reports the
best of ``--repeats`` runs, which is the least disturbed by other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="images per batch (default 64)")
    ap.add_argument("--size", type=int, default=256, help="image height and width (default 256)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side; the best counts (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for the images")
    ap.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.n < 1 or args.size < 11 or args.repeats < 1:
        ap.error("--n and --repeats must be >= 1 and --size >= 11 (the SSIM window)")

    # The comparison is against scikit-image on this CPU; an installed but unusable CUDA plugin must not
    # pick another backend (or print its failure). An explicit JAX_PLATFORMS still wins.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    from skimage.metrics import structural_similarity

    from synermedgen_jax.evaluation.metrics import ssim

    rng = np.random.default_rng(args.seed)
    shape = (args.n, args.size, args.size)
    target = rng.random(shape, dtype=np.float32)
    pred = np.clip(target + 0.1 * rng.standard_normal(shape), 0.0, 1.0).astype(np.float32)

    def run_skimage() -> np.ndarray:
        return np.array([
            structural_similarity(p, t, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=1.0)
            for p, t in zip(pred, target)
        ])

    xp, xt = jnp.asarray(pred), jnp.asarray(target)

    def run_jax() -> jax.Array:
        return ssim(xp, xt, data_range=1.0).block_until_ready()

    t0 = time.perf_counter()
    out_jax = np.asarray(run_jax())
    compile_s = time.perf_counter() - t0
    out_sk = run_skimage()
    t_jax = _best_time(run_jax, args.repeats)
    t_sk = _best_time(run_skimage, args.repeats)

    result = {
        "n": args.n, "size": args.size, "repeats": args.repeats,
        "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "skimage_s": t_sk, "jax_s": t_jax, "jax_first_call_s": compile_s,
        "skimage_images_per_s": args.n / t_sk, "jax_images_per_s": args.n / t_jax,
        "speedup": t_sk / t_jax,
        "max_abs_diff": float(np.max(np.abs(out_jax.astype(np.float64) - out_sk))),
    }
    print(f"SSIM on {args.n} x {args.size} x {args.size} float32, backend {result['backend']}, "
          f"{result['cpu_count']} CPUs, best of {args.repeats}")
    print(f"{'implementation':<26}{'seconds':>10}{'images/s':>12}")
    print(f"{'scikit-image loop':<26}{t_sk:>10.4f}{result['skimage_images_per_s']:>12.1f}")
    print(f"{'jax ssim (jitted, batched)':<26}{t_jax:>10.4f}{result['jax_images_per_s']:>12.1f}")
    print(f"speed-up {result['speedup']:.2f}x   max |diff| {result['max_abs_diff']:.2e}   "
          f"first call (compile) {compile_s:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
