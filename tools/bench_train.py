"""Train-step time and tokens/s on a built dataset.

The code is synermedgen_jax/benchmark/train_on_data.py.
Run from the repository root: ``python -m tools.bench_train [--help]``.
"""

from synermedgen_jax.benchmark.train_on_data import main

if __name__ == "__main__":
    raise SystemExit(main())
