"""Fused Pallas packed-split attention with a custom VJP: the entry point behind ``impl="pallas*"``.

``pallas_packed_attention`` pads T to the block size (padding has ``sample_id = -1``, so it sees and is seen
by nothing), builds the block lists from the metadata (``block_map.py``), and calls one of two kernel
families:

* ``"triton"`` (``triton_kernel.py``): GPU. Grid over (batch, head, block); each program loops over its
  list of visible blocks, loop bound read from the list's count.
* ``"mosaic"`` (``mosaic_kernel.py``): TPU. ``PrefetchScalarGridSpec`` with the block lists in SMEM; the
  key-block grid axis is indexed through the list and ``pl.when`` skips steps past the count.

Both run on CPU with ``interpret=True``. The forward saves the log-sum-exp; the backward recomputes the
probabilities block by block (flash-attention 2) with the same skipping. Rows that see nothing return zeros
and zero gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from synermedgen_jax.kernels import dispatch
from synermedgen_jax.kernels.attention import mosaic_kernel, triton_kernel
from synermedgen_jax.kernels.attention.block_map import block_map, visible_lists

BACKENDS = ("triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. ``block_q``/``block_k`` for the forward, ``*_bwd`` for the dq and dk/dv kernels.

    Every size must be a power of two ≥ 16 (Triton dot operands); T is padded to a multiple of all four.
    ``num_warps``/``num_stages`` (forward) and ``num_warps_bwd``/``num_stages_bwd`` (dq and dk/dv kernels; None:
    the forward's) are Triton-only.
    """

    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"BlockSizes.{name}={size}: must be a power of two >= 16")

    @property
    def multiple(self) -> int:
        return math.lcm(self.block_q, self.block_k, self.block_q_bwd, self.block_k_bwd)


def default_block_sizes(backend: str, head_dim: int, interpret: bool) -> BlockSizes:
    """Per-platform defaults: Triton on H100-class GPUs, Mosaic on TPU (larger tiles amortise grid steps)."""
    if interpret:
        return BlockSizes(32, 32, 32, 32)
    if backend == "triton":
        # 128x64 forward keeps q, the accumulator and one K/V tile in registers/shared memory at D=128. The
        # backward kernels run best with 4 warps: measured on an H100 (tools.bench_attention --sweep, T=8192,
        # D=128, bf16), 8 warps there made the backward 2-2.4x slower (forward+backward 1.4-1.9x).
        return BlockSizes(128, 64, 64, 64, num_warps=8 if head_dim >= 128 else 4, num_stages=2, num_warps_bwd=4,
                          num_stages_bwd=2)
    return BlockSizes(256, 256, 256, 256)


@dataclasses.dataclass(frozen=True)
class _Config:
    backend: str
    sizes: BlockSizes
    scale: float
    interpret: bool


def _module(config: _Config):
    return triton_kernel if config.backend == "triton" else mosaic_kernel


def _lists(meta: jax.Array, bq: int, bk: int):
    return visible_lists(block_map(meta[:, 0], meta[:, 1], meta[:, 2], bq, bk))


def _forward(config: _Config, q, k, v, meta):
    sizes = config.sizes
    lists = _lists(meta, sizes.block_q, sizes.block_k)
    return _module(config).forward(
        q, k, v, meta, lists, scale=config.scale, bq=sizes.block_q, bk=sizes.block_k,
        num_warps=sizes.num_warps, num_stages=sizes.num_stages, interpret=config.interpret,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config: _Config, q, k, v, meta):
    return _forward(config, q, k, v, meta)[0]


def _attention_fwd(config: _Config, q, k, v, meta):
    out, lse = _forward(config, q, k, v, meta)
    return out, (q, k, v, meta, out, lse)


def _attention_bwd(config: _Config, residuals, d_out):
    q, k, v, meta, out, lse = residuals
    sizes = config.sizes
    # delta_i = sum_d dO_id * O_id: the softmax-Jacobian correction, computed once outside the kernels.
    delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))[..., None]
    lists = _lists(meta, sizes.block_q_bwd, sizes.block_k_bwd)
    dq, dk, dv = _module(config).backward(
        q, k, v, meta, lists, d_out.astype(q.dtype), lse, delta, scale=config.scale,
        bq=sizes.block_q_bwd, bk=sizes.block_k_bwd, num_warps=sizes.num_warps_bwd or sizes.num_warps,
        num_stages=sizes.num_stages_bwd or sizes.num_stages,
        interpret=config.interpret,
    )
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def pallas_packed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sample_id: jax.Array,
    split_id: jax.Array,
    split_kind: jax.Array,
    interpret: bool = False,
    *,
    backend: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Fused packed-split attention; same contract as ``kernels.attention.packed_attention``. Returns ``[B, T, Hq, D]``.

    ``backend``: ``"triton"`` | ``"mosaic"`` | None (Mosaic on TPU, Triton otherwise; with ``interpret=True``
    either runs on CPU). ``block_sizes``: None for the per-platform defaults.
    """
    backend = backend or dispatch.pallas_backend()  # Mosaic when tracing for TPU, Triton otherwise
    if backend not in BACKENDS:
        raise ValueError(f"pallas_packed_attention: backend must be one of {BACKENDS}; got {backend!r}")
    batch, seq_len, _, head_dim = q.shape
    # Triton tiles must have power-of-two sides, and SigLIP's head_dim is 72: zero columns appended to q and k
    # leave every q·k unchanged, those appended to v give output columns that are sliced off (the scale stays
    # that of the true head_dim).
    lanes = triton_head_dim(head_dim) if backend == "triton" else head_dim
    sizes = block_sizes or default_block_sizes(backend, lanes, interpret)
    padded = -(-seq_len // sizes.multiple) * sizes.multiple
    pad = padded - seq_len
    meta = jnp.stack([sample_id, split_id, split_kind], axis=1).astype(jnp.int32)  # [B, 3, T]
    if pad or lanes != head_dim:  # one copy of q, k, v for both paddings
        widths = ((0, 0), (0, pad), (0, 0), (0, lanes - head_dim))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    if pad:
        # Padding: sample -1 (invisible both ways); split/kind values are irrelevant.
        meta = jnp.concatenate([meta, jnp.broadcast_to(jnp.array([-1, 0, 0], jnp.int32)[None, :, None],
                                                       (batch, 3, pad))], axis=2)
    config = _Config(backend=backend, sizes=sizes, scale=head_dim**-0.5, interpret=bool(interpret))
    out = _attention(config, q, k, v, meta)
    return out[:, :seq_len, :, :head_dim]


def triton_head_dim(head_dim: int) -> int:
    """The smallest power of two ≥ ``head_dim`` and ≥ 16 (Triton's smallest dot operand side)."""
    return max(16, 1 << (head_dim - 1).bit_length())
