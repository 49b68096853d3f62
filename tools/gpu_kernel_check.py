"""Each compiled Pallas kernel vs its jnp reference on fresh random values: a pass/fail table.

The code is synermedgen_jax/benchmark/kernel_check.py.
Run from the repository root: ``python -m tools.gpu_kernel_check [--help]``.
"""

from synermedgen_jax.benchmark.kernel_check import main

if __name__ == "__main__":
    raise SystemExit(main())
