"""Understanding pre-training: the small understanding expert (ViT, connector, LLM) learns in-context lookups
(the letter of the option a query names, of the slice a re-acquired copy shows) and image captions
(data/und_pretrain.py), standing in for the Qwen2.5 + SigLIP start BAGEL's Stage I has. Stage I starts from it:

    python -m synermedgen_jax train --config configs/und_pretrain.py:small --workdir runs/und_pretrain \\
        --config.data.dir=DIR
    python -m synermedgen_jax train --config configs/stage1_gau.py:small --workdir runs/s1 \\
        --config.data.dir=DIR --config.init_from=runs/und_pretrain

``quickstart`` and ``ablate`` run it once (per seed) and start every Stage I arm from it.

``ladder_VARIANT`` (e.g. ``ladder_tiny``) trains the text lookup alone up its difficulty ladder (``LOOKUP_LADDER``).
"""

from configs.train_common import base_config, parse_variant, understanding_optimisation

TASK_WEIGHTS = (("lookup", 1.0), ("same_slice", 1.0), ("caption", 1.0))


def _ladder(levels: tuple[str, ...], keep: float = 0.3) -> tuple:
    """One phase per level, the last (the full task) a quarter of the run, the others sharing the rest equally;
    each keeps ``keep`` of the previous level so that it is not forgotten."""
    phases = []
    for i, level in enumerate(levels):
        weights = ((levels[i - 1], keep), (level, 1.0)) if i else ((level, 1.0),)
        phases.append((round(0.75 * i / (len(levels) - 1), 4), weights))
    return tuple(phases)


# Matching by token identity forms on a small vocabulary first and grows with it; trained on all 46 one-token
# words from the start the lookup stays at chance (docs/experiments.md, "A difficulty ladder for the lookup").
LOOKUP_LADDER = _ladder(("lookup_6w", "lookup_12w", "lookup_24w", "lookup_1tok", "lookup_2tok", "lookup_4tok",
                         "lookup"))


def get_config(variant=None):
    ladder = (variant or "").startswith("ladder_")
    variant, options = parse_variant((variant or "").removeprefix("ladder_"), head="ladder_" if ladder else "")
    config = base_config("und_pretrain", variant, data_stage="und_pretrain", pack="stage1", **options)
    config.data.task_weights = TASK_WEIGHTS
    if ladder:
        config.data.curriculum = LOOKUP_LADDER
    config.train.ema = 0.0  # Stage I's init_from reads raw weights
    return understanding_optimisation(config, variant)
