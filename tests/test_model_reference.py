"""The model parts against independent PyTorch references with the same random weights (float32).

* understanding path, qk_norm off  == transformers Qwen2ForCausalLM
* understanding path, qk_norm on   == transformers Qwen3ForCausalLM with attention bias (o_proj bias zeroed)
* ViT                              == transformers SiglipVisionModel on a full-size square image
* VAE encode-mean / decode         == diffusers AutoencoderKL in the FLUX configuration
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_refs import load_diffusers_vae, load_qwen_into_und_expert, load_siglip, randomize_affine_

from synermedgen_jax.data.packing import PackBudget, PackBuilder, SpecialTokens, Text, patchify, stack_rows
from synermedgen_jax.modeling.synermedgen import SynerMedGen

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SPECIAL = SpecialTokens(bos=1, eos=2, vision_start=3, vision_end=4, pad=0)


def _text_batch(config, token_lists, und_tokens=48):
    budget = PackBudget(und_tokens=und_tokens, gen_tokens=0, vit_patches=0, vit_images=0, vae_images=0,
                        ce_tokens=0, image_size=(16, 16), vit_image_size=(28, 28))
    builder = PackBuilder(budget, SPECIAL, config)
    rng = np.random.default_rng(0)
    for ids in token_lists:
        builder.add([Text(ids)], rng)
    return {k: jnp.asarray(v) for k, v in stack_rows([builder.build()]).items()}


@nnx.jit
def _und_logits(model, batch):
    language_model = model.language_model
    x = language_model.embed(batch["token_ids"])
    meta = {k: batch[k] for k in ("sample_id", "split_id", "split_kind", "rope_id")}
    hidden = language_model(x, batch["token_ids"].shape[1], meta)
    return language_model.logits(hidden)


def _hf_config(cls, config, **extra):
    llm = config.llm
    return cls(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, num_hidden_layers=llm.num_layers,
               num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim,
               intermediate_size=llm.intermediate_size, rope_theta=llm.rope_theta, rms_norm_eps=llm.rms_norm_eps,
               tie_word_embeddings=False, max_position_embeddings=256, attn_implementation="eager", **extra)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["qwen2", "qwen3"])
def test_understanding_path_matches_transformers(tiny_config, qk_norm):
    config = tiny_config.copy_and_resolve_references()
    config.llm.qk_norm = qk_norm
    seed = int(np.random.SeedSequence().entropy % 2**31)
    torch.manual_seed(seed)
    if qk_norm:
        hf = transformers.Qwen3ForCausalLM(_hf_config(transformers.Qwen3Config, config, attention_bias=True))
    else:
        hf = transformers.Qwen2ForCausalLM(_hf_config(transformers.Qwen2Config, config))
    randomize_affine_(hf)  # random q/k/v biases and norm scales: a dropped or swapped one changes the logits
    if qk_norm:
        for layer in hf.model.layers:  # BAGEL's o_proj has no bias
            torch.nn.init.zeros_(layer.self_attn.o_proj.bias)
    hf.eval()
    model = SynerMedGen(config, rngs=nnx.Rngs(params=seed))
    load_qwen_into_und_expert(model.language_model, hf, qk_norm=qk_norm)

    rng = np.random.default_rng(seed)
    ids = rng.integers(5, config.llm.vocab_size, size=30).tolist()
    ours = np.asarray(_und_logits(model, _text_batch(config, [ids])))[0, : len(ids) + 2]
    with torch.no_grad():
        full = torch.tensor([[SPECIAL.bos, *ids, SPECIAL.eos]])
        theirs = hf(full).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_vit_matches_siglip(tiny_config):
    vit = tiny_config.vit
    side = vit.max_num_patch_per_side
    hf_config = transformers.SiglipVisionConfig(
        hidden_size=vit.hidden_size, intermediate_size=vit.intermediate_size, num_hidden_layers=vit.num_layers,
        num_attention_heads=vit.num_heads, num_channels=vit.num_channels, image_size=side * vit.patch_size,
        patch_size=vit.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=vit.layer_norm_eps,
        attn_implementation="eager")
    seed = int(np.random.SeedSequence().entropy % 2**31)
    torch.manual_seed(seed)
    hf = transformers.SiglipVisionModel(hf_config).eval()
    randomize_affine_(hf)  # every bias and LayerNorm scale/offset (library init: zeros and ones)
    model = SynerMedGen(tiny_config, rngs=nnx.Rngs(params=seed))
    load_siglip(model.vit_model, hf)

    pixels = np.random.default_rng(seed).uniform(-1, 1, (side * vit.patch_size,) * 2 + (3,)).astype(np.float32)
    patches = patchify(pixels, vit.patch_size)[None]
    positions = jnp.arange(side * side)[None]
    ours = nnx.jit(lambda m, p, pos: m.vit_model(p, pos, jnp.zeros_like(pos)))(model, jnp.asarray(patches),
                                                                                positions)
    with torch.no_grad():
        theirs = hf(pixel_values=torch.from_numpy(pixels.transpose(2, 0, 1)[None])).last_hidden_state[0].numpy()
    np.testing.assert_allclose(np.asarray(ours)[0], theirs, atol=1e-4, rtol=0)


def _siglip_position_table(hf_model):
    # transformers 5 flattens SiglipVisionModel (no .vision_model); find the table by its state-dict name.
    return next(v for k, v in hf_model.state_dict().items() if k.endswith("embeddings.position_embedding.weight"))


def test_vit_position_table_initialised_as_siglip(tiny_config):
    """A ViT trained from scratch starts with SigLIP's position-table scale (transformers draws it with std
    1/sqrt(width)), not N(0, 1), which would swamp the patch embedding of [-1, 1] pixels."""
    vit = tiny_config.vit
    side = vit.max_num_patch_per_side
    hf_config = transformers.SiglipVisionConfig(hidden_size=vit.hidden_size, intermediate_size=vit.intermediate_size,
                                                num_hidden_layers=1, num_attention_heads=vit.num_heads,
                                                num_channels=vit.num_channels, image_size=side * vit.patch_size,
                                                patch_size=vit.patch_size)
    torch.manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    theirs = _siglip_position_table(transformers.SiglipVisionModel(hf_config))
    theirs_std = float(theirs.detach().std())
    model = SynerMedGen(tiny_config, rngs=nnx.Rngs(params=int(np.random.SeedSequence().entropy % 2**31)))
    ours_std = float(np.std(np.asarray(model.vit_model.embeddings.position_embedding[...])))
    # side² × width = 64 × 32 draws each: the two sample stds agree within 10 % (their sampling error is ~2 %).
    assert abs(ours_std - theirs_std) < 0.1 * theirs_std, (ours_std, theirs_std)
    assert abs(ours_std - vit.hidden_size**-0.5) < 0.1 * vit.hidden_size**-0.5


def test_latent_position_table_frequencies_follow_the_config(tiny_config):
    """latent_pos_embed is BAGEL's table by default and follows ``latent_pos_base`` / ``latent_pos_step``
    (checked against the independent table of port_fixtures); the small variant's sharper table separates
    neighbouring grid cells that BAGEL's frequencies leave 98.5 % alike on an 8×8 grid."""
    from port_fixtures import sincos_table

    from synermedgen_jax.config import load_config

    hidden, side = tiny_config.llm.hidden_size, tiny_config.max_latent_size
    default = SynerMedGen(tiny_config, rngs=nnx.Rngs(params=0))
    np.testing.assert_allclose(np.asarray(default.latent_pos_embed.value), sincos_table(hidden, side), atol=1e-6)
    rng = np.random.default_rng()
    base, step = float(rng.uniform(8.0, 200.0)), float(rng.uniform(0.5, 3.0))
    config = tiny_config.copy_and_resolve_references()
    config.latent_pos_base, config.latent_pos_step = base, step
    model = SynerMedGen(config, rngs=nnx.Rngs(params=0))
    np.testing.assert_allclose(np.asarray(model.latent_pos_embed.value), sincos_table(hidden, side, base, step),
                               atol=1e-5)

    def neighbour_cosine(model_config) -> float:
        table = sincos_table(model_config.llm.hidden_size, model_config.max_latent_size,
                             model_config.latent_pos_base, model_config.latent_pos_step).astype(np.float64)
        return float(table[0] @ table[1] / (np.linalg.norm(table[0]) * np.linalg.norm(table[1])))

    small = load_config("configs/models.py:small")
    bagel_like = small.copy_and_resolve_references()
    bagel_like.latent_pos_base, bagel_like.latent_pos_step = 10000.0, 1.0
    assert neighbour_cosine(bagel_like) > 0.98
    assert neighbour_cosine(small) < 0.90


