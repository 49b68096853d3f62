"""The stage-0 VAE's ceiling and a local latent map's score per synthesis route.

The code is synermedgen_jax/evaluation/ceiling.py.
Run from the repository root: ``python -m tools.vae_ceiling [--help]``.
"""

from synermedgen_jax.evaluation.ceiling import main

if __name__ == "__main__":
    raise SystemExit(main())
