"""Fused packed-split attention (Pallas, interpret mode) against the dense jnp reference.

Both kernel families (Triton-style for GPU, Mosaic-style for TPU) run here in interpret mode. Shapes stay
fixed per test so each jitted kernel compiles once; hypothesis varies the packs (samples, split kinds and
lengths, und/gen regions, padding gaps, empty batch rows) and the values.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synermedgen_jax.kernels import dispatch
from synermedgen_jax.kernels.attention import packed_attention, reference_attention, visibility_mask
from synermedgen_jax.kernels.attention.block_map import block_map, block_skip_fraction, visible_lists
from synermedgen_jax.kernels.attention.pallas import BlockSizes, pallas_packed_attention
from synermedgen_jax.kernels.attention.tile_math import CAUSAL, FULL, NOISE
from synermedgen_jax.kernels.synthetic_packs import (
    GEN,
    UND,
    causal_samples,
    layout_pack,
    stage1_samples,
    stage2_samples,
)

BATCH, SEQ, HQ, HKV, DIM = 2, 120, 4, 2, 64  # T=120 pads to 128: the padding path runs in every example
BLOCKS = BlockSizes(32, 32, 32, 32)
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def packs(draw, batch: int = BATCH, seq_len: int = SEQ):
    """``[batch, seq_len]`` int32 metadata; a row may be all padding."""
    rows = []
    for _ in range(batch):
        samples, budget = [], seq_len - 8
        for _ in range(draw(st.integers(0, 4))):
            splits = draw(st.lists(
                st.tuples(st.sampled_from([CAUSAL, FULL, NOISE]), st.integers(1, 30), st.sampled_from([UND, GEN])),
                min_size=1, max_size=4,
            ))
            kept = []
            for split in splits:
                if split[1] <= budget:
                    kept.append(split)
                    budget -= split[1]
            if kept:
                samples.append(kept)
        rows.append(layout_pack(samples, seq_len, region_gap=draw(st.integers(0, 8))))
    return tuple(np.stack(x) for x in zip(*rows))


def _values(seed, shapes, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def _shapes(batch=BATCH, seq=SEQ, hq=HQ, hkv=HKV, dim=DIM):
    return [(batch, seq, hq, dim), (batch, seq, hkv, dim), (batch, seq, hkv, dim), (batch, seq, hq, dim)]


@functools.cache
def _pallas_vjp(backend: str, blocks: BlockSizes = BLOCKS):
    def run(q, k, v, w, sample_id, split_id, split_kind):
        fn = lambda q, k, v: pallas_packed_attention(
            q, k, v, sample_id, split_id, split_kind, True, backend=backend, block_sizes=blocks
        )
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(w.astype(out.dtype))

    return jax.jit(run)


@jax.jit
def _reference_vjp(q, k, v, w, sample_id, split_id, split_kind):
    # float32 reference whatever the kernel's dtype: the bf16 test measures the kernel's rounding alone.
    q, k, v, w = (x.astype(jnp.float32) for x in (q, k, v, w))
    out, vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, sample_id, split_id, split_kind), q, k, v)
    return out, vjp(w)


def _max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@SETTINGS
@given(meta=packs(), seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_reference_f32(backend, meta, seed):
    q, k, v, w = _values(seed, _shapes())
    out, grads = _pallas_vjp(backend)(q, k, v, w, *meta)
    ref_out, ref_grads = _reference_vjp(q, k, v, w, *meta)
    assert _max_err(out, ref_out) <= 2e-5
    for name, g, r in zip("qkv", grads, ref_grads):
        assert bool(jnp.all(jnp.isfinite(g))), f"d{name} has non-finite values"
        assert _max_err(g, r) <= 1e-4, f"d{name}"


@pytest.mark.parametrize(
    ("backend", "hq", "hkv", "dim"),
    [("triton", 4, 1, 128), ("mosaic", 4, 1, 128), ("triton", 2, 2, 64), ("mosaic", 6, 3, 64),
     ("triton", 4, 4, 72), ("mosaic", 2, 2, 72)],  # 72: SigLIP-so400m (Triton pads it to 128)
)
def test_head_dims_and_gqa_ratios(backend, hq, hkv, dim):
    rng = np.random.default_rng(hq * 100 + dim)
    meta = tuple(np.stack(x) for x in zip(*[layout_pack(
        [[(CAUSAL, 10, UND), (FULL, 16, UND), (FULL, 16, GEN), (NOISE, 16, GEN)], [(CAUSAL, 30, UND)]], 96, 5
    ), layout_pack(
        [[(CAUSAL, int(rng.integers(5, 40)), UND), (NOISE, 20, GEN)]], 96
    )]))
    q, k, v, w = _values(dim + hq, _shapes(seq=96, hq=hq, hkv=hkv, dim=dim))
    out, grads = _pallas_vjp(backend)(q, k, v, w, *meta)
    ref_out, ref_grads = _reference_vjp(q, k, v, w, *meta)
    assert _max_err(out, ref_out) <= 2e-5
    for g, r in zip(grads, ref_grads):
        assert _max_err(g, r) <= 1e-4


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_bfloat16_within_2e_2(backend):
    meta = tuple(np.stack(x) for x in zip(*[
        layout_pack(stage2_samples(2, 8, 12, 16), SEQ, 4), layout_pack(stage1_samples(3, 10, 16, 6), SEQ)
    ]))
    q, k, v, w = _values(7, _shapes(), jnp.bfloat16)
    out, grads = _pallas_vjp(backend)(q, k, v, w, *meta)
    ref_out, ref_grads = _reference_vjp(q, k, v, w, *meta)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert _max_err(out, ref_out) <= 2e-2
    for g, r in zip(grads, ref_grads):
        # Gradients reach |g| ~ 5 here; bf16 keeps 8 mantissa bits, so the bound is relative to the scale.
        assert _max_err(g, r) <= 2e-2 * max(1.0, float(jnp.max(jnp.abs(r))))


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_rows_that_see_nothing_give_zeros_and_zero_grads(backend):
    # Row 0 is all padding; row 1 has a sample followed by a padding gap and a gen region.
    empty = layout_pack([], SEQ)
    some = layout_pack([[(CAUSAL, 20, UND), (NOISE, 30, GEN)]], SEQ, region_gap=17)
    meta = tuple(np.stack(x) for x in zip(empty, some))
    q, k, v, w = _values(3, _shapes())
    out, grads = _pallas_vjp(backend)(q, k, v, w, *meta)
    padding = jnp.asarray(meta[0] < 0)[:, :, None, None]
    assert bool(jnp.all(jnp.isfinite(out))) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert float(jnp.max(jnp.abs(jnp.where(padding, out, 0)))) == 0.0
    for g in grads:
        assert float(jnp.max(jnp.abs(jnp.where(padding, g, 0)))) == 0.0
    ref_out, ref_grads = _reference_vjp(q, k, v, w, *meta)
    assert _max_err(out, ref_out) <= 2e-5


def _nan_blocks(x, block=32):
    """``[B, T, H, D]`` → ``[B, ceil(T / block)]``: which token blocks hold a NaN."""
    rows = np.asarray(jnp.any(jnp.isnan(x), axis=(2, 3)))
    rows = np.pad(rows, ((0, 0), (0, -rows.shape[1] % block)))
    return rows.reshape(rows.shape[0], -1, block).any(-1)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_skipped_blocks_are_never_computed(backend):
    """NaN planted in a key block (query block) reaches exactly the query (key) blocks the map lets see it."""
    # Blocks of 32: [0] both samples' text+ViT (und region), [1] sample 0's clean+noised VAE, [2] sample 1's,
    # [3] padding. Block 1 is visible to itself only; block 1's queries see blocks 0 and 1.
    meta = tuple(np.stack(x) for x in zip(*[layout_pack(stage2_samples(2, 8, 8, 16), SEQ)] * BATCH))
    q, k, v, w = _values(11, _shapes())
    padded = tuple(np.pad(x, ((0, 0), (0, 128 - SEQ)), constant_values=-1) for x in meta)
    visible = np.asarray(block_map(*map(jnp.asarray, padded), 32, 32))  # [B, nq, nk]
    gen_block = 1
    span = slice(gen_block * 32, (gen_block + 1) * 32)
    out, (dq, _, _) = _pallas_vjp(backend)(q, k, v.at[:, span].set(jnp.nan), w, *meta)
    np.testing.assert_array_equal(_nan_blocks(out), visible[:, :, gen_block])
    np.testing.assert_array_equal(_nan_blocks(dq), visible[:, :, gen_block])
    _, (_, dk, dv) = _pallas_vjp(backend)(q.at[:, span].set(jnp.nan), k, v, w, *meta)
    for g in (dk, dv):
        np.testing.assert_array_equal(_nan_blocks(g), visible[:, gen_block, :])
    # The planted blocks are invisible to some blocks, so the assertions above test skipping.
    assert not visible[:, :, gen_block].all() and not visible[:, gen_block, :].all()


def _dense_blocks(meta, bq, bk):
    mask = np.asarray(visibility_mask(*map(jnp.asarray, meta)))
    b, t, _ = mask.shape
    return mask.reshape(b, t // bq, bq, t // bk, bk).any(axis=(2, 4))


@SETTINGS
@given(meta=packs(seq_len=128), bq=st.sampled_from([16, 32, 64]), bk=st.sampled_from([16, 32, 64]))
def test_block_map_never_drops_a_visible_block(meta, bq, bk):
    dense = _dense_blocks(meta, bq, bk)
    computed = np.asarray(block_map(*map(jnp.asarray, meta), bq, bk))
    assert not np.any(dense & ~computed)


@SETTINGS
@given(
    lengths=st.lists(st.tuples(st.sampled_from([CAUSAL, FULL, NOISE]), st.integers(1, 3), st.sampled_from([UND, GEN])),
                     min_size=1, max_size=6),
    num_samples=st.integers(1, 3), gap=st.integers(0, 2),
)
def test_block_map_is_exact_on_block_aligned_packs(lengths, num_samples, gap):
    block = 16
    samples = [[(kind, n * block, region) for kind, n, region in lengths]] * num_samples
    total = num_samples * sum(n for _, n, _ in lengths) * block + gap * block
    seq = -(-max(total, block) // 64) * 64
    meta = tuple(x[None] for x in layout_pack(samples, seq, region_gap=gap * block))
    dense = _dense_blocks(meta, block, block)
    np.testing.assert_array_equal(np.asarray(block_map(*map(jnp.asarray, meta), block, block)), dense)
    assert float(block_skip_fraction(*map(jnp.asarray, meta), block, block)) == pytest.approx(dense.mean())


@pytest.mark.parametrize("samples", [
    stage2_samples(4, 32, 64, 64), stage1_samples(8, 24, 64, 8), causal_samples(4, 256), causal_samples(1, 1024),
], ids=["stage2", "stage1", "causal_docs", "causal"])
@pytest.mark.parametrize(("bq", "bk"), [(64, 64), (128, 64), (256, 256)])
def test_block_map_is_exact_on_typical_packs(samples, bq, bk):
    # Blocks straddle sample boundaries here (e.g. 256-token blocks over 224-token samples): the per-sample
    # parts of the block summaries keep the map exact.
    meta = tuple(x[None] for x in layout_pack(samples, 1024))
    dense = _dense_blocks(meta, bq, bk)
    np.testing.assert_array_equal(np.asarray(block_map(*map(jnp.asarray, meta), bq, bk)), dense)


def test_visible_lists_are_compacted_and_padded_with_the_last_index():
    visible = jnp.asarray([[[True, False, True, False], [False, False, False, False]]])
    lists = visible_lists(visible)
    np.testing.assert_array_equal(lists.kv_index, [[[0, 2, 2, 2], [0, 0, 0, 0]]])
    np.testing.assert_array_equal(lists.kv_count, [[2, 0]])
    np.testing.assert_array_equal(lists.q_count, [[1, 0, 1, 0]])


def test_dispatch_impls_agree_and_bad_input_is_named():
    meta = tuple(x[None] for x in layout_pack(stage2_samples(2, 10, 12, 14), 112))
    q, k, v, _ = _values(5, _shapes(batch=1, seq=112))
    ref = packed_attention(q, k, v, *meta, impl="reference")
    # Every name kernels/dispatch.py lets a config give computes (compiled "pallas" needs a GPU/TPU).
    for impl in sorted(set(dispatch.ATTENTION_IMPLS) - {"reference", "pallas"}):
        assert _max_err(packed_attention(q, k, v, *meta, impl=impl), ref) <= 2e-5, impl
    with pytest.raises(ValueError, match="unknown impl"):
        packed_attention(q, k, v, *meta, impl="flash")
    with pytest.raises(ValueError, match="split_kind"):
        packed_attention(q, k, v, meta[0], meta[1], meta[2][:, :5])
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_q=48)


_MESH_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from synermedgen_jax.kernels.attention import packed_attention, reference_attention
    from synermedgen_jax.kernels.attention.pallas import BlockSizes
    from synermedgen_jax.kernels.synthetic_packs import layout_pack, stage2_samples, stage1_samples
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rows = [layout_pack(stage2_samples(2, 8, 12, 10), 96, 3), layout_pack(stage1_samples(3, 8, 12, 6), 96)]
    meta = tuple(jnp.asarray(np.stack(x)) for x in zip(*rows))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 96, 4, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 96, 2, 64)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    def loss(q, k, v, **kw):
        return jnp.sum(packed_attention(q, k, v, *meta, **kw) * w)
    sharded = jax.jit(jax.value_and_grad(lambda q, k, v: loss(
        q, k, v, impl="pallas_interpret", mesh=mesh, block_sizes=BlockSizes(32, 32, 32, 32)), argnums=(0, 1, 2)))
    val, grads = sharded(q, k, v)
    ref_val, ref_grads = jax.value_and_grad(lambda q, k, v: loss(q, k, v), argnums=(0, 1, 2))(q, k, v)
    assert abs(float(val - ref_val)) <= 1e-3 * max(1.0, abs(float(ref_val))), (val, ref_val)
    for g, r in zip(grads, ref_grads):
        assert float(jnp.max(jnp.abs(g - r))) <= 1e-4
    hlo = sharded.lower(q, k, v).compile().as_text()
    assert "all-gather" not in hlo, "K/V were gathered"
    # Heads that do not divide over tensor=2 (3 q / 1 K/V): the kernel still runs per device (rows over
    # data x tensor here) and gives the reference's answer.
    odd = lambda q, k, v: packed_attention(q, k, v, *meta, impl="pallas_interpret", mesh=mesh,
                                           block_sizes=BlockSizes(32, 32, 32, 32))
    q3, k1, v1 = q[:, :, :3], k[:, :, :1], v[:, :, :1]
    got = jax.jit(odd)(q3, k1, v1)
    assert float(jnp.max(jnp.abs(got - reference_attention(q3, k1, v1, *meta)))) <= 1e-5
    print("MESH_OK")
""")


def test_shard_map_on_simulated_four_device_mesh():
    # A fresh process: the device count flag must be set before jax initialises, which this process did.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert "MESH_OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
