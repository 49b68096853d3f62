"""Generic generation pre-training: Stage II's flow matching on same-modality edits (neighbouring slice, flip,
denoising, intensity change; data/gen_pretrain.py), never a cross-modal pair. It stands in for BAGEL's pretrained
generator, on which the paper's zero-shot synthesis (Stage I, no Stage II) rests:

    python -m synermedgen_jax train --config configs/gen_pretrain.py:small --workdir runs/gen_pretrain \
        --config.data.dir=DIR --config.vae_from=runs/vae
    python -m synermedgen_jax train --config configs/stage1_gau.py:small --workdir runs/s1_zero_shot \
        --config.data.dir=DIR --config.vae_from=runs/vae --config.init_from=runs/gen_pretrain
    python -m synermedgen_jax eval --workdir runs/s1_zero_shot --data DIR    # zero-shot synthesis

``python -m synermedgen_jax ablate --zero-shot`` runs these per seed and arm.
"""

from configs import stage2_ucg


def get_config(variant=None):
    config = stage2_ucg.get_config(variant)  # the trainer's stage stays stage2_ucg: it trains the generation expert
    config.data.stage = "gen_pretrain"  # same-modality edits instead of the cross-modal pairs
    config.data.augment = True  # Stage II's spatial augmentation, applied before the edit
    config.init_moe = False  # nothing to copy: both experts start from the random initialisation
    config.train.ema = 0.0  # Stage I's init_from reads raw weights: every zero-shot arm then has the same generator
    return config
