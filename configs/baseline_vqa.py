"""The referee's control: Stage I trained on the non-aligned VQA questions about the same images, same
data volume (steps × rows) and budgets as configs/stage1_gau.py."""

from configs.train_common import base_config, parse_variant, understanding_optimisation


def get_config(variant=None):
    variant, options = parse_variant(variant)
    config = base_config("baseline_vqa", variant, data_stage="vqa", pack="stage1", **options)
    return understanding_optimisation(config, variant)
