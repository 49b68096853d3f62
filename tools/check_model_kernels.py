"""Model loss and every gradient: fused kernels vs the jnp reference.

The code is synermedgen_jax/benchmark/model_kernel_check.py.
Run from the repository root: ``python -m tools.check_model_kernels [--help]``.
"""

from synermedgen_jax.benchmark.model_kernel_check import main

if __name__ == "__main__":
    raise SystemExit(main())
