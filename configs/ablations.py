"""Stage I ablations without one generation-aligned task: ``configs/ablations.py:no_cts[_VARIANT]``.

Variants: no_cts, no_mi, no_tia, optionally suffixed with a model variant (``no_mi_small``, default tiny).
"""

from configs.train_common import DEFAULT_MIX, base_config, understanding_optimisation

TASKS = ("cts", "mi", "tia")


def get_config(variant=None):
    variant = variant or "no_cts"
    name, _, model_variant = variant.partition("_")[2].partition("_")
    if not variant.startswith("no_") or name not in TASKS:
        raise ValueError(f"configs/ablations.py: variant {variant!r}; expected no_cts, no_mi or no_tia[_VARIANT]")
    config = base_config(f"ablate_no_{name}", model_variant or None, data_stage="stage1", pack="stage1")
    config.data.task_weights = tuple((task, 0.0 if task == name else weight) for task, weight in DEFAULT_MIX)
    return understanding_optimisation(config, model_variant or None)
