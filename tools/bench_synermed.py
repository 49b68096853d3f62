"""Throughput and memory of `build-data --source synermed` on a simulated release.

The code is synermedgen_jax/benchmark/synermed.py.
Run from the repository root: ``python -m tools.bench_synermed [--help]``.
"""

from synermedgen_jax.benchmark.synermed import main

if __name__ == "__main__":
    raise SystemExit(main())
