"""The generation head: latent patchify, ``vae2llm``, zero-initialised ``llm2vae``, the DiT ``time_embedder``
and the frozen ``latent_pos_embed`` table (BAGEL's names). Noising and the velocity loss are in
kernels/flow_matching.py (fused kernels with jnp references)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from synermedgen_jax.modeling.layers import Linear, timestep_features


class TimestepEmbedder(nnx.Module):
    """256-d ``[cos, sin]`` features → ``mlp_0`` → SiLU → ``mlp_2`` (BAGEL's ``time_embedder.mlp.{0,2}``)."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs, compute_dtype, features: int = 256):
        # Replicated like the rest of the generation head (see SynerMedGen.__init__).
        self.mlp_0 = Linear(features, hidden, axes=(None, None), rngs=rngs, compute_dtype=compute_dtype)
        self.mlp_2 = Linear(hidden, hidden, axes=(None, None), rngs=rngs, compute_dtype=compute_dtype)
        self.features = features

    def __call__(self, t: jax.Array) -> jax.Array:
        """``t [...]`` in [0, 1] → ``[..., hidden]``."""
        return self.mlp_2(jax.nn.silu(self.mlp_0(timestep_features(t, self.features))))


def latent_pos_frequencies(config) -> tuple[float, float]:
    """``(base, step)`` of the ``latent_pos_embed`` sin-cos table of a model config (BAGEL's 10000, 1 when the
    config predates the fields)."""
    return float(config.get("latent_pos_base", 10000.0)), float(config.get("latent_pos_step", 1.0))


def patchify_latents(latents: jax.Array, patch: int) -> jax.Array:
    """``[N, h·p, w·p, z]`` → ``[N, h·w, p·p·z]`` with (p_row, p_col, z) order inside a token (BAGEL's)."""
    n, height, width, channels = latents.shape
    grid = latents.reshape(n, height // patch, patch, width // patch, patch, channels)
    return grid.transpose(0, 1, 3, 2, 4, 5).reshape(n, (height // patch) * (width // patch), -1)


def unpatchify_latents(tokens: jax.Array, rows: int, cols: int, patch: int) -> jax.Array:
    """Inverse of :func:`patchify_latents`: ``[N, rows·cols, p·p·z]`` → ``[N, rows·p, cols·p, z]``."""
    n = tokens.shape[0]
    channels = tokens.shape[-1] // (patch * patch)
    grid = tokens.reshape(n, rows, cols, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(n, rows * patch, cols * patch, channels)


def timesteps_from_logits(logits: jax.Array, shift: float) -> jax.Array:
    """BAGEL's training timesteps: ``t = sigmoid(logit)`` then ``s·t / (1 + (s−1)·t)``; −inf (clean) → 0."""
    t = jax.nn.sigmoid(logits.astype(jnp.float32))
    return shift * t / (1.0 + (shift - 1.0) * t)
