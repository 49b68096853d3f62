"""Throughput of the jitted batched SSIM against a scikit-image loop on the same CPU.

Usage:
    python -m tools.bench_metrics [--n 16,64] [--size 64,128,256] [--repeats 5] [--json OUT.json]

Every (batch size, image size) pair is one row. Both sides get the same float32 images (a random target
and a noisy prediction in [0, 1], data_range 1). The JAX side is compiled and run once before timing
(the first call's time is reported separately) and timed blocking on the result; the scikit-image side
is ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` in a Python
loop over the same images. Each side reports the best of ``--repeats`` runs, the least disturbed by
other processes on a shared machine; the two sides of a row alternate, so a load change hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from skimage.metrics import structural_similarity

from synermedgen_jax.accounting import hlo
from synermedgen_jax.evaluation.metrics import ssim


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(n: int, size: int, repeats: int = 5, seed: int = 0) -> dict:
    """One row: images/s of scikit-image's loop and of ``metrics.ssim`` on ``n`` images ``size x size``."""
    rng = np.random.default_rng(seed)
    shape = (n, size, size)
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
    t_jax = t_sk = float("inf")
    for _ in range(repeats):  # alternate the sides so that a change of machine load hits both
        t_sk = min(t_sk, _best_time(run_skimage, 1))
        t_jax = min(t_jax, _best_time(run_jax, 1))
    return {
        "n": n, "size": size, "repeats": repeats,
        "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "skimage_s": t_sk, "jax_s": t_jax, "jax_first_call_s": compile_s,
        "skimage_images_per_s": n / t_sk, "jax_images_per_s": n / t_jax,
        "speedup": t_sk / t_jax,
        "max_abs_diff": float(np.max(np.abs(out_jax.astype(np.float64) - out_sk))),
    }


def fusion_summary(n: int, size: int) -> list[str]:
    """The fusions XLA compiles for ``ssim`` on ``n`` images ``size x size``: one line each, name and output
    shape. The design expects, per lax.map step, four first-pass fusions (or one multi-output fusion) writing
    ``[4, C, H, W-10]`` and one fusion for the second pass + SSIM formula, then the ``dot`` for the mean; a
    second-pass fusion reading the raw images instead would mean XLA recomputes the first pass per tap."""
    x = jnp.zeros((n, size, size), jnp.float32)
    text = jax.jit(lambda a, b: ssim(a, b, data_range=1.0)).lower(x, x).compile().as_text()
    found = hlo.instructions(text, {"fusion", "dot", "copy"})
    return [f"{name}: {opcode} -> {out_type}" for name, out_type, opcode in found if "wrapped" not in name]


def print_table(rows: list[dict]) -> None:
    """Prints the rows of :func:`measure` as a fixed-width table."""
    if rows:
        r = rows[0]
        print(f"SSIM, float32 images, backend {r['backend']}, {r['cpu_count']} CPUs, best of {r['repeats']}")
    print(f"{'n':>5}{'size':>6}{'skimage img/s':>15}{'jax img/s':>12}{'speed-up':>10}{'max |diff|':>12}"
          f"{'first call s':>14}")
    for r in rows:
        print(f"{r['n']:>5}{r['size']:>6}{r['skimage_images_per_s']:>15.1f}{r['jax_images_per_s']:>12.1f}"
              f"{r['speedup']:>9.1f}x{r['max_abs_diff']:>12.1e}{r['jax_first_call_s']:>14.2f}")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=_int_list, default=[64], help="images per batch, comma-separated (default 64)")
    ap.add_argument("--size", type=_int_list, default=[256],
                    help="image height and width, comma-separated (default 256)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side; the best counts (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for the images")
    ap.add_argument("--json", metavar="OUT", help="also write the rows to this JSON file ({\"rows\": [...]})")
    ap.add_argument("--fusions", action="store_true",
                    help="also print the fusions XLA compiled for the first (n, size) pair")
    args = ap.parse_args(argv)
    if min(args.n) < 1 or min(args.size) < 11 or args.repeats < 1:
        ap.error("--n and --repeats must be >= 1 and --size >= 11 (the SSIM window)")

    rows = [measure(n, size, args.repeats, args.seed) for size in args.size for n in args.n]
    print_table(rows)
    if args.fusions:
        print(f"\nXLA fusions for n={args.n[0]}, size={args.size[0]}:")
        print("\n".join(f"  {line}" for line in fusion_summary(args.n[0], args.size[0])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
