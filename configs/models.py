"""Model variants of the SynerMedGen / BAGEL MoT network.

Usage::

    from synermedgen_jax.config import load_config
    model_config = load_config("configs/models.py:tiny")

Variants:
  tiny          unit tests: well under 1M parameters, compiles in seconds on CPU.
  small         the CPU quickstart.
  bagel_7b_mot  BAGEL-7B-MoT exactly (Qwen2.5-7B MoT, SigLIP so400m/14, FLUX VAE); docs/architecture.md.
"""

from __future__ import annotations

import ml_collections


def _llm(**overrides) -> ml_collections.ConfigDict:
    llm = ml_collections.ConfigDict(
        dict(
            vocab_size=152064,
            hidden_size=3584,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            head_dim=128,
            intermediate_size=18944,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            qk_norm=True,
            tie_word_embeddings=False,
            freeze_und=False,  # Stage II: detach the understanding path as BAGEL's freeze_und does
        )
    )
    llm.update(overrides)
    return llm


def _vit(**overrides) -> ml_collections.ConfigDict:
    vit = ml_collections.ConfigDict(
        dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            num_layers=26,  # layers used; SigLIP so400m's config says 27, BAGEL drops the last
            config_num_layers=27,  # what vit_config.json says (written back on export)
            patch_size=14,
            num_channels=3,
            max_num_patch_per_side=70,
            layer_norm_eps=1e-6,
        )
    )
    vit.update(overrides)
    return vit


def _vae(**overrides) -> ml_collections.ConfigDict:
    vae = ml_collections.ConfigDict(
        dict(
            in_channels=3,
            ch=128,
            ch_mult=(1, 2, 4, 4),
            num_res_blocks=2,
            z_channels=16,
            norm_groups=32,
            scale_factor=0.3611,
            shift_factor=0.1159,
            sample_posterior=True,  # BAGEL samples the posterior at encode; False gives the mean
            encode_chunk=8,  # images encoded at a time (bounds the frozen encoder's activation memory)
        )
    )
    vae.update(overrides)
    return vae


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    variant = variant or "tiny"
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.latent_patch_size = 2
    config.max_latent_size = 64
    config.timestep_shift = 1.0
    # latent_pos_embed's sin-cos frequencies: step/base^(k/(d/2)) radians per grid cell (BAGEL: 10000, 1).
    config.latent_pos_base = 10000.0
    config.latent_pos_step = 1.0
    # auto: the Pallas kernels on GPU (Triton) and TPU (Mosaic), the faster jnp path on CPU; resolved once per
    # run by synermedgen_jax/kernels/dispatch.py (the run's config.json says what computed). Explicit values:
    # kernels/attention IMPLS, kernels/flow_matching.py IMPLS (noising, velocity MSE, the CFG + Euler step).
    config.attention_impl = "auto"
    config.flow_matching_impl = "auto"
    config.compute_dtype = "float32"
    config.param_dtype = "float32"
    config.remat = "none"  # none | full | dots (per decoder layer)

    if variant == "bagel_7b_mot":
        config.llm = _llm()
        config.vit = _vit()
        config.vae = _vae()
        config.compute_dtype = "bfloat16"
        config.remat = "full"
    elif variant == "small":
        config.llm = _llm(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                          head_dim=64, intermediate_size=768, rope_theta=10_000.0)
        config.vit = _vit(hidden_size=128, intermediate_size=384, num_heads=4, num_layers=3,
                          config_num_layers=4, max_num_patch_per_side=16)
        config.vae = _vae(in_channels=1, ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=8,
                          norm_groups=8)
        config.max_latent_size = 32
        # The quickstart's 8×8 latent-token grid sits in the flat low end of BAGEL's table, so a target token
        # finds its source token slowly: faster frequencies train faster (docs/experiments.md).
        config.latent_pos_base = 32.0
        config.latent_pos_step = 3.0
        # Training timesteps t = sigmoid(N(0, 1)) shifted by s·t / (1 + (s−1)·t): s = 12 puts most draws at high
        # noise, where the velocity target can only be met from the source image, i.e. where the translation
        # is learnt (shifts compared: docs/experiments.md). Inference keeps its own shift (SamplerConfig.shift).
        config.timestep_shift = 12.0
    elif variant == "tiny":
        config.llm = _llm(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=16, intermediate_size=128, rope_theta=10_000.0)
        config.vit = _vit(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2,
                          config_num_layers=3, max_num_patch_per_side=8)
        config.vae = _vae(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_groups=4)
        config.max_latent_size = 16
    else:
        raise ValueError(f"configs/models.py: unknown variant {variant!r}; expected tiny, small or bagel_7b_mot")
    return config
