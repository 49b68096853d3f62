"""FLUX-family autoencoder (the VAE of BAGEL / FLUX.1), NHWC, parameter names as in FLUX's ``ae.safetensors``.

``encode`` returns ``scale · (z − shift)`` where z is the posterior mean or a sample (``vae.sample_posterior``);
``decode`` inverts the scale/shift first. Convolution kernels are ``[kh, kw, in, out]`` (PyTorch: ``[out, in, kh,
kw]``). The VAE is frozen in Stage I/II; the embedded default trains a small one of the same family (stage 0).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from synermedgen_jax.modeling.layers import FrozenTable, make_param, torch_linear_init


class Conv2d(nnx.Module):
    """2-D convolution with PyTorch's symmetric padding convention."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1,
                 padding: int | tuple = 0):
        init = torch_linear_init(in_ch * kernel * kernel)
        self.kernel = make_param(rngs, (kernel, kernel, in_ch, out_ch), (None, None, None, None), init)
        self.bias = make_param(rngs, (out_ch,), (None,), init)
        self.stride = stride
        self.padding = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, H, W, C_in]`` → ``[N, H', W', C_out]``."""
        y = jax.lax.conv_general_dilated(
            x, self.kernel.value.astype(x.dtype), (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias.value.astype(x.dtype)


class GroupNorm(nnx.Module):
    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        self.weight = nnx.Param(jnp.ones((channels,)), logical_axes=(None,))
        self.bias = nnx.Param(jnp.zeros((channels,)), logical_axes=(None,))
        self.groups, self.eps = groups, eps

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        grouped = x.astype(jnp.float32).reshape(n, h, w, self.groups, c // self.groups)
        mean = jnp.mean(grouped, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=(1, 2, 4), keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(n, h, w, c)
        return (normed * self.weight.value + self.bias.value).astype(x.dtype)


class ResnetBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, *, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(in_ch, groups)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1, rngs=rngs)
        self.norm2 = GroupNorm(out_ch, groups)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1, rngs=rngs)
        self.nin_shortcut = Conv2d(in_ch, out_ch, 1, rngs=rngs) if in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.swish(self.norm1(x)))
        h = self.conv2(jax.nn.swish(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return shortcut + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all H·W positions with 1×1-conv projections."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
        self.norm = GroupNorm(channels, groups)
        self.q = Conv2d(channels, channels, 1, rngs=rngs)
        self.k = Conv2d(channels, channels, 1, rngs=rngs)
        self.v = Conv2d(channels, channels, 1, rngs=rngs)
        self.proj_out = Conv2d(channels, channels, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        normed = self.norm(x)
        q, k, v = (proj(normed).reshape(n, h * w, c) for proj in (self.q, self.k, self.v))
        scores = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        attended = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)
        return x + self.proj_out(attended.reshape(n, h, w, c))


class Downsample(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        # FLUX pads right/bottom by one and convolves with stride 2 and no padding.
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, padding=1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))  # nearest-neighbour ×2


class _Level(nnx.Module):
    """One resolution level: ``block`` list (+ ``downsample`` or ``upsample``)."""


class _Mid(nnx.Module):
    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(channels, channels, groups, rngs=rngs)
        self.attn_1 = AttnBlock(channels, groups, rngs=rngs)
        self.block_2 = ResnetBlock(channels, channels, groups, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
    def __init__(self, vae, *, rngs: nnx.Rngs):
        ch, mult, groups = vae.ch, tuple(vae.ch_mult), vae.norm_groups
        self.conv_in = Conv2d(vae.in_channels, ch, 3, padding=1, rngs=rngs)
        in_mult = (1, *mult)
        levels = []
        for level, level_mult in enumerate(mult):
            block_in, block_out = ch * in_mult[level], ch * level_mult
            stage = _Level()
            blocks = []
            for _ in range(vae.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, groups, rngs=rngs))
                block_in = block_out
            stage.block = nnx.List(blocks)
            stage.downsample = Downsample(block_in, rngs=rngs) if level != len(mult) - 1 else None
            levels.append(stage)
        self.down = nnx.List(levels)
        top = ch * mult[-1]
        self.mid = _Mid(top, groups, rngs=rngs)
        self.norm_out = GroupNorm(top, groups)
        self.conv_out = Conv2d(top, 2 * vae.z_channels, 3, padding=1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, H, W, C]`` → posterior moments ``[N, H/f, W/f, 2z]`` (mean, log-variance)."""
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if stage.downsample is not None:
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(jax.nn.swish(self.norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, vae, *, rngs: nnx.Rngs):
        ch, mult, groups = vae.ch, tuple(vae.ch_mult), vae.norm_groups
        block_in = ch * mult[-1]
        self.conv_in = Conv2d(vae.z_channels, block_in, 3, padding=1, rngs=rngs)
        self.mid = _Mid(block_in, groups, rngs=rngs)
        levels: list[_Level] = [None] * len(mult)  # type: ignore[list-item]
        for level in reversed(range(len(mult))):  # built top-down, stored by level index as FLUX does
            block_out = ch * mult[level]
            stage = _Level()
            blocks = []
            for _ in range(vae.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, groups, rngs=rngs))
                block_in = block_out
            stage.block = nnx.List(blocks)
            stage.upsample = Upsample(block_in, rngs=rngs) if level != 0 else None
            levels[level] = stage
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(block_in, groups)
        self.conv_out = Conv2d(block_in, vae.in_channels, 3, padding=1, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        """``[N, h, w, z]`` → ``[N, h·f, w·f, C]``."""
        h = self.mid(self.conv_in(z))
        for stage in reversed(list(self.up)):
            for block in stage.block:
                h = block(h)
            if stage.upsample is not None:
                h = stage.upsample(h)
        return self.conv_out(jax.nn.swish(self.norm_out(h)))


class LatentBatchNorm(nnx.Module):
    """UniMedVL's ``vae_batch_norm`` at inference: ``BatchNorm2d(z, eps, affine=False)`` in eval mode, i.e.
    ``(z - running_mean) / sqrt(running_var + eps)`` per latent channel. The statistics are frozen tables (never
    trained here; imported from the checkpoint)."""

    def __init__(self, channels: int, eps: float):
        self.running_mean = FrozenTable(jnp.zeros((channels,), jnp.float32), logical_axes=(None,))
        self.running_var = FrozenTable(jnp.ones((channels,), jnp.float32), logical_axes=(None,))
        self.eps = float(eps)

    def __call__(self, z: jax.Array) -> jax.Array:
        """``z [..., C]`` → normalised, same shape and dtype."""
        mean = self.running_mean.get_value().astype(jnp.float32)
        var = self.running_var.get_value().astype(jnp.float32)
        return ((z.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.eps)).astype(z.dtype)


class AutoEncoder(nnx.Module):
    """FLUX AE: ``encoder``, ``decoder`` and the latent scale/shift; with ``vae.latent_batch_norm`` (a UniMedVL
    checkpoint that carries ``vae_batch_norm`` statistics) also the latent BatchNorm after the encoder."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        vae = config.vae
        self.encoder = Encoder(vae, rngs=rngs)
        self.decoder = Decoder(vae, rngs=rngs)
        self.scale_factor, self.shift_factor = vae.scale_factor, vae.shift_factor
        self.sample_posterior = vae.sample_posterior
        self.downsample = 2 ** (len(vae.ch_mult) - 1)
        if vae.get("latent_batch_norm", False):
            self.latent_norm = LatentBatchNorm(vae.z_channels, vae.get("latent_batch_norm_eps", 1e-4))

    def posterior(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``images [N, H, W, C]`` in [-1, 1] → ``mean, logvar [N, H/f, W/f, z]`` (logvar clipped as FLUX)."""
        moments = self.encoder(images)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images: jax.Array, key: jax.Array | None = None, *, sample: bool | None = None) -> jax.Array:
        """Scaled latents ``[N, H/f, W/f, z]``; draws from the posterior when sampling (needs ``key``)."""
        mean, logvar = self.posterior(images)
        sample = self.sample_posterior if sample is None else sample
        z = mean
        if sample:
            if key is None:
                raise ValueError("AutoEncoder.encode: sampling the posterior needs a PRNG key")
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        z = self.scale_factor * (z - self.shift_factor)
        if hasattr(self, "latent_norm"):  # UniMedVL normalises every encoded latent (vae_encode, cache update)
            z = self.latent_norm(z)
        return z

    def decode(self, latents: jax.Array) -> jax.Array:
        """Scaled latents ``[N, h, w, z]`` → images ``[N, h·f, w·f, C]``. A latent BatchNorm is not inverted:
        UniMedVL's ``decode_image`` hands generated latents to the VAE decoder as they are."""
        return self.decoder(latents / self.scale_factor + self.shift_factor)
