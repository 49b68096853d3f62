"""XLA's compiled FLOPs of a forward+backward next to the analytic single-expert count.

The code is synermedgen_jax/benchmark/model_flops.py.
Run from the repository root: ``python -m tools.model_flops [--help]``.
"""

from synermedgen_jax.benchmark.model_flops import main

if __name__ == "__main__":
    raise SystemExit(main())
