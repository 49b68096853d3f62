"""ml_collections configs: ``get_config(variant)`` in each file (see synermedgen_jax/config.py)."""
