"""Stage I, GAU: CE on CTS + TIA + MI answers; ViT, connector and the understanding expert are trained, the
generation expert and the VAE are frozen.

    python -m synermedgen_jax train --config configs/stage1_gau.py:tiny --workdir runs/s1 --config.data.dir=DIR

A variant may name the data source: ``tiny,source=synermed`` trains on a SynerMed release build (configs/synermed.py).
"""

from configs.train_common import base_config, parse_variant, understanding_optimisation


def get_config(variant=None):
    variant, options = parse_variant(variant)
    config = base_config("stage1_gau", variant, data_stage="stage1", pack="stage1", **options)
    return understanding_optimisation(config, variant)
