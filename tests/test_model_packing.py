"""Packing, visibility and MoT routing properties of the model core."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from synermedgen_jax.data.packing import (
    CAUSAL,
    NOISE,
    Dropped,
    Pack,
    PackBudget,
    PackBuilder,
    PackOverflowError,
    SpecialTokens,
    Text,
    VaeImage,
    VitImage,
    pack_samples,
    stack_rows,
)
from synermedgen_jax.kernels.attention import visibility_mask
from synermedgen_jax.modeling.synermedgen import SynerMedGen
from synermedgen_jax.training.objective import Prepared, UnifiedObjective

SPECIAL = SpecialTokens(bos=1, eos=2, vision_start=3, vision_end=4, pad=0)
BUDGET = PackBudget(und_tokens=96, gen_tokens=64, vit_patches=16, vit_images=4, vae_images=4, ce_tokens=24,
                    image_size=(16, 16), vit_image_size=(28, 28))


def _random_sample(draw_or_rng, rng: np.random.Generator):
    """A random sample: texts (some with loss), ViT images, clean and noised VAE images, dropped items."""
    items = []
    for _ in range(rng.integers(1, 5)):
        kind = rng.integers(0, 5)
        if kind == 0 or not items:
            items.append(Text(rng.integers(5, 60, size=rng.integers(1, 6)).tolist(), loss=bool(rng.integers(2))))
        elif kind == 1:
            items.append(VitImage(rng.uniform(-1, 1, (14, 14 * rng.integers(1, 3))).astype(np.float32)))
        elif kind == 2:
            items.append(VaeImage(rng.uniform(-1, 1, (8, 8)).astype(np.float32), noised=bool(rng.integers(2))))
        elif kind == 3:
            items.append(Dropped("vit"))
        else:
            items.append(Text(rng.integers(5, 60, size=2).tolist()))
    return items


def _bagel_mask(split_lens, attn_modes):
    """BAGEL's per-sample rule, written pair by pair over its own sequence order (independent of our code)."""
    n = sum(split_lens)
    starts = np.cumsum([0, *split_lens])
    split_of = np.repeat(np.arange(len(split_lens)), split_lens)
    mask = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            si, sj = split_of[i], split_of[j]
            if sj > si:
                continue
            if sj < si:
                mask[i, j] = attn_modes[sj] != "noise"
            else:
                mask[i, j] = attn_modes[si] != "causal" or j <= i
    del starts
    return mask


def _bagel_order(row, und_tokens):
    """Per sample: our token positions in BAGEL's sequence order, with the split lengths and modes."""
    sample_id, split_id, split_kind = row["sample_id"], row["split_id"], row["split_kind"]
    modes = {CAUSAL: "causal", 1: "full", NOISE: "noise"}
    samples = []
    for sample in sorted(set(sample_id[sample_id >= 0].tolist())):
        order, lens, kinds = [], [], []
        for split in sorted(set(split_id[sample_id == sample].tolist())):
            positions = np.flatnonzero((sample_id == sample) & (split_id == split))
            und = positions[positions < und_tokens]
            gen = positions[positions >= und_tokens]
            # BAGEL: [start marker, tokens, end marker]; our und region keeps the markers, gen holds the latents.
            seq = [und[0], *gen, *und[1:]] if len(gen) else list(und)
            order.extend(seq)
            lens.append(len(seq))
            kinds.append(modes[int(split_kind[positions[0]])])
        samples.append((order, lens, kinds))
    return samples


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_visibility_equals_bagel_rule_after_relayout(seed):
    rng = np.random.default_rng(seed)
    builder = PackBuilder(BUDGET, SPECIAL, _GEOMETRY)
    samples = [_random_sample(None, rng) for _ in range(rng.integers(1, 4))]
    rows = pack_samples(samples, builder, rng)
    for row in rows:
        ours = np.asarray(visibility_mask(*(jnp.asarray(row[k])[None] for k in ("sample_id", "split_id",
                                                                               "split_kind"))))[0]
        expected = np.zeros_like(ours)
        for order, lens, kinds in _bagel_order(row, BUDGET.und_tokens):
            expected[np.ix_(order, order)] = _bagel_mask(lens, kinds)
        np.testing.assert_array_equal(ours, expected)


