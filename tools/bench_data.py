"""Data-pipeline throughput: records/s and packs/s, in-process vs Grain workers.

The code is synermedgen_jax/benchmark/data.py.
Run from the repository root: ``python -m tools.bench_data [--help]``.
"""

from synermedgen_jax.benchmark.data import main

if __name__ == "__main__":
    raise SystemExit(main())
