"""Sampler throughput with and without the KV cache.

The code is synermedgen_jax/benchmark/sampler.py.
Run from the repository root: ``python -m tools.bench_sampler [--help]``.
"""

from synermedgen_jax.benchmark.sampler import main

if __name__ == "__main__":
    raise SystemExit(main())