def test_rope_ids_and_labels_follow_bagel():
    builder = PackBuilder(BUDGET, SPECIAL, _GEOMETRY)
    rng = np.random.default_rng(0)
    img = np.zeros((8, 8), np.float32)
    builder.add([Text([10, 11], loss=True), VitImage(np.zeros((14, 28), np.float32)), Dropped("vae"),
                 VaeImage(img), VaeImage(img, noised=True), Text([12])], rng)
    row = builder.build()
    und = np.flatnonzero(row["sample_id"][: BUDGET.und_tokens] == 0)
    # text: 0..3 (bos, 10, 11, eos); vit split: 4; dropped vae: +1; clean vae: 6; noised: 7 (no advance); text 7..9
    assert row["rope_id"][und].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 6, 6, 7, 7, 7, 8, 9]
    assert row["token_ids"][und].tolist() == [1, 10, 11, 2, 3, 0, 0, 4, 3, 4, 3, 4, 1, 12, 2]
    assert row["ce_label"][row["ce_mask"] > 0].tolist() == [10, 11, 2]
    assert row["ce_index"][row["ce_mask"] > 0].tolist() == [0, 1, 2]
    gen = row["sample_id"][BUDGET.und_tokens:] == 0
    assert gen.sum() == 8  # two 8x8 images at stride 4 → 2x2 latent tokens each
    assert np.isneginf(row["timestep_logit"][:4]).all() and np.isfinite(row["timestep_logit"][4:8]).all()
    assert row["mse_mask"][:8].tolist() == [0] * 4 + [1] * 4


def test_prompt_items_put_each_label_before_its_image():
    from synermedgen_jax.data.packing import prompt_items

    # Each image's label text comes right before it, so answers can name images by label.
    images = [np.full((28, 28), float(i), np.float32) for i in range(3)]
    items = prompt_items([7, 8], images, [[1], [2, 3], [4]])
    assert [type(item) for item in items] == [Text, Text, VitImage, Text, VitImage, Text, VitImage]
    assert [list(item.token_ids) for item in items if isinstance(item, Text)] == [[7, 8], [1], [2, 3], [4]]
    assert [float(item.pixels[0, 0]) for item in items if isinstance(item, VitImage)] == [0.0, 1.0, 2.0]
    assert [type(item) for item in prompt_items([7], images)] == [Text] + [VitImage] * 3
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        prompt_items([7], images, [[1], [2]])


