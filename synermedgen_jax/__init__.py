"""SynerMedGen-JAX: a BAGEL-style unified medical understanding and generation model in JAX/Flax NNX."""

__version__ = "0.1.0"
