"""The memory-bounded chunked attention equals the dense reference: values and gradients, random packs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synermedgen_jax.kernels.attention import packed_attention, reference_attention
from synermedgen_jax.kernels.attention.chunked import chunked_attention
from synermedgen_jax.kernels.synthetic_packs import layout_pack, random_samples


def _pack(seed: int, batch: int, seq_len: int, q_heads: int, kv_heads: int, head_dim: int):
    rng = np.random.default_rng(seed)
    meta = []
    for _ in range(batch):
        gap = int(rng.integers(0, 5))  # drawn first so the samples leave room for it
        meta.append(layout_pack(random_samples(rng, seq_len - gap), seq_len, region_gap=gap))
    sample_id, split_id, split_kind = (jnp.asarray(np.stack([m[i] for m in meta])) for i in range(3))
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq_len, q_heads, head_dim))
    k = jax.random.normal(keys[1], (batch, seq_len, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, seq_len, kv_heads, head_dim))
    d_out = jax.random.normal(keys[3], q.shape)
    return q, k, v, (sample_id, split_id, split_kind), d_out


@pytest.mark.parametrize("seq_len,chunk,q_heads,kv_heads", [(64, 16, 4, 2), (70, 32, 6, 2), (48, 48, 2, 2)])
def test_chunked_equals_reference(seq_len, chunk, q_heads, kv_heads):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    q, k, v, meta, d_out = _pack(seed, 2, seq_len, q_heads, kv_heads, 16)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, *meta) * d_out)

    chunked = lambda q, k, v, *m: chunked_attention(q, k, v, *m, chunk=chunk)
    np.testing.assert_allclose(chunked(q, k, v, *meta), reference_attention(q, k, v, *meta), atol=2e-5)
    grads = jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: loss(reference_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", grads, expected):
        assert np.isfinite(np.asarray(got)).all(), name
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"d{name}")


def test_padding_rows_are_zero_and_dispatch_works():
    q, k, v, meta, _ = _pack(3, 1, 32, 2, 1, 16)
    sample_id = meta[0].at[:, 20:].set(-1)
    out = packed_attention(q, k, v, sample_id, meta[1], meta[2], impl="chunked")
    assert np.all(np.asarray(out)[:, 20:] == 0)
    np.testing.assert_allclose(out, reference_attention(q, k, v, sample_id, meta[1], meta[2]), atol=2e-5)