def test_overflow_is_an_error_not_truncation():
    builder = PackBuilder(BUDGET, SPECIAL, _GEOMETRY)
    with pytest.raises(PackOverflowError, match="budget"):
        builder.add([Text(list(range(5, 5 + 200)))], np.random.default_rng(0))
    with pytest.raises(ValueError, match="multiples of 14"):
        builder.add([VitImage(np.zeros((15, 14), np.float32))], np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------------
# Whole-model properties (tiny config, float32, fixed noise).
@pytest.fixture(scope="module")
def model_config(tiny_config):
    config = tiny_config.copy_and_resolve_references()
    config.vae.sample_posterior = False  # deterministic latents for exact comparisons
    return config


_GEOMETRY = None


@pytest.fixture(autouse=True, scope="module")
def _geometry(tiny_config):
    global _GEOMETRY
    _GEOMETRY = tiny_config
    yield


@nnx.jit
def _forward(model, batch, noise):
    """The training objective's forward (noising, model, token sums) with the velocity MSE's jnp reference;
    ``(outputs, whole-batch metrics)``."""
    objective = UnifiedObjective()
    inputs = Prepared(Pack.from_arrays(batch), model.latent_tokens(batch["vae_images"], None), noise)
    outputs, sums = objective.forward(model, inputs, flow_impl="reference")
    return outputs, objective.metrics(sums, objective.totals(inputs))


def _stage2_sample(rng):
    src, tgt = (rng.uniform(-1, 1, (16, 16)).astype(np.float32) for _ in range(2))
    return [Text(rng.integers(5, 60, size=4).tolist()), VitImage(src[:14, :14]), VaeImage(src),
            VaeImage(tgt, noised=True)]


def _stage1_sample(rng):
    return [Text(rng.integers(5, 60, size=3).tolist()), VitImage(rng.uniform(-1, 1, (14, 14)).astype(np.float32)),
            Text(rng.integers(5, 60, size=2).tolist(), loss=True)]


def _batch(samples, seed=0):
    builder = PackBuilder(BUDGET, SPECIAL, _GEOMETRY)
    rng = np.random.default_rng(seed)
    for sample in samples:
        builder.add(sample, rng)
    batch = stack_rows([builder.build()])
    # One fixed timestep for every noised image, so a sample's t does not depend on its pack's draw order.
    batch["timestep_logit"] = np.where(np.isfinite(batch["timestep_logit"]), 0.3, -np.inf).astype(np.float32)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def test_two_samples_packed_equal_each_alone(model_config):
    model = SynerMedGen(model_config, rngs=nnx.Rngs(params=3))
    model.llm2vae.kernel.value = 0.1 * jax.random.normal(jax.random.key(0), model.llm2vae.kernel.value.shape)
    rng = np.random.default_rng(7)
    first, second = _stage2_sample(rng), _stage1_sample(rng)
    third = _stage2_sample(rng)
    token_dim = model.llm2vae.kernel.value.shape[1]
    noise = jax.random.normal(jax.random.key(1), (1, BUDGET.gen_tokens, token_dim))
    gen_first = 32  # (16/4)^2 tokens per image x 2 images

    together, _ = _forward(model, _batch([first, second, third]), noise)
    alone_first, _ = _forward(model, _batch([first]), noise)
    alone_second, _ = _forward(model, _batch([second]), noise)
    shifted = jnp.concatenate([noise[:, gen_first:], noise[:, :gen_first]], axis=1)
    alone_third, _ = _forward(model, _batch([third]), shifted)

    np.testing.assert_allclose(together["velocity"][0, :gen_first], alone_first["velocity"][0, :gen_first],
                               atol=1e-5)
    np.testing.assert_allclose(together["velocity"][0, gen_first:2 * gen_first],
                               alone_third["velocity"][0, :gen_first], atol=1e-5)
    # The Stage I sample's 3 CE tokens come first in its own pack and right after nothing in the joint pack
    # (the Stage II samples carry no CE tokens).
    np.testing.assert_allclose(together["logits"][0, :3], alone_second["logits"][0, :3], atol=1e-5)


def test_generation_expert_does_not_touch_understanding_only_tokens(model_config):
    model = SynerMedGen(model_config, rngs=nnx.Rngs(params=4))
    rng = np.random.default_rng(11)
    batch = _batch([_stage1_sample(rng), _stage2_sample(rng)])
    noise = jax.random.normal(jax.random.key(2), (1, BUDGET.gen_tokens, 16))
    before, _ = _forward(model, batch, noise)
    # Perturb every generation-expert weight.
    for layer in model.language_model.layers:
        for name in ("q_proj_moe_gen", "k_proj_moe_gen", "v_proj_moe_gen", "o_proj_moe_gen"):
            proj = getattr(layer.self_attn, name)
            proj.kernel.value = proj.kernel.value + 0.3
        layer.mlp_moe_gen.up_proj.kernel.value = layer.mlp_moe_gen.up_proj.kernel.value * -2.0
    after, _ = _forward(model, batch, noise)
    hidden_before, hidden_after = np.asarray(before["hidden"][0]), np.asarray(after["hidden"][0])
    sample_id = np.asarray(batch["sample_id"][0])
    split_id = np.asarray(batch["split_id"][0])
    und = np.arange(BUDGET.und_tokens)
    # Sample 0 (Stage I) has no generation tokens: every one of its tokens is unchanged.
    first = und[sample_id[und] == 0]
    np.testing.assert_array_equal(hidden_before[first], hidden_after[first])
    np.testing.assert_array_equal(np.asarray(before["logits"]), np.asarray(after["logits"]))
    # Sample 1 (Stage II): text and ViT splits (ids 0, 1) come before any VAE split: unchanged...
    early = und[(sample_id[und] == 1) & (split_id[und] <= 1)]
    np.testing.assert_array_equal(hidden_before[early], hidden_after[early])
    # ...while the VAE markers (same split as latent tokens) and the latents themselves do change.
    late = und[(sample_id[und] == 1) & (split_id[und] >= 2)]
    assert np.abs(hidden_before[late] - hidden_after[late]).max() > 1e-3
    gen = slice(BUDGET.und_tokens, BUDGET.und_tokens + 32)
    assert np.abs(hidden_before[gen] - hidden_after[gen]).max() > 1e-3


def test_understanding_expert_changes_generation_through_attention(model_config):
    """The rule lets generation tokens see the earlier understanding context, so the reverse does propagate."""
    model = SynerMedGen(model_config, rngs=nnx.Rngs(params=5))
    model.llm2vae.kernel.value = jnp.ones_like(model.llm2vae.kernel.value) * 0.05
    rng = np.random.default_rng(12)
    batch = _batch([_stage2_sample(rng)])
    noise = jax.random.normal(jax.random.key(3), (1, BUDGET.gen_tokens, 16))
    before, _ = _forward(model, batch, noise)
    layer = model.language_model.layers[0]
    layer.self_attn.v_proj.kernel.value = layer.self_attn.v_proj.kernel.value * 3.0
    after, _ = _forward(model, batch, noise)
    assert np.abs(np.asarray(before["velocity"]) - np.asarray(after["velocity"]))[0, :32].max() > 1e-4


def test_freeze_und_stops_gradients_into_understanding_expert(model_config):
    config = model_config.copy_and_resolve_references()
    config.llm.freeze_und = True
    model = SynerMedGen(config, rngs=nnx.Rngs(params=6))
    model.llm2vae.kernel.value = jnp.ones_like(model.llm2vae.kernel.value) * 0.05
    rng = np.random.default_rng(13)
    batch = _batch([_stage2_sample(rng), _stage1_sample(rng)])
    noise = jax.random.normal(jax.random.key(4), (1, BUDGET.gen_tokens, 16))

    def loss_fn(model):
        return _forward(model, batch, noise)[1]["loss"]

    grads = nnx.grad(loss_fn)(model)
    layer = grads.language_model.layers[0]
    assert float(jnp.abs(layer.self_attn.q_proj.kernel.value).max()) == 0.0
    assert float(jnp.abs(layer.mlp.up_proj.kernel.value).max()) == 0.0
    assert float(jnp.abs(layer.self_attn.q_proj_moe_gen.kernel.value).max()) > 0.0
    assert float(jnp.abs(grads.vae2llm.kernel.value).max()) > 0.0


def test_chunked_vae_encoding_equals_one_shot(model_config):
    """latent_tokens encodes vae.encode_chunk images at a time (lax.map): same tokens as one batched encode."""
    chunked = SynerMedGen(model_config, rngs=nnx.Rngs(params=8))
    assert model_config.vae.encode_chunk and model_config.vae.encode_chunk < 11
    one_shot_config = model_config.copy_and_resolve_references()
    one_shot_config.vae.encode_chunk = 0
    one_shot = SynerMedGen(one_shot_config, rngs=nnx.Rngs(params=8))
    images = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 11, 16, 16, 1)), jnp.float32)
    np.testing.assert_allclose(chunked.latent_tokens(images, None), one_shot.latent_tokens(images, None), atol=1e-5)


