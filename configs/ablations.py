"""Stage I ablations without one generation-aligned task: ``configs/ablations.py:no_cts[_VARIANT]``.

Variants: no_cts, no_mi, no_tia, optionally suffixed with a model variant (``no_mi_small``, default tiny) and
options (``no_mi_small,source=synermed``).
"""

from configs.train_common import DEFAULT_MIX, base_config, parse_variant, understanding_optimisation

TASKS = ("cts", "mi", "tia")


def get_config(variant=None):
    variant, _, options = (variant or "no_cts").partition(",")
    name, _, model_variant = variant.partition("_")[2].partition("_")
    if not variant.startswith("no_") or name not in TASKS:
        raise ValueError(f"configs/ablations.py: variant {variant!r}; expected no_cts, no_mi or no_tia[_VARIANT]")
    model_variant, options = parse_variant(model_variant + ("," + options if options else ""), head=f"no_{name}_")
    config = base_config(f"ablate_no_{name}", model_variant, data_stage="stage1", pack="stage1", **options)
    config.data.task_weights = tuple((task, 0.0 if task == name else weight) for task, weight in DEFAULT_MIX)
    return understanding_optimisation(config, model_variant)
