"""Sampler: KV-cached step vs the uncached model forward, the CFG + Euler combination vs numpy, determinism.

Tiny model, float32, 4 sampling steps; every jitted function compiles once per module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from synermedgen_jax.data.packing import Geometry, SpecialTokens
from synermedgen_jax.inference import sampler as smp
from synermedgen_jax.inference.kv_cache import forward_cached, prefill
from synermedgen_jax.modeling import llm
from synermedgen_jax.modeling.synermedgen import SynerMedGen

SPECIAL = SpecialTokens(bos=1, eos=2, vision_start=3, vision_end=4, pad=0)
IMAGE, VIT = (16, 16), (28, 28)
INSTRUCTION = [17, 41, 9, 230, 77]


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def model(tiny_config):
    config = tiny_config.copy_and_resolve_references()
    config.vae.sample_posterior = False
    config.timestep_shift = 2.0  # so the test also checks the inverse of the training-time shift
    model = SynerMedGen(config, rngs=nnx.Rngs(params=0))
    # llm2vae starts at zero (as BAGEL): give it weights so velocities are not trivially equal.
    model.llm2vae.kernel.value = 0.2 * jax.random.normal(jax.random.key(1), model.llm2vae.kernel.value.shape)
    model.llm2vae.bias.value = 0.1 * jax.random.normal(jax.random.key(2), model.llm2vae.bias.value.shape)
    return model


def _sources(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, 20, 20)).astype(np.float32)  # not the model size: exercises the resize


def _packs(model, sources):
    samples = smp.context_samples(INSTRUCTION, sources, IMAGE, VIT)
    geometry = Geometry.from_model_config(model.config)
    out = {}
    for name in smp.PASSES:
        batch, budget = smp.exact_pack(samples[name], geometry, SPECIAL, IMAGE, VIT)
        out[name] = (batch, smp.generation_layout(batch, budget), budget)
    return out


def _cached_step(model, batch, layout, source_tokens, x_t, t):
    x_ctx, meta = smp.context_embeddings(model, batch, layout, source_tokens)
    cache = prefill(model.language_model, x_ctx, len(layout.ctx_und), meta)[1]
    x_q, q_meta = smp.query_embeddings(model, batch, layout, x_t, t)
    und = len(layout.q_und)
    hidden = forward_cached(model.language_model, x_q, und, q_meta, cache)[0]
    return model.llm2vae(hidden[:, und:])


_cached = nnx.jit(_cached_step, static_argnums=(2,))


def _step_inputs(model, name):
    sources = _sources(2)
    batch, layout, budget = _packs(model, sources)[name]
    source_tokens = smp.source_latent_tokens(model, jnp.asarray(batch.vae_images[:, 0]), None, False)
    x_t = jax.random.normal(jax.random.key(3), (2, len(layout.q_gen), source_tokens.shape[-1]))
    return batch, layout, budget, source_tokens, x_t


def _training_velocity(model, batch, layout, budget, source_tokens, x_t, t):
    """The uncached reference: SynerMedGen.__call__ (the training forward) on the same pack, its generation
    input built as in training (training/objective.flow_matching_inputs: x0 gathered per token by latent_index,
    t from the pack's logits through the training shift, x_t = (1 - t)·x0 + t·ε). The target slot's x0 and ε
    are both the sampler's x_t, so its x_t is exactly that whatever t; its logit inverts the training shift so
    that the forward's t is exactly the sampler's t; the source slot is clean (logit −inf, t = 0)."""
    from synermedgen_jax.training.objective import flow_matching_inputs

    token_dim = source_tokens.shape[-1]
    q_gen, ctx_gen = np.asarray(layout.q_gen), np.asarray(layout.ctx_gen, int)
    index = batch.latent_index[0]
    slots = budget.vae_images
    clean = np.zeros((2, slots * source_tokens.shape[1], token_dim), np.float32)
    clean[:, index[q_gen]] = np.asarray(x_t)
    if len(ctx_gen):
        clean[:, index[ctx_gen]] = np.asarray(source_tokens)[:, index[ctx_gen]]
    noise = np.zeros((2, budget.gen_tokens, token_dim), np.float32)
    noise[:, q_gen] = np.asarray(x_t)
    s = model.config.timestep_shift
    u = t / (s - (s - 1.0) * t)
    logit = np.where(np.isfinite(batch.timestep_logit), np.log(u / (1.0 - u)), -np.inf).astype(np.float32)
    pack = jax.tree.map(jnp.asarray, batch.replace(timestep_logit=logit))

    def forward(m, pack, clean, noise):
        flow = flow_matching_inputs(m, pack, clean, noise)
        return m(pack, flow.noised, flow.t)

    outputs = nnx.jit(forward)(model, pack, jnp.asarray(clean), jnp.asarray(noise))
    return np.asarray(outputs["velocity"])[:, q_gen]


@pytest.mark.parametrize("name", smp.PASSES)
def test_cached_step_equals_uncached_forward(model, name):
    batch, layout, budget, source_tokens, x_t = _step_inputs(model, name)
    t = 0.7
    jbatch = jax.tree.map(jnp.asarray, batch)
    cached = _cached(model, jbatch, layout, source_tokens, x_t, jnp.float32(t))
    reference = _training_velocity(model, batch, layout, budget, source_tokens, x_t, t)
    assert np.abs(reference).max() > 0.1  # a meaningful comparison
    np.testing.assert_allclose(np.asarray(cached), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_cached_sampler_and_training_forward_run_the_same_layer_code(model, remat, monkeypatch):
    """The cached sampler step (prefill + forward_cached) and the training forward (SynerMedGen.__call__, with
    the remat policy of training) give the same velocities, float32, |Δ| ≤ 1e-4, and both go through the one
    ``MoTAttention.__call__``: without a cache for training and prefill, with a ``LayerCache`` for the step."""
    calls = []
    attention_call = llm.MoTAttention.__call__

    def spy(self, x, und_tokens, meta, rope, cache=None):
        calls.append((x.shape[1], cache is not None))
        return attention_call(self, x, und_tokens, meta, rope, cache)

    monkeypatch.setattr(llm.MoTAttention, "__call__", spy)
    config = model.config.as_configdict()
    config.remat = remat
    monkeypatch.setattr(model.language_model, "config", ml_collections.FrozenConfigDict(config))
    batch, layout, budget, source_tokens, x_t = _step_inputs(model, "cond")
    t, layers = 0.4, model.config.llm.num_layers
    jbatch = jax.tree.map(jnp.asarray, batch)
    cached = np.asarray(nnx.jit(_cached_step, static_argnums=(2,))(
        model, jbatch, layout, source_tokens, x_t, jnp.float32(t)))
    context, query = len(layout.ctx_und) + len(layout.ctx_gen), len(layout.q_und) + len(layout.q_gen)
    assert calls == [(context, False)] * layers + [(query, True)] * layers
    calls.clear()
    trained = _training_velocity(model, batch, layout, budget, source_tokens, x_t, t)
    assert calls == [(batch.und_tokens + budget.gen_tokens, False)] * layers
    assert np.abs(trained).max() > 0.1
    np.testing.assert_allclose(cached, trained, atol=1e-4, rtol=0)
    # The uncached sampler step is the training forward itself (SynerMedGen.__call__ with the sampler's
    # generation tokens: the clean source at t = 0, x_t at t).
    calls.clear()
    x_und = nnx.jit(lambda m, b: m.embed_understanding(b))(model, jbatch)
    uncached = np.asarray(nnx.jit(smp.uncached_velocity, static_argnums=(2,))(
        model, jbatch, layout, x_und, source_tokens, x_t, jnp.float32(t)))
    assert calls == [(batch.und_tokens + budget.gen_tokens, False)] * layers
    np.testing.assert_allclose(uncached, trained, atol=1e-4, rtol=0)


def test_contexts_follow_bagel_rope_and_splits(model):
    packs = _packs(model, _sources(1))
    text_len = len(INSTRUCTION) + 2
    expected_target_rope = {"cond": text_len + 2, "text_uncond": 2, "img_uncond": text_len}
    for name, (batch, layout, _) in packs.items():
        tu = layout.und_tokens
        q_rope = np.concatenate([batch.rope_id[0, list(layout.q_und)], batch.rope_id[0, tu + np.asarray(
            layout.q_gen)]])
        assert set(q_rope.tolist()) == {expected_target_rope[name]}, name
        assert len(layout.q_und) == 2 and len(layout.q_gen) == 16
    assert len(packs["img_uncond"][1].ctx_gen) == 0
    assert len(packs["text_uncond"][1].ctx_und) == (4 + 2) + 2  # ViT: 4 patches + 2 markers; VAE: 2 markers


def _numpy_cfg(v, vt, vi, cfg_text, cfg_img, renorm, renorm_min):
    """BAGEL's _forward_flow guidance, written again in numpy for one image ``[N, C]`` (float64)."""
    v, vt, vi = (a.astype(np.float64) for a in (v, vt, vi))
    text = vt + cfg_text * (v - vt)
    if renorm == "text_channel":
        scale = np.clip(np.linalg.norm(v, axis=-1, keepdims=True)
                        / (np.linalg.norm(text, axis=-1, keepdims=True) + 1e-8), renorm_min, 1.0)
        text = text * scale
        return vi + cfg_img * (text - vi) if cfg_img > 1.0 else text
    guided = vi + cfg_img * (text - vi) if cfg_img > 1.0 else text
    scale = np.clip(np.linalg.norm(v) / (np.linalg.norm(guided) + 1e-8), renorm_min, 1.0)
    return guided * scale


@pytest.mark.parametrize("renorm,renorm_min,interval,t", [
    ("text_channel", 0.0, (0.0, 1.0), 0.8),
    ("global", 0.0, (0.0, 1.0), 0.8),
    ("global", 0.7, (0.0, 1.0), 0.3),
    ("text_channel", 0.5, (0.4, 1.0), 0.3),  # outside the interval: plain Euler with the conditional v
])
def test_cfg_step_matches_numpy(renorm, renorm_min, interval, t):
    rng = np.random.default_rng(7)
    x, v, vt, vi = (rng.standard_normal((3, 12, 8)).astype(np.float32) for _ in range(4))
    vt = v + 0.3 * vt  # guidance moves the velocity without flipping it: the clamp binds on some tokens
    dt = 0.05
    config = smp.SamplerConfig(cfg_text=4.0, cfg_img=1.5, renorm=renorm, renorm_min=renorm_min,
                               cfg_interval=interval)
    got = np.asarray(smp._guided_step(config, *(jnp.asarray(a) for a in (x, v, vt, vi)), jnp.float32(t),
                                      jnp.float32(dt)))
    active = interval[0] < t <= interval[1]
    want = np.stack([x[b] - dt * (_numpy_cfg(v[b], vt[b], vi[b], 4.0, 1.5, renorm, renorm_min) if active else v[b])
                     for b in range(3)])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_timestep_schedule_matches_bagel_formula():
    t, dt = smp.timestep_schedule(50, 3.0)
    lin = np.linspace(1.0, 0.0, 50)
    shifted = 3.0 * lin / (1.0 + 2.0 * lin)
    np.testing.assert_allclose(t, shifted[:-1], atol=1e-6)
    np.testing.assert_allclose(dt, shifted[:-1] - shifted[1:], atol=1e-6)
    assert len(t) == 49 and abs(dt.sum() - 1.0) < 1e-5


def test_sampler_cached_equals_uncached_and_is_batch_independent(model):
    sources = _sources(3, seed=1)
    base = dict(num_steps=4, cfg_interval=(0.0, 1.0))
    cached = smp.Sampler(model, SPECIAL, IMAGE, VIT, smp.SamplerConfig(**base))
    uncached = smp.Sampler(model, SPECIAL, IMAGE, VIT, smp.SamplerConfig(**base, use_cache=False))
    done = []
    a = cached.generate(sources, INSTRUCTION, seed=5, batch_size=2, progress=done.append)
    b = uncached.generate(sources, INSTRUCTION, seed=5, batch_size=2)
    assert a.shape == (3, 16, 16) and done == [2, 1]
    assert np.all(np.abs(a) <= 1.0) and a.std() > 1e-3
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    # Slice i's noise depends on (seed, indices[i]) only: the third slice alone gives the same image.
    c = cached.generate(sources[2:], INSTRUCTION, seed=5, batch_size=2, indices=[2])
    np.testing.assert_allclose(c[0], a[2], atol=1e-5, rtol=0)
    d = cached.generate(sources[2:], INSTRUCTION, seed=6, batch_size=2, indices=[2])
    assert np.abs(d[0] - a[2]).max() > 1e-3


def test_sampler_with_fused_step_kernel_equals_reference(model):
    """The CFG + Euler step through the Pallas kernel (interpret mode) gives the jnp reference's images."""
    sources = _sources(2, seed=3)
    base = dict(num_steps=3, cfg_interval=(0.0, 1.0))
    reference = smp.Sampler(model, SPECIAL, IMAGE, VIT, smp.SamplerConfig(**base))
    fused = smp.Sampler(model, SPECIAL, IMAGE, VIT, smp.SamplerConfig(**base, step_impl="pallas_interpret"))
    a = reference.generate(sources, INSTRUCTION, seed=9, batch_size=2)
    b = fused.generate(sources, INSTRUCTION, seed=9, batch_size=2)
    assert a.std() > 1e-3
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
