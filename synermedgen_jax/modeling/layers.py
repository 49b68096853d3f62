"""Small building blocks shared by the model parts: parameters with logical axes, Linear, norms, RoPE, sin-cos.

Every trainable parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata (names from
``synermedgen_jax/axes.py``, e.g. ``(EMBED, MLP)``);
``synermedgen_jax/sharding.py`` maps those names onto mesh axes with one rules table, so no mesh name appears here.
Frozen tables that BAGEL stores but never trains (the sin-cos position tables) are ``FrozenTable`` variables, so
optimizers and parameter counts that select ``nnx.Param`` never see them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from synermedgen_jax.axes import NORM


# The mesh context: the model names activation axes logically; the trainer and the sampler install (while
# tracing) the mesh and a function that maps those names onto it (synermedgen_jax/sharding.py). Without one,
# constraints are no-ops and the kernels run unpartitioned.
@dataclasses.dataclass(frozen=True)
class _MeshContext:
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
    to_sharding: Callable[[tuple, tuple], jax.sharding.Sharding]


_MESH_CONTEXT: contextvars.ContextVar[_MeshContext | None] = contextvars.ContextVar("mesh_context", default=None)


@contextlib.contextmanager
def mesh_context(mesh, to_sharding: Callable[[tuple, tuple], jax.sharding.Sharding]) -> Iterator[None]:
    """Within this context :func:`constrain` pins activations with ``to_sharding(logical_axes, shape)`` and the
    Pallas kernels on the model's path run under ``shard_map`` over ``mesh`` (:func:`active_mesh`)."""
    token = _MESH_CONTEXT.set(_MeshContext(mesh, to_sharding))
    try:
        yield
    finally:
        _MESH_CONTEXT.reset(token)


def active_mesh() -> jax.sharding.Mesh | jax.sharding.AbstractMesh | None:
    """The mesh the model is being traced for (None outside :func:`mesh_context`): the one way every kernel call
    site learns how to partition itself."""
    context = _MESH_CONTEXT.get()
    return None if context is None else context.mesh


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """A sharding constraint by logical axis names (no-op outside :func:`mesh_context`)."""
    context = _MESH_CONTEXT.get()
    if context is None:
        return x
    return jax.lax.with_sharding_constraint(x, context.to_sharding(logical_axes, x.shape))


class FrozenTable(nnx.Variable):
    """A constant table saved with the weights but never trained (BAGEL's ``requires_grad=False`` tables)."""


@dataclasses.dataclass(frozen=True)
class Init:
    """A parameter initialiser: ``kind`` in {uniform (±scale), normal (std scale), zeros, ones}.

    Concrete initialisation draws on the host with numpy (one generator per parameter, seeded from the nnx RNG
    stream): eager ``jax.random`` would compile one tiny program per distinct shape, which dominates start-up of
    small models on CPU. Under tracing (``nnx.eval_shape``, a jitted sharded init) the jax path is used.
    """

    kind: str
    scale: float = 1.0

    def jax(self, key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
        if self.kind == "uniform":
            return jax.random.uniform(key, shape, dtype, -self.scale, self.scale)
        if self.kind == "normal":
            return self.scale * jax.random.normal(key, shape, dtype)
        return (jnp.zeros if self.kind == "zeros" else jnp.ones)(shape, dtype)

    def numpy(self, rng: np.random.Generator, shape: tuple[int, ...], dtype) -> jax.Array:
        if self.kind == "uniform":
            value = rng.uniform(-self.scale, self.scale, shape)
        elif self.kind == "normal":
            value = self.scale * rng.standard_normal(shape)
        else:
            value = (np.zeros if self.kind == "zeros" else np.ones)(shape)
        return jnp.asarray(value, dtype=dtype)


def make_param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...],
               init: Init, dtype=jnp.float32) -> nnx.Param:
    if len(shape) != len(axes):
        raise ValueError(f"parameter of shape {shape} needs {len(shape)} logical axes, got {axes}")
    if init.kind in ("zeros", "ones") or rngs is None:
        return nnx.Param(init.jax(None, shape, dtype), logical_axes=tuple(axes))
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):
        value = init.jax(key, shape, dtype)
    else:
        seed = np.asarray(jax.random.key_data(key)).astype(np.uint64)
        value = init.numpy(np.random.default_rng(seed), shape, dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


def torch_linear_init(fan_in: int) -> Init:
    """PyTorch's default Linear/Conv init (uniform ±1/sqrt(fan_in)), so random models resemble the reference's."""
    return Init("uniform", 1.0 / math.sqrt(fan_in))


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with kernel ``[in, out]`` (PyTorch stores ``[out, in]``: ports transpose)."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 use_bias: bool = True, rngs: nnx.Rngs, zero_init: bool = False,
                 compute_dtype=jnp.float32, param_dtype=jnp.float32):
        init = Init("zeros") if zero_init else torch_linear_init(in_features)
        self.kernel = make_param(rngs, (in_features, out_features), axes, init, param_dtype)
        self.bias = make_param(rngs, (out_features,), (axes[1],), init, param_dtype) if use_bias else None
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.compute_dtype)
        y = jnp.einsum("...i,io->...o", x, self.kernel.value.astype(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias.value.astype(self.compute_dtype)
        return y


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: statistics in float32, ``weight * normalised`` cast back to the input dtype."""

    def __init__(self, dim: int, *, eps: float, axis_name: str | None = NORM, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight.value.astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale ``weight`` and ``bias`` (PyTorch names), float32 statistics."""

    def __init__(self, dim: int, *, eps: float, axis_name: str | None = NORM, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.weight.value + self.bias.value).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


# ---------------------------------------------------------------------------------------------------------
# Rotary position embedding (Qwen2 / HF layout: frequencies duplicated, rotate_half on the two halves).
def rope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``position_ids [B, T]`` → ``cos, sin [B, T, head_dim]`` in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [B, T, H, D]`` rotated by ``cos/sin [B, T, D]``; computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Sin-cos tables (BAGEL's frozen vit_pos_embed / latent_pos_embed, and the timestep embedding).
def sincos_1d(dim: int, positions: np.ndarray, base: float = 10000.0, step: float = 1.0) -> np.ndarray:
    """``[M]`` positions → ``[M, dim]``: ``[sin(pos·w_k), cos(pos·w_k)]``, ``w_k = step/base^(k/(dim/2))``.

    BAGEL's tables use ``base=10000, step=1`` (the highest frequency turns one radian per grid cell)."""
    omega = step / base ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_table(dim: int, side: int, base: float = 10000.0, step: float = 1.0) -> np.ndarray:
    """``[side², dim]`` float32; row ``r*side + c``: first half encodes the column, second half the row."""
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, cols, base, step), sincos_1d(dim // 2, rows, base, step)], axis=1)
    return table.astype(np.float32)


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """DiT timestep features ``[..., dim]`` in ``[cos, sin]`` order (t in [0, 1] fed as is, as BAGEL does)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
