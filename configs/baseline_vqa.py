"""The referee's control: Stage I trained on the non-aligned VQA questions about the same images, same
data volume (steps × rows) and budgets as configs/stage1_gau.py."""

from configs.train_common import base_config, understanding_optimisation


def get_config(variant=None):
    return understanding_optimisation(base_config("baseline_vqa", variant, data_stage="vqa", pack="stage1"), variant)
