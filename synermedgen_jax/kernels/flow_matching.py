"""Flow-matching kernels: noising, the masked velocity MSE, and one fused CFG + Euler sampling step.

Each operation has a jnp reference with identical semantics and a Pallas kernel, behind one switch
``impl = "reference" | "pallas" | "pallas_interpret" | "auto"`` ("auto": Pallas on GPU/TPU, the reference on
CPU, where XLA's fused elementwise code is as good). ``backend`` (``"triton"`` | ``"mosaic"`` | None) picks the
kernel lowering; None means Mosaic on TPU, Triton otherwise.

Shapes: latent tokens are rows, ``[N, C]`` (C = 64 for BAGEL: 2x2 patches of 16 VAE channels). The kernels
tile rows in blocks of ``block_rows`` and keep the channel axis whole, so every per-token reduction happens
inside one program. T/N need not be a multiple of anything: rows (and, for Triton, channels up to a power
of two) are zero-padded and sliced off.

Conventions follow BAGEL (``modeling/bagel/bagel.py``): ``x_t = (1 - t) x0 + t ε``, target ``ε - x0``;
sampling runs t from 1 to 0 with ``x ← x - v·dt``, ``dt = t_i - t_{i+1} > 0``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton

from synermedgen_jax.kernels import dispatch, partition
from synermedgen_jax.kernels.dispatch import FLOW_MATCHING_IMPLS as IMPLS

RENORMS = ("text_channel", "channel", "global")
NORM_EPS = 1e-8  # BAGEL's epsilon in the renorm ratio


# ----------------------------------------------------------------------------------------------- plumbing


def _resolve(impl: str, backend: str | None) -> tuple[bool, bool, str]:
    """``(use_kernel, interpret, backend)`` for an ``impl`` switch value."""
    if impl not in IMPLS:
        raise ValueError(f"flow_matching: unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        impl = dispatch.auto_flow_matching()  # the one rule for "auto" (kernels/dispatch.py)
    backend = backend or dispatch.pallas_backend()
    if backend not in ("triton", "mosaic"):
        raise ValueError(f"flow_matching: backend must be 'triton' or 'mosaic'; got {backend!r}")
    return impl != "reference", impl == "pallas_interpret", backend


def uses_kernel(impl: str) -> bool:
    """Whether ``impl`` runs a Pallas kernel on this platform (one that must be partitioned on a mesh)."""
    return _resolve(impl, None)[0]


def _check_rows(name: str, x: jax.Array, ndim: int = 2) -> None:
    if x.ndim != ndim:
        raise ValueError(f"flow_matching: {name} must have {ndim} dims ([N, C] or [N]); got shape {x.shape}")


def _rowwise_call(kernel, tensors, columns, params, out_widths, out_dtypes, *, interpret, backend, block_rows,
                  mesh=None):
    """Run ``kernel`` over row blocks.

    ``tensors``: ``[N, C]`` arrays (channels padded for Triton), ``columns``: ``[N]`` arrays given to the kernel
    as ``[rows, 1]`` tiles, ``params``: a float32 vector given whole as ``[1, P]``. Outputs are ``[N, w]`` for
    each ``w`` in ``out_widths`` (``None`` = the channel width). Returns the outputs with padding removed.
    With ``mesh`` the call runs under ``shard_map`` on each device's rows (kernels/partition.py).
    """
    params = jnp.asarray(params, jnp.float32)
    call = functools.partial(_rowwise_local, kernel, len(tensors), out_widths=out_widths, out_dtypes=out_dtypes,
                             interpret=interpret, backend=backend, block_rows=block_rows)
    if mesh is not None:
        call = partition.over_rows(call, mesh, tensors[0].shape[0], len(tensors) + len(columns), len(out_widths),
                                   "flow_matching rows")
    return list(call(*tensors, *columns, params))


def _rowwise_local(kernel, num_tensors, *arrays, out_widths, out_dtypes, interpret, backend, block_rows):
    """:func:`_rowwise_call` on the rows at hand (one device's, under ``shard_map``)."""
    tensors, columns, params = arrays[:num_tensors], arrays[num_tensors:-1], arrays[-1]
    n, c = tensors[0].shape
    # Triton tiles must have power-of-two sizes; Mosaic takes the whole channel axis as is.
    width = pl.next_power_of_2(c) if backend == "triton" and not interpret else c
    rows = max(8, min(block_rows, pl.next_power_of_2(n)))
    padded_n = -(-n // rows) * rows
    pad_rows = lambda x, w: jnp.pad(x, ((0, padded_n - n), (0, w - x.shape[1])))
    args = [pad_rows(x, width) for x in tensors] + [pad_rows(x[:, None], 1) for x in columns]
    args.append(params[None, :])
    row_spec = lambda w: pl.BlockSpec((rows, w), lambda i: (i, 0))
    in_specs = [row_spec(width)] * len(tensors) + [row_spec(1)] * len(columns)
    in_specs.append(pl.BlockSpec((1, args[-1].shape[1]), lambda i: (0, 0)))
    widths = [width if w is None else w for w in out_widths]
    if interpret:
        compiler_params = None
    elif backend == "triton":
        compiler_params = pl_triton.CompilerParams(num_warps=4, num_stages=1)
    else:
        compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel",))
    outs = pl.pallas_call(
        kernel,
        grid=(padded_n // rows,),
        in_specs=in_specs,
        out_specs=[row_spec(w) for w in widths],
        out_shape=[jax.ShapeDtypeStruct((padded_n, w), d) for w, d in zip(widths, out_dtypes)],
        compiler_params=compiler_params,
        interpret=interpret,
    )(*args)
    return [o[:n, : (c if w is None else w)] for o, w in zip(outs, out_widths)]


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
    """BAGEL's timestep shift ``s·t / (1 + (s − 1)·t)`` (s = 1: identity; s > 1 spends more steps near noise)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


# ------------------------------------------------------------------------------------------------ noising


def noised_latents_reference(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = (1 − t)·x0 + t·noise`` with one (already shifted) t per token: x0/noise ``[N, C]``, t ``[N]``."""
    t = t.astype(jnp.float32)[:, None]
    return ((1.0 - t) * x0.astype(jnp.float32) + t * noise.astype(jnp.float32)).astype(x0.dtype)


def _noise_kernel(x0_ref, noise_ref, t_ref, params_ref, out_ref):
    del params_ref
    t = t_ref[...].astype(jnp.float32)
    x_t = (1.0 - t) * x0_ref[...].astype(jnp.float32) + t * noise_ref[...].astype(jnp.float32)
    out_ref[...] = x_t.astype(out_ref.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _noised_kernel(x0, noise, t, interpret, backend, block_rows, mesh):
    return _rowwise_call(_noise_kernel, [x0, noise], [t], jnp.zeros((1,)), [None], [x0.dtype],
                         interpret=interpret, backend=backend, block_rows=block_rows, mesh=mesh)[0]


def _noised_fwd(x0, noise, t, interpret, backend, block_rows, mesh):
    return _noised_kernel(x0, noise, t, interpret, backend, block_rows, mesh), (x0, noise, t)


def _noised_bwd(interpret, backend, block_rows, mesh, residuals, g):
    # Elementwise: XLA fuses these into one pass, no kernel needed for the backward.
    x0, noise, t = residuals
    g32, t32 = g.astype(jnp.float32), t.astype(jnp.float32)[:, None]
    d_t = jnp.sum(g32 * (noise.astype(jnp.float32) - x0.astype(jnp.float32)), axis=1)
    return ((g32 * (1.0 - t32)).astype(x0.dtype), (g32 * t32).astype(noise.dtype), d_t.astype(t.dtype))


_noised_kernel.defvjp(_noised_fwd, _noised_bwd)


def noised_latents(
    x0: jax.Array, noise: jax.Array, t: jax.Array, *, impl: str = "reference", backend: str | None = None,
    block_rows: int = 256, mesh=None,
) -> jax.Array:
    """``[N, C]`` noised latents ``(1 − t)·x0 + t·noise``; t ``[N]`` per token (already shifted). Differentiable.

    ``mesh``: the kernel runs under ``shard_map`` on each device's rows (ignored by the reference)."""
    _check_rows("x0", x0)
    if noise.shape != x0.shape or t.shape != x0.shape[:1]:
        raise ValueError(f"noised_latents: noise {noise.shape} must equal x0 {x0.shape}, t {t.shape} be [N]")
    use_kernel, interpret, backend = _resolve(impl, backend)
    if not use_kernel:
        return noised_latents_reference(x0, noise, t)
    return _noised_kernel(x0, noise, t, interpret, backend, block_rows, mesh)


# ------------------------------------------------------------------------------------------- velocity MSE


def velocity_mse_sum_reference(pred: jax.Array, x0: jax.Array, noise: jax.Array, mask: jax.Array) -> jax.Array:
    """Σ_tokens mask · mean_C (pred − (noise − x0))², float32 scalar (divide by the global token count outside)."""
    diff = pred.astype(jnp.float32) - (noise.astype(jnp.float32) - x0.astype(jnp.float32))
    return jnp.sum(jnp.mean(diff * diff, axis=1) * mask.astype(jnp.float32))


def _row_mse_kernel(pred_ref, x0_ref, noise_ref, params_ref, out_ref):
    # The target noise − x0 lives only in registers; params[0] is 1/C for the true (unpadded) C.
    diff = pred_ref[...].astype(jnp.float32) - noise_ref[...].astype(jnp.float32) + x0_ref[...].astype(jnp.float32)
    out_ref[...] = jnp.sum(diff * diff, axis=1, keepdims=True) * params_ref[0:1, 0:1]


def _row_mse_grad_kernel(pred_ref, x0_ref, noise_ref, g_ref, params_ref, out_ref):
    diff = pred_ref[...].astype(jnp.float32) - noise_ref[...].astype(jnp.float32) + x0_ref[...].astype(jnp.float32)
    out_ref[...] = (diff * (2.0 * params_ref[0:1, 0:1]) * g_ref[...]).astype(out_ref.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _row_mse(pred, x0, noise, interpret, backend, block_rows, mesh):
    """Per-token mean over C of the squared velocity error, ``[N]`` float32."""
    params = jnp.asarray([1.0 / pred.shape[1]])
    out = _rowwise_call(_row_mse_kernel, [pred, x0, noise], [], params, [1], [jnp.float32],
                        interpret=interpret, backend=backend, block_rows=block_rows, mesh=mesh)[0]
    return out[:, 0]


def _row_mse_fwd(pred, x0, noise, interpret, backend, block_rows, mesh):
    return _row_mse(pred, x0, noise, interpret, backend, block_rows, mesh), (pred, x0, noise)


def _row_mse_bwd(interpret, backend, block_rows, mesh, residuals, g):
    pred, x0, noise = residuals
    params = jnp.asarray([1.0 / pred.shape[1]])
    d_pred = _rowwise_call(_row_mse_grad_kernel, [pred, x0, noise], [g], params, [None], [jnp.float32],
                           interpret=interpret, backend=backend, block_rows=block_rows, mesh=mesh)[0]
    # d/dx0 = +d/dpred and d/dnoise = −d/dpred (exact, free); x0/noise are data, but the grads are correct.
    return d_pred.astype(pred.dtype), d_pred.astype(x0.dtype), (-d_pred).astype(noise.dtype)


_row_mse.defvjp(_row_mse_fwd, _row_mse_bwd)


def velocity_mse_sum(
    pred: jax.Array, x0: jax.Array, noise: jax.Array, mask: jax.Array, *, impl: str = "reference",
    backend: str | None = None, block_rows: int = 256, mesh=None,
) -> jax.Array:
    """Masked flow-matching loss sum: ``Σ_i mask_i · mean_c (pred − (noise − x0))²_ic`` (float32 scalar).

    pred/x0/noise ``[N, C]``, mask ``[N]`` bool or float. The kernel never writes the target to memory.
    Gradients: exact for pred, x0 and noise; for a float mask, the per-token MSE. ``mesh``: the kernels
    (forward and backward) run under ``shard_map`` on each device's rows; the sum is XLA's.
    """
    for name, x in (("pred", pred), ("x0", x0), ("noise", noise)):
        _check_rows(name, x)
        if x.shape != pred.shape:
            raise ValueError(f"velocity_mse_sum: {name} shape {x.shape} differs from pred {pred.shape}")
    if mask.shape != pred.shape[:1]:
        raise ValueError(f"velocity_mse_sum: mask must be [N] = {pred.shape[:1]}; got {mask.shape}")
    use_kernel, interpret, backend = _resolve(impl, backend)
    if not use_kernel:
        return velocity_mse_sum_reference(pred, x0, noise, mask)
    return jnp.sum(_row_mse(pred, x0, noise, interpret, backend, block_rows, mesh) * mask.astype(jnp.float32))


# --------------------------------------------------------------------------------------- CFG + Euler step


def _cfg_active(t, cfg_interval) -> jax.Array:
    # BAGEL: guidance applies when lo < t <= hi.
    t = jnp.asarray(t, jnp.float32)
    return (t > cfg_interval[0]) & (t <= cfg_interval[1])


def _ratio(num_sq, den_sq, renorm_min):
    return jnp.clip(jnp.sqrt(num_sq) / (jnp.sqrt(den_sq) + NORM_EPS), renorm_min, 1.0)


def _combine(v, v_text_uncond, v_img_uncond, cfg_text, cfg_img, renorm, renorm_min, global_scale):
    """Guided velocity, float32 tiles ``[n, C]``; ``global_scale`` is used by the "global" renorm only."""
    v_text = v_text_uncond + cfg_text * (v - v_text_uncond)
    if renorm == "text_channel":
        sq = lambda a: jnp.sum(a * a, axis=1, keepdims=True)
        v_text = v_text * _ratio(sq(v), sq(v_text), renorm_min)
        return v_img_uncond + cfg_img * (v_text - v_img_uncond) if cfg_img > 1.0 else v_text
    guided = v_img_uncond + cfg_img * (v_text - v_img_uncond) if cfg_img > 1.0 else v_text
    if renorm == "channel":
        sq = lambda a: jnp.sum(a * a, axis=1, keepdims=True)
        return guided * _ratio(sq(v), sq(guided), renorm_min)
    return guided * global_scale


def cfg_euler_step_reference(x, v_cond, v_text_uncond, v_img_uncond, t, dt, *, cfg_text, cfg_img,
                             cfg_interval=(0.0, 1.0), renorm="text_channel", renorm_min=0.0):
    """jnp reference of ``cfg_euler_step`` (same arguments, no ``impl``)."""
    f32 = lambda a: a.astype(jnp.float32)
    v, vt, vi = f32(v_cond), f32(v_text_uncond), f32(v_img_uncond)
    if cfg_text > 1.0:
        global_scale = 1.0
        if renorm == "global":
            guided = _combine(v, vt, vi, cfg_text, cfg_img, "global", renorm_min, 1.0)
            global_scale = _ratio(jnp.sum(v * v), jnp.sum(guided * guided), renorm_min)
        guided = _combine(v, vt, vi, cfg_text, cfg_img, renorm, renorm_min, global_scale)
        v = jnp.where(_cfg_active(t, cfg_interval), guided, v)
    return (f32(x) - v * jnp.asarray(dt, jnp.float32)).astype(x.dtype)


def _step_kernel(x_ref, v_ref, vt_ref, vi_ref, params_ref, out_ref, *, cfg_text, cfg_img, renorm, renorm_min):
    # params: [active (0/1), dt, global renorm scale]
    f32 = lambda r: r[...].astype(jnp.float32)
    v = f32(v_ref)
    if cfg_text > 1.0:
        guided = _combine(v, f32(vt_ref), f32(vi_ref), cfg_text, cfg_img, renorm, renorm_min, params_ref[0:1, 2:3])
        v = jnp.where(params_ref[0:1, 0:1] > 0.5, guided, v)
    out_ref[...] = (f32(x_ref) - v * params_ref[0:1, 1:2]).astype(out_ref.dtype)


def _global_stats_kernel(v_ref, vt_ref, vi_ref, params_ref, v_sq_ref, guided_sq_ref, *, cfg_text, cfg_img):
    del params_ref
    v = v_ref[...].astype(jnp.float32)
    guided = _combine(v, vt_ref[...].astype(jnp.float32), vi_ref[...].astype(jnp.float32), cfg_text, cfg_img,
                      "global", 0.0, 1.0)
    v_sq_ref[...] = jnp.sum(v * v, axis=1, keepdims=True)
    guided_sq_ref[...] = jnp.sum(guided * guided, axis=1, keepdims=True)


def cfg_euler_step(
    x: jax.Array,
    v_cond: jax.Array,
    v_text_uncond: jax.Array,
    v_img_uncond: jax.Array,
    t: float | jax.Array,
    dt: float | jax.Array,
    *,
    cfg_text: float,
    cfg_img: float,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    renorm: str = "text_channel",
    renorm_min: float = 0.0,
    impl: str = "reference",
    backend: str | None = None,
    block_rows: int = 256,
    mesh=None,
) -> jax.Array:
    """One BAGEL sampling step: classifier-free guidance, renorm, Euler. Returns the new ``x`` ``[N, C]``.

    x and the three velocities are ``[N, C]``: the latent tokens of one image for ``renorm="global"`` (its norm
    spans all tokens, as in BAGEL, which supports one image there; ``jax.vmap`` over images for a batch);
    any set of tokens for ``"text_channel"``/``"channel"`` (per-token norms over channels). t, dt: scalars
    (traced or not); CFG applies when ``cfg_text > 1`` and ``cfg_interval[0] < t <= cfg_interval[1]``:

    * ``text_channel``: ``v_t = v_ut + s_t (v − v_ut)``, ``v_t *= clamp(‖v‖/(‖v_t‖+1e-8), renorm_min, 1)`` per
      token, then ``v = v_ui + s_i (v_t − v_ui)`` (if ``s_i > 1``);
    * ``global``/``channel``: both guidance terms first, then the same clamp with norms over the whole image
      / per token.

    Then ``x ← x − v·dt`` (t runs from 1 to 0, dt > 0). ``mesh``: the kernels run under ``shard_map`` on each
    device's rows (the "global" renorm's image-wide sums are XLA's, across devices).
    """
    for name, a in (("x", x), ("v_cond", v_cond), ("v_text_uncond", v_text_uncond), ("v_img_uncond", v_img_uncond)):
        _check_rows(name, a)
        if a.shape != x.shape:
            raise ValueError(f"cfg_euler_step: {name} shape {a.shape} differs from x {x.shape}")
    if renorm not in RENORMS:
        raise ValueError(f"cfg_euler_step: renorm must be one of {RENORMS}; got {renorm!r}")
    use_kernel, interpret, backend = _resolve(impl, backend)
    options = dict(cfg_text=float(cfg_text), cfg_img=float(cfg_img))
    if not use_kernel:
        return cfg_euler_step_reference(x, v_cond, v_text_uncond, v_img_uncond, t, dt, cfg_interval=cfg_interval,
                                        renorm=renorm, renorm_min=renorm_min, **options)
    call = functools.partial(_rowwise_call, interpret=interpret, backend=backend, block_rows=block_rows, mesh=mesh)
    velocities = [v_cond, v_text_uncond, v_img_uncond]
    global_scale = jnp.float32(1.0)
    if renorm == "global" and cfg_text > 1.0:
        # Pass 1 of 2: per-token squared norms; the image-wide ratio is a reduction of N numbers.
        v_sq, guided_sq = call(functools.partial(_global_stats_kernel, **options), velocities, [], jnp.zeros((1,)),
                               [1, 1], [jnp.float32, jnp.float32])
        global_scale = _ratio(jnp.sum(v_sq), jnp.sum(guided_sq), renorm_min)
    params = jnp.stack([_cfg_active(t, cfg_interval).astype(jnp.float32), jnp.asarray(dt, jnp.float32),
                        global_scale])
    kernel = functools.partial(_step_kernel, renorm=renorm, renorm_min=float(renorm_min), **options)
    return call(kernel, [x] + velocities, [], params, [None], [x.dtype])[0]


__all__ = [
    "IMPLS", "RENORMS", "cfg_euler_step", "cfg_euler_step_reference", "noised_latents", "noised_latents_reference",
    "shift_timesteps", "velocity_mse_sum", "velocity_mse_sum_reference",
]
