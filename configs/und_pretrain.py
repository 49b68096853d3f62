"""Understanding pre-training: the small understanding expert (ViT, connector, LLM) learns in-context lookups
(the letter of the option a query names, of the slice a re-acquired copy shows) and image captions
(data/und_pretrain.py), standing in for the Qwen2.5 + SigLIP start BAGEL's Stage I has. Stage I starts from it:

    python -m synermedgen_jax train --config configs/und_pretrain.py:small --workdir runs/und_pretrain \\
        --config.data.dir=DIR
    python -m synermedgen_jax train --config configs/stage1_gau.py:small --workdir runs/s1 \\
        --config.data.dir=DIR --config.init_from=runs/und_pretrain

``quickstart`` and ``ablate`` run it once (per seed) and start every Stage I arm from it.
"""

from configs.train_common import base_config, parse_variant, understanding_optimisation

TASK_WEIGHTS = (("lookup", 1.0), ("same_slice", 1.0), ("caption", 1.0))


def get_config(variant=None):
    variant, options = parse_variant(variant)
    config = base_config("und_pretrain", variant, data_stage="und_pretrain", pack="stage1", **options)
    config.data.task_weights = TASK_WEIGHTS
    config.train.ema = 0.0  # Stage I's init_from reads raw weights
    return understanding_optimisation(config, variant)
