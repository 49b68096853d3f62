"""Stage 0: train the small FLUX-family VAE on the embedded data (reconstruction L1 + L2 and a small KL),
when no FLUX ``ae.safetensors`` is given. Stages I/II load it with ``--config.vae_from=WORKDIR``.

    python -m synermedgen_jax train --config configs/vae.py:tiny --workdir runs/vae --config.data.dir=DIR
"""

from configs.train_common import base_config


def get_config(variant=None):
    config = base_config("vae", variant, data_stage="stage2", pack="stage2")
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
        # Short CPU runs: a higher peak, annealed by a cosine to lr·min_lr_ratio. The reconstruction is the
        # ceiling of every synthesized slice, and the last steps at a constant rate left the PSNR bouncing
        # by ±2 dB step to step.
        config.train.lr = 2e-3
        config.train.schedule = "cosine"
        # Decode the posterior mean: the encoder's log-variance starts near 0 (posterior std ≈ 1 against a
        # mean of std ≈ 1.7), and a few hundred steps do not shrink it, so a sampled latent is mostly noise
        # and the decoder learns to blur. On the quickstart data (300 steps) the mean lifted the reconstruction
        # SSIM×100 of the evaluated MR slices from 74.8-78.1 to 76.7-79.9. Stage II and the sampler use the
        # mean as well (configs/stage2_ucg.py).
        config.model.vae.sample_posterior = False
        # Train on the metric too: L1 + L2 alone leave a short run blurry. On the quickstart data (300 steps) the
        # (1 − SSIM) term lifted the reconstruction SSIM×100 of the evaluated MR targets from 76.7-79.9 to
        # 85.7-89.2 (600 steps without it: 82.9-86.9). A sharper autoencoder is what makes the MR routes
        # winnable: the best 3×3 quadratic map from source to target latents, fitted on all training pairs,
        # scored t1→t2 / t2→t1 / flair→t2 / t2→flair 73.9 / 71.4 / 72.8 / 72.3 through the old VAE (the copy
        # scores 71.9 / 71.9 / 72.8 / 72.8) and 79.1 / 75.9 / 77.0 / 75.3 through this one.
        config.train.ssim_weight = 1.0
    return config