def test_vae_encoder_skips_empty_slots(model_config, monkeypatch):
    """With ``real`` slots given, the encoder runs on the chunks that hold a real slot only (counted by a
    callback inside the encoder, which fires only when ``lax.cond`` takes the encoding branch); real slots get
    the tokens an all-slot encode gives them, empty slots zeros."""
    from synermedgen_jax.modeling.vae import AutoEncoder

    config = model_config.copy_and_resolve_references()
    config.vae.encode_chunk = 2
    model = SynerMedGen(config, rngs=nnx.Rngs(params=8))
    images = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (3, 4, 16, 16, 1)), jnp.float32)
    real = jnp.asarray([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], bool)  # 3 real of 12: 2 chunks of 2
    reference = model.latent_tokens(images, None)  # every slot
    encoded: list[int] = []
    original = AutoEncoder.encode

    def counted(self, x, key=None, *, sample=None):
        jax.debug.callback(lambda n: encoded.append(int(n)), x.shape[0])
        return original(self, x, key, sample=sample)

    monkeypatch.setattr(AutoEncoder, "encode", counted)
    tokens = model.latent_tokens(images, None, real)
    jax.effects_barrier()
    assert encoded == [2, 2], encoded  # 6 chunks, 4 of them empty and skipped
    per_slot = tokens.shape[1] // 4
    mask = np.repeat(np.asarray(real), per_slot, axis=1)[..., None]
    np.testing.assert_allclose(np.where(mask, tokens, 0), np.where(mask, reference, 0), atol=1e-5)
    assert float(jnp.abs(jnp.where(mask, 0, tokens)).max()) == 0.0
