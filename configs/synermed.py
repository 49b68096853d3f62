"""Training on a SynerMed release build (build-data --source synermed): any stage config with ``source=synermed``
(``configs/train_common.release_config``; the old spelling ``synermed_<variant>`` still loads, with a deprecation
line), and the official recipe below.

    python -m synermedgen_jax train --config configs/stage1_gau.py:tiny,source=synermed --workdir runs/s1 \
        --config.data.dir=data/synermed
    python -m synermedgen_jax train --config configs/stage2_ucg.py:small,source=synermed --workdir runs/s2 \
        --config.data.dir=data/synermed --config.init_from=runs/s1

The official recipe as one run (``get_config``, variants ``official`` and ``official_tiny``, a CPU smoke test of
the same recipe on the tiny model): BAGEL's fine-tuning of an imported BAGEL-7B-MoT on edit chains and
conversations mixed 1:1, everything but the VAE trained, CE + MSE::

    python -m synermedgen_jax train --config configs/synermed.py:official --workdir runs/official \
        --config.data.dir=data/synermed --config.init_from=BAGEL-7B-MoT-imported/

Stage I trains on the release's conversations (SynerMed.jsonl), Stage II on its edit chains (SynerMed.parquet),
``data.stage=mixed`` on both. The pack budgets leave room for the release's free-form text and for 2-step
interleaved edits (four VAE images and two ViT images per sample); a sample longer than an empty pack row is
skipped with a warning, as BAGEL skips over-long samples. ``bagel_7b_mot,source=synermed`` and ``official`` resize
images by the official rules (configs/train_common.OFFICIAL_RESIZE, docs/packing.md); tiny/small keep squares.
The release has no held-out split, so in-training evaluation and sample grids are off: score with
``synthesize --metadata`` and ``eval --metadata``.
"""

from __future__ import annotations

import ml_collections

from configs.train_common import OFFICIAL_GEOMETRY, RELEASE_PACKS, base_config, pack_config

OFFICIAL_VARIANTS = {"official": "bagel_7b_mot", "official_tiny": "tiny"}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """``official``: BAGEL's fine-tuning recipe as one mixed run on a SynerMed build, from an imported
    BAGEL-7B-MoT (``--config.init_from``). ``official_tiny``: the same recipe on the tiny model (tests, CPU).

    Sources: BAGEL TRAIN.md (its fine-tuning command), train/pretrain_unified_navit.py (argument defaults that
    command keeps, the AdamW call), data/configs/example.yaml (the data mix and image geometry)."""
    variant = variant or "official"
    if variant not in OFFICIAL_VARIANTS:
        raise ValueError(f"configs/synermed.py: unknown variant {variant!r}; expected {sorted(OFFICIAL_VARIANTS)}")
    model_variant = OFFICIAL_VARIANTS[variant]
    # stage2_ucg's objective is CE + MSE on whatever the rows hold; with finetune_und it trains und + gen (below).
    config = base_config("stage2_ucg", model_variant, data_stage="mixed", pack="stage2", source="synermed")
    config.data.pack = pack_config(RELEASE_PACKS[model_variant]["mixed"], "mixed", model_variant in OFFICIAL_GEOMETRY)

    data = config.data
    data.stage = "mixed"  # edit chains and conversations in one stream
    data.stage2_weight = 0.5  # example.yaml: unified_edit weight 1, vlm_sft weight 1 -> 1:1
    data.cfg_text, data.cfg_vit, data.cfg_vae = 0.1, 0.3, 0.3  # ModelArguments *_cond_dropout_prob defaults
    data.seed = 42  # DataArguments.data_seed

    config.init_from = ""  # give an imported BAGEL-7B-MoT (import-bagel output): --config.init_from=DIR
    config.init_moe = False  # copy_init_moe runs before the checkpoint loads: the import keeps its own gen expert

    train = config.train
    train.finetune_und = True  # freeze_llm / freeze_vit / freeze_und False: ViT, connector, both experts train
    train.lr = 2e-5  # TRAIN.md fine-tuning: --lr 2e-5
    train.warmup = 2000  # warmup_steps default (the fine-tuning command keeps it)
    train.schedule = "constant"  # lr_scheduler default: constant after the linear warm-up
    train.min_lr_ratio = 0.1  # unused by "constant" (BAGEL's cosine min_lr is an absolute 1e-7)
    train.steps = 500_000  # total_steps default (the fine-tuning command keeps it); set your own
    train.rows = 8  # one packed row per GPU on one 8-GPU node (scripts/train.sh --nproc_per_node=8)
    train.grad_accum = 1  # gradient_accumulation_steps default
    train.b1, train.b2, train.eps = 0.9, 0.95, 1e-15  # beta1, beta2, eps defaults
    train.weight_decay = 0.0  # torch.optim.AdamW(..., weight_decay=0)
    train.clip = 1.0  # max_grad_norm default
    train.ema = 0.9999  # ema default
    train.ema_warmup = False  # finetune_from_ema: the EMA starts from the imported (EMA) weights at full decay
    train.ce_weight, train.mse_weight = 1.0, 1.0  # ce_weight / mse_weight defaults (loss = CE + MSE)
    train.vit_lr_scale = 1.0  # one learning rate for every trained parameter
    train.freeze_vit_patch_embedding = False
    train.seed = 4396  # TrainingArguments.global_seed
    train.checkpoint_every = 2000  # save_every default
    train.log_every = 1  # TRAIN.md fine-tuning: --log_every 1
    train.eval_every = 0  # the release has no held-out split
    train.image_every = 0
    config.model.timestep_shift = 1.0  # timestep_shift default (training)
    if model_variant == "bagel_7b_mot":
        config.model.max_latent_size = 64  # TRAIN.md: max_latent_size 64 when fine-tuning BAGEL (1,024 px)
    else:  # the smoke test: few steps, no long warm-up
        train.warmup = 0
        train.steps = 2
        train.rows = 2
    return config
