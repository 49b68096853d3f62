"""Images/s of the jitted batched SSIM vs scikit-image's loop.

The code is synermedgen_jax/benchmark/metrics.py.
Run from the repository root: ``python -m tools.bench_metrics [--help]``.
"""

from synermedgen_jax.benchmark.metrics import main

if __name__ == "__main__":
    raise SystemExit(main())
