"""Stage 0: train the small FLUX-family VAE on the embedded data (reconstruction L1 + L2 and a small KL),
when no FLUX ``ae.safetensors`` is given. Stages I/II load it with ``--config.vae_from=WORKDIR``.

    python -m synermedgen_jax train --config configs/vae.py:tiny --workdir runs/vae --config.data.dir=DIR
"""

from configs.train_common import base_config, parse_variant


def get_config(variant=None):
    variant, options = parse_variant(variant)
    config = base_config("vae", variant, data_stage="stage2", pack="stage2", **options)
    config.train.rows = 16  # images per step
    config.train.l1_weight = 1.0
    config.train.l2_weight = 1.0
    config.train.kl_weight = 1e-6
    config.train.ssim_weight = 0.0  # weight of (1 − SSIM) per image, the metric every route is scored by
    config.train.ema = 0.0
    # End by measuring the latents' mean/std on training slices (latent_scale.json); stages that load this VAE
    # (vae_from) use them as shift/scale so flow matching sees unit-scale latents (training/vae_stage.py).
    config.train.fit_latent_scale = True
    if variant != "bagel_7b_mot":
        # Short CPU runs: a higher peak, annealed by a cosine (a constant rate left the reconstruction, the
        # ceiling of every synthesized slice, bouncing at the end; docs/experiments.md).
        config.train.lr = 2e-3
        config.train.schedule = "cosine"
        # Decode the posterior mean: in a short run the posterior std stays near 1, so a sampled latent is
        # mostly noise and the decoder learns to blur (docs/experiments.md). Stage II and the sampler use the
        # mean as well (configs/stage2_ucg.py).
        config.model.vae.sample_posterior = False
        # Train on the metric too: L1 + L2 alone leave a short run blurry, and a sharper autoencoder is what
        # makes the MR routes winnable (docs/experiments.md).
        config.train.ssim_weight = 1.0
    return config