def test_vae_matches_diffusers_flux_configuration(tiny_config):
    diffusers = pytest.importorskip("diffusers")
    config = tiny_config.copy_and_resolve_references()
    config.vae.in_channels = 3
    config.vae.ch, config.vae.ch_mult, config.vae.norm_groups = 16, (1, 2, 2), 8
    vae = config.vae
    seed = int(np.random.SeedSequence().entropy % 2**31)
    torch.manual_seed(seed)
    levels = len(vae.ch_mult)
    hf = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(vae.ch * m for m in vae.ch_mult),
        layers_per_block=vae.num_res_blocks, latent_channels=vae.z_channels, norm_num_groups=vae.norm_groups,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=vae.scale_factor,
        shift_factor=vae.shift_factor).eval()
    randomize_affine_(hf)  # GroupNorm scales/offsets (library init: ones and zeros) and every conv bias
    model = SynerMedGen(config, rngs=nnx.Rngs(params=seed))
    load_diffusers_vae(model.vae, hf)

    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    mean, _ = nnx.jit(lambda m, x: m.vae.posterior(x))(model, jnp.asarray(images))
    with torch.no_grad():
        theirs_mean = hf.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist.mean.numpy()
    np.testing.assert_allclose(np.asarray(mean), theirs_mean.transpose(0, 2, 3, 1), atol=1e-4, rtol=0)

    latents = rng.standard_normal((2, 8, 8, vae.z_channels)).astype(np.float32)
    decoded = nnx.jit(lambda m, z: m.vae.decoder(z))(model, jnp.asarray(latents))
    with torch.no_grad():
        theirs = hf.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample.numpy()
    np.testing.assert_allclose(np.asarray(decoded), theirs.transpose(0, 2, 3, 1), atol=1e-4, rtol=0)

    # The scale/shift convention: encode(mean) = scale·(mean − shift), decode inverts it.
    scaled = nnx.jit(lambda m, x: m.vae.encode(x, sample=False))(model, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(scaled), vae.scale_factor * (np.asarray(mean) - vae.shift_factor),
                               atol=1e-6)
    roundtrip = nnx.jit(lambda m, z: m.vae.decode(m.vae.scale_factor * (z - m.vae.shift_factor)))(
        model, jnp.asarray(latents))
    np.testing.assert_allclose(np.asarray(roundtrip), np.asarray(decoded), atol=1e-4)


def test_sample_posterior_needs_key_and_is_random(tiny_config):
    model = SynerMedGen(tiny_config, rngs=nnx.Rngs(params=0))
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 1)), jnp.float32)
    with pytest.raises(ValueError, match="PRNG key"):
        model.vae.encode(images, None, sample=True)
    first = model.vae.encode(images, jax.random.key(1), sample=True)
    second = model.vae.encode(images, jax.random.key(2), sample=True)
    assert not np.allclose(np.asarray(first), np.asarray(second))
