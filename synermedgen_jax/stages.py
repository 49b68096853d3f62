"""Stage names, one table: what a run trains (``config.stage``) and what its data stream holds
(``config.data.stage``).

Both are ``StrEnum``s, so configs stay plain strings (``config.json`` beside a checkpoint, ``--config.stage=...``)
and a string compares equal to its member: ``config.stage == Stage.VAE`` reads the same either way.
"""

from __future__ import annotations

import enum


class Stage(enum.StrEnum):
    """``config.stage``: which parameters a run trains, with which objective (configs/*.py)."""

    VAE = "vae"  # stage 0: the autoencoder alone (configs/vae.py)
    STAGE1_GAU = "stage1_gau"  # generation-aligned understanding: CTS / MI / TIA on the und expert
    STAGE2_UCG = "stage2_ucg"  # understanding-conditioned generation: flow matching on the gen expert
    BASELINE_VQA = "baseline_vqa"  # the non-aligned control: generic questions on the same images
    ABLATE_NO_CTS = "ablate_no_cts"  # Stage I without one of its tasks (configs/ablations.py)
    ABLATE_NO_MI = "ablate_no_mi"
    ABLATE_NO_TIA = "ablate_no_tia"
    UND_PRETRAIN = "und_pretrain"  # in-context lookups standing in for a pretrained LLM (configs/und_pretrain.py)
    IMPORTED = "imported"  # a parameter checkpoint written by `import` (no training run behind it)


# Stages that train the understanding expert on answers (CE only).
UNDERSTANDING_STAGES = frozenset({Stage.STAGE1_GAU, Stage.BASELINE_VQA, Stage.ABLATE_NO_CTS, Stage.ABLATE_NO_MI,
                                  Stage.ABLATE_NO_TIA, Stage.UND_PRETRAIN})


class DataStage(enum.StrEnum):
    """``config.data.stage``: which samples the Grain stream mixes (data/stream.py, data/record_samples.py)."""

    STAGE1 = "stage1"  # CTS / TIA / MI understanding instances
    STAGE2 = "stage2"  # paired slices: one synthesis sample each
    MIXED = "mixed"  # both, by ``data.stage2_weight``
    VQA = "vqa"  # the control's generic questions
    GEN_PRETRAIN = "gen_pretrain"  # same-modality edits of the records (generic generation pre-training)
    UND_PRETRAIN = "und_pretrain"  # synthetic in-context lookups over the records (data/und_pretrain.py)


# Data stages whose samples carry understanding images (ViT) / noised generation targets (VAE).
UNDERSTANDING_DATA = frozenset({DataStage.STAGE1, DataStage.MIXED, DataStage.VQA, DataStage.UND_PRETRAIN})
GENERATION_DATA = frozenset({DataStage.STAGE2, DataStage.MIXED, DataStage.GEN_PRETRAIN})
