"""``synermed_<variant>`` configs: Stage I / Stage II on a SynerMed release build (build-data --source synermed).

    python -m synermedgen_jax train --config configs/stage1_gau.py:synermed_tiny --workdir runs/s1 \
        --config.data.dir=data/synermed
    python -m synermedgen_jax train --config configs/stage2_ucg.py:synermed_small --workdir runs/s2 \
        --config.data.dir=data/synermed --config.init_from=runs/s1

Stage I trains on the release's conversations (SynerMed.jsonl), Stage II on its edit chains (SynerMed.parquet),
``data.stage=mixed`` on both. The pack budgets leave room for the release's free-form text and for 2-step
interleaved edits (four VAE images and two ViT images per sample); a sample longer than an empty pack row is
skipped with a warning, as BAGEL skips over-long samples. The release has no held-out split, so in-training
evaluation and sample grids are off: score with ``synthesize --metadata`` and ``eval --metadata``.
"""

from __future__ import annotations

import ml_collections

_PACKS = {
    "tiny": dict(
        stage1=dict(und_tokens=512, gen_tokens=0, vit_patches=64, vit_images=16, vae_images=0, ce_tokens=128,
                    image_size=(32, 32), vit_image_size=(28, 28)),
        stage2=dict(und_tokens=192, gen_tokens=256, vit_patches=32, vit_images=8, vae_images=8, ce_tokens=8,
                    image_size=(32, 32), vit_image_size=(28, 28)),
    ),
    "small": dict(
        stage1=dict(und_tokens=1024, gen_tokens=0, vit_patches=256, vit_images=16, vae_images=0, ce_tokens=256,
                    image_size=(64, 64), vit_image_size=(56, 56)),
        stage2=dict(und_tokens=256, gen_tokens=256, vit_patches=64, vit_images=4, vae_images=4, ce_tokens=8,
                    image_size=(64, 64), vit_image_size=(56, 56)),
    ),
    "bagel_7b_mot": dict(
        stage1=dict(und_tokens=8192, gen_tokens=0, vit_patches=4096, vit_images=32, vae_images=0, ce_tokens=2048,
                    image_size=(256, 256), vit_image_size=(224, 224)),
        stage2=dict(und_tokens=4096, gen_tokens=4096, vit_patches=2048, vit_images=16, vae_images=16,
                    ce_tokens=64, image_size=(256, 256), vit_image_size=(224, 224)),
    ),
}


def release_config(config: ml_collections.ConfigDict, variant: str, pack: str) -> ml_collections.ConfigDict:
    """Turns a stage config of ``variant`` into its ``synermed_`` twin (see the module doc)."""
    if variant not in _PACKS:
        raise ValueError(f"unknown variant synermed_{variant!r}; expected synermed_ + one of {sorted(_PACKS)}")
    config.data.source = "synermed"
    config.data.dir = "data/synermed"
    config.data.augment = False  # the official loaders do not augment
    config.data.pack = ml_collections.ConfigDict(_PACKS[variant][pack])
    config.train.eval_every = 0
    config.train.image_every = 0
    return config
