"""Images/s of the jitted batched SSIM vs scikit-image's loop.

The code is synermedgen_jax/benchmark/metrics.py.
Run from the repository root: ``python -m tools.bench_metrics [--help]``.
"""

import os

# The comparison is against scikit-image on this CPU; an installed but unusable CUDA plugin must not pick another
# backend (or print its failure). Set before jax is imported, which reads it; an explicit JAX_PLATFORMS still wins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from synermedgen_jax.benchmark.metrics import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
