"""Peak host memory of each process of a multi-process run, at init and at restore.

The code is synermedgen_jax/benchmark/host_memory.py.
Run from the repository root: ``python -m tools.host_memory [--help]``.
"""

from synermedgen_jax.benchmark.host_memory import main

if __name__ == "__main__":
    raise SystemExit(main())
