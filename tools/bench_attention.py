"""Packed-split attention: block-skip fractions and interpret-mode checks on CPU, timings of pallas vs
xla_dense vs reference (vs cuDNN) on a GPU/TPU.

The code is synermedgen_jax/benchmark/attention.py.
Run from the repository root: ``python -m tools.bench_attention [--help]``.
"""

from synermedgen_jax.benchmark.attention import main

if __name__ == "__main__":
    raise SystemExit(main())
