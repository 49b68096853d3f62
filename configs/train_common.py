"""Shared run-config layout of every training stage (configs/vae.py, stage1_gau.py, stage2_ucg.py, ...).

Layout (other commands rely on these names)::

    config.stage        "vae" | "stage1_gau" | "stage2_ucg" | "baseline_vqa" | "ablate_no_{cts,mi,tia}"
    config.model        configs/models.py:<variant>
    config.data.dir     built data folder (python -m synermedgen_jax build-data ...)
    config.data.curriculum  phases ((fraction of train.steps, task_weights), ...) that replace task_weights
    config.data.pack    PackBudget fields (data/packing.py); bagel_7b_mot adds the official resize rules
                        {vae,vit,vlm_vit}_resize and slice_size (data/geometry.py, docs/packing.md)
    config.data.*       Grain pipeline fields (data/pipeline.py PipelineConfig) + shards, eval_split
    config.train.*      optimisation, checkpointing, logging
    config.mesh         data / fsdp / tensor sizes (-1 fills the remaining devices)
    config.init_from    checkpoint dir (workdir or step dir) whose weights start this run ("" = random)
    config.init_moe     fill the generation-expert weights init_from lacks from the understanding expert (BAGEL's
                        copy_init_moe, then the load: a generation expert the checkpoint holds is kept)
    config.init_moe_overwrite  copy the understanding expert over the generation expert even when init_from holds
                        one (the from-scratch pipeline: Stage II's expert starts as Stage I's trained one)
    config.vae_from     a stage-0 VAE workdir whose ``vae.*`` weights replace the model's ("" = keep)
"""

from __future__ import annotations

import sys

import ml_collections

from configs import models
from synermedgen_jax.data.geometry import ImageRules

DEFAULT_MIX = (("cts", 0.468), ("tia", 0.381), ("mi", 0.150))
SOURCES = ("auto", "records", "synermed")  # config.data.source (data/synermed.use_release)
OPTIONS = ("source",)  # what a variant may set after its name: "tiny,source=synermed"
_DEPRECATED_PREFIX = "synermed_"  # the old spelling of source=synermed: "synermed_tiny"

# The official image geometry (data/geometry.py): BAGEL's data/configs/example.yaml, unified_edit
# image_transform_args (VAE) and vit_image_transform_args (ViT of edits), vlm_sft image_transform_args (ViT of
# understanding samples); max_pixels is data/transforms.py ImageTransform's default (14·14·9·1024) where the
# yaml gives none. The tiny/small configs keep fixed squares (their position tables are 8-16 patches a side).
OFFICIAL_RESIZE = dict(
    vae_resize=dict(min_side=512, max_side=1024, stride=16, max_pixels=1_806_336),
    vit_resize=dict(min_side=224, max_side=518, stride=14, max_pixels=1_806_336),
    vlm_vit_resize=dict(min_side=378, max_side=980, stride=14, max_pixels=2_007_040),
)
# The slice shape the slots are sized for in the config (build-data's default slice_size); training re-derives
# them from the build's real slices (training/inputs.pack_budget) and config.json records what it used.
SLICE_SIZE = (256, 256)


def official_geometry(pack: dict, data_stage: str, slice_size: tuple[int, int] = SLICE_SIZE) -> dict:
    """``pack`` plus the official rules, with ``image_size`` / ``vit_image_size`` the slots of ``slice_size``
    slices (a 256² slice: VAE 512² = 1,024 latent tokens; ViT 252² = 324 patches for edits, 378² = 729 for
    understanding). plan/bench read these sizes."""
    pack = {**pack, **{k: dict(v) for k, v in OFFICIAL_RESIZE.items()}, "slice_size": tuple(slice_size)}
    pack["image_size"], pack["vit_image_size"] = ImageRules.from_pack(pack).slots(
        slice_size, data_stage, pack.get("image_size", (0, 0)), pack.get("vit_image_size", (0, 0)))
    return pack


def pack_config(pack: dict, data_stage: str, official: bool) -> ml_collections.ConfigDict:
    """``config.data.pack``: the budget with the official geometry, or with fixed squares (rules None)."""
    if official:
        return ml_collections.ConfigDict(official_geometry(pack, data_stage))
    return ml_collections.ConfigDict({**pack, **{key: None for key in OFFICIAL_RESIZE}})

# Per-row pack budgets by model variant: (stage I, stage II).
_PACKS = {
    "tiny": dict(
        stage1=dict(und_tokens=256, gen_tokens=0, vit_patches=64, vit_images=16, vae_images=0, ce_tokens=32,
                    image_size=(32, 32), vit_image_size=(28, 28)),
        stage2=dict(und_tokens=96, gen_tokens=256, vit_patches=16, vit_images=4, vae_images=4, ce_tokens=8,
                    image_size=(32, 32), vit_image_size=(28, 28)),
    ),
    # Budgets chosen with `plan --data` on the quickstart's data (docs/packing.md has the numbers). Stage I: CE
    # keeps room above the longest answer seen (29 tokens). Stage II: two full samples a row (a pair is 128 latent
    # tokens and 47 und slots, 54 for "head-neck"), so the look-ahead packer can fill the gaps CFG drops leave;
    # Stage II trains no text, one CE slot keeps the array's shape non-empty.
    "small": dict(
        stage1=dict(und_tokens=512, gen_tokens=0, vit_patches=192, vit_images=12, vae_images=0, ce_tokens=40,
                    image_size=(64, 64), vit_image_size=(56, 56)),
        stage2=dict(und_tokens=96, gen_tokens=256, vit_patches=32, vit_images=2, vae_images=4, ce_tokens=1,
                    image_size=(64, 64), vit_image_size=(56, 56)),
    ),
    # Official geometry (slots: official_geometry), chosen with `plan --data` on a 256² build (docs/packing.md).
    # Stage I: 10,240 tokens (BAGEL's fine-tuning expected_num_tokens, TRAIN.md): a CTS instance is 5 ViT images
    # of 729 patches (~3,700 und tokens), so a row holds 3-4 samples; ViT room for 13 images. Stage II: a pair is
    # 2 × 1,024 latent tokens (1,024 when CFG drops the source) + a 324-patch ViT image (~355 und tokens): four
    # to five pairs a row; one CE slot (Stage II trains no text).
    "bagel_7b_mot": dict(
        stage1=dict(und_tokens=10240, gen_tokens=0, vit_patches=9477, vit_images=13, vae_images=0, ce_tokens=128),
        stage2=dict(und_tokens=2048, gen_tokens=8192, vit_patches=1620, vit_images=5, vae_images=8, ce_tokens=1),
    ),
}
OFFICIAL_GEOMETRY = ("bagel_7b_mot",)  # variants that use OFFICIAL_RESIZE


def parse_variant(spec: str | None, head: str = "") -> tuple[str | None, dict[str, str]]:
    """``"tiny,source=synermed"`` -> ``("tiny", {"source": "synermed"})`` (big_vision's ``variant[,key=value...]``).

    The old spelling ``synermed_tiny`` gives the same and prints one deprecation line to stderr (``head``: what
    precedes the model variant in the file's own variant, e.g. ablations' ``no_mi_``, for that line)."""
    name, *pairs = (spec or "").split(",")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in OPTIONS:
            raise ValueError(f"variant {head + (spec or '')!r}: expected name[,key=value...] with keys {OPTIONS}, "
                             f"got {pair!r}")
        options[key] = value
    if "source" in options and options["source"] not in SOURCES:
        raise ValueError(f"variant {head + (spec or '')!r}: source={options['source']!r}; expected one of {SOURCES}")
    if name.startswith(_DEPRECATED_PREFIX):
        name = name[len(_DEPRECATED_PREFIX):]
        options.setdefault("source", "synermed")
        new = ",".join([head + name, *pairs] + (["source=synermed"] if "source=synermed" not in pairs else []))
        print(f"config variant {head + spec!r} is deprecated: write {new!r} (config.data.source picks the data)",
              file=sys.stderr)
    return name or None, options


def base_config(stage: str, variant: str | None, *, data_stage: str, pack: str, source: str = "auto"
                ) -> ml_collections.ConfigDict:
    """The stage's config for model ``variant`` (tiny by default); ``source="synermed"``: on a SynerMed release
    build (``release_config``)."""
    variant = variant or "tiny"
    if variant not in _PACKS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(_PACKS)}")
    big = variant == "bagel_7b_mot"
    config = ml_collections.ConfigDict()
    config.stage = stage
    config.model = models.get_config(variant)
    config.init_from = ""
    config.init_moe = False
    config.init_moe_overwrite = False  # quickstart/ablate set it: from scratch, Stage I's gen expert is untrained
    config.vae_from = ""

    data = config.data = ml_collections.ConfigDict()
    data.dir = "data/sim"
    data.stage = data_stage  # pipeline stage: stage1 | stage2 | mixed | vqa
    data.split = "train"
    data.eval_split = "val"
    data.seed = 0
    data.task_weights = DEFAULT_MIX  # weight 0 ablates a task
    data.curriculum = ()  # ((fraction of train.steps, task_weights), ...) from 0: task weights by phase
    data.stage2_weight = 0.5
    data.cfg_text, data.cfg_vit, data.cfg_vae = 0.1, 0.3, 0.3
    data.augment = data_stage in ("stage2", "mixed")
    # Stage I's images shared by one flip/rotation/scale/shift: pixels stop identifying an image, CTS's shape
    # comparison stays valid (docs/experiments.md, "The image side")
    data.augment_understanding = False
    # Stage I / VQA: each sample's options reordered (answer follows), template and TIA phrasing redrawn, so a
    # remembered answer letter is worth nothing (docs/experiments.md, "Instances drawn afresh")
    data.redraw_options = False
    data.workers = 0
    data.shards = 0  # data shards of the global batch (0: one per process); fixed shards keep the data order
    data.source = source  # auto: from the build's manifest | records | synermed (release_config)
    data.pack = pack_config(_PACKS[variant][pack], data_stage, variant in OFFICIAL_GEOMETRY)
    data.lookahead = 32  # packer window in samples: first-fit over the next 32 (data/packing.fill_row); 1 = next-fit

    train = config.train = ml_collections.ConfigDict()
    train.steps = 200 if variant == "tiny" else (2000 if variant == "small" else 100_000)
    train.rows = 8 if variant != "bagel_7b_mot" else 256  # global batch rows (packs) per step
    train.grad_accum = 1
    train.lr = 1e-4 if big else 1e-3
    train.warmup = 2000 if big else 20
    train.schedule = "constant"  # constant | cosine
    train.min_lr_ratio = 0.1
    train.b1, train.b2, train.eps, train.weight_decay = 0.9, 0.95, 1e-15, 0.0
    train.clip = 1.0
    train.vit_lr_scale = 1.0  # the vision tower's lr is lr·vit_lr_scale
    train.freeze_vit_patch_embedding = False  # keep the ViT's patch projection as initialised (loaded)
    train.ema = 0.9999 if big else 0.999
    train.ema_warmup = True
    train.ce_weight = 1.0
    train.mse_weight = 1.0
    train.finetune_und = False  # stage II: False freezes the und side (model.llm.freeze_und), True trains it
    train.seed = 0
    train.nan_policy = "stop"  # stop | skip
    train.checkpoint_every = 1000 if big else 100
    train.keep = 3
    train.async_checkpoint = True
    train.checkpoint_host_gb = 4  # GB of arrays a save/restore stages in host memory at once per process (0: Orbax's)
    train.log_every = 10
    train.eval_every = 0 if big else 100  # 0: no eval
    train.eval_rows = 16  # rows per eval pass and task
    train.image_every = 0 if big else 100  # stage II sample grids every N steps (0: none); vae: see eval_every
    train.image_slices = 4  # held-out slices per sample grid
    train.image_sample_steps = 8  # flow-matching timesteps per sample (evaluation uses 50)
    train.progress = True
    train.peak_flops = 0.0  # per-device peak FLOP/s for the MFU estimate (0: unknown, not logged)

    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return release_config(config, variant, pack) if source == "synermed" else config


# Chosen with `plan --data` on a simulated release (2 subjects, 256² PNGs; docs/packing.md has the numbers). CE
# keeps room for the release's free-form answers beyond the longest one simulated (31 tokens): an answer longer
# than an empty row's CE slots could not be packed. Edit-chain rows end in one CE slot: edits train no text.
RELEASE_PACKS = {
    "tiny": dict(
        stage1=dict(und_tokens=512, gen_tokens=0, vit_patches=96, vit_images=23, vae_images=0, ce_tokens=160,
                    image_size=(32, 32), vit_image_size=(28, 28)),
        stage2=dict(und_tokens=64, gen_tokens=384, vit_patches=12, vit_images=3, vae_images=6, ce_tokens=1,
                    image_size=(32, 32), vit_image_size=(28, 28)),
        # official_tiny: Stage I's conversations and Stage II's edit chains in one row.
        mixed=dict(und_tokens=320, gen_tokens=448, vit_patches=60, vit_images=15, vae_images=7, ce_tokens=128,
                   image_size=(32, 32), vit_image_size=(28, 28)),
    ),
    "small": dict(
        stage1=dict(und_tokens=1024, gen_tokens=0, vit_patches=464, vit_images=29, vae_images=0, ce_tokens=256,
                    image_size=(64, 64), vit_image_size=(56, 56)),
        stage2=dict(und_tokens=128, gen_tokens=384, vit_patches=64, vit_images=4, vae_images=6, ce_tokens=1,
                    image_size=(64, 64), vit_image_size=(56, 56)),
    ),
    # Official geometry; slots for 256² slices (train_common.official_geometry; training re-derives them from the
    # build): a VAE image is 1,024 latent tokens, an edit's ViT image 324 patches, a conversation's 729.
    "bagel_7b_mot": dict(
        # Conversations: room for 10 ViT images a row.
        stage1=dict(und_tokens=8192, gen_tokens=0, vit_patches=7424, vit_images=10, vae_images=0, ce_tokens=1024),
        # Edit chains: a 2-step interleaved sample is 4 VAE images (4,096 latent tokens) + 2 ViT images (~700 und
        # tokens with its text); 10,240 tokens (BAGEL's fine-tuning expected_num_tokens, TRAIN.md).
        stage2=dict(und_tokens=2048, gen_tokens=8192, vit_patches=1620, vit_images=5, vae_images=8, ce_tokens=1),
        # official: 10,752 tokens, between TRAIN.md's fine-tuning expected_num_tokens (10,240, what BAGEL packs
        # to) and max_num_tokens (11,520, its hard cap), split where conversations and edits fill both regions.
        mixed=dict(und_tokens=5632, gen_tokens=5120, vit_patches=5427, vit_images=9, vae_images=5, ce_tokens=1024),
    ),
}


def release_config(config: ml_collections.ConfigDict, variant: str, pack: str) -> ml_collections.ConfigDict:
    """Turns a stage config of ``variant`` into its twin on a SynerMed release build (``source=synermed``, see
    configs/synermed.py): the release's pack budgets, its build folder, no augmentation, no in-run evaluation."""
    if variant not in RELEASE_PACKS:
        raise ValueError(f"unknown variant {variant!r} with source=synermed; expected one of {sorted(RELEASE_PACKS)}")
    config.data.source = "synermed"
    config.data.dir = "data/synermed"
    config.data.augment = False  # the official loaders do not augment
    config.data.pack = pack_config(RELEASE_PACKS[variant][pack], config.data.stage, variant in OFFICIAL_GEOMETRY)
    config.train.eval_every = 0
    config.train.image_every = 0
    return config



def understanding_optimisation(config: ml_collections.ConfigDict, variant: str | None) -> ml_collections.ConfigDict:
    """Stage I-type runs (GAU, the VQA control, the ablations: one rule so the arms stay comparable).

    tiny and small train their ViT from scratch (no pretrained SigLIP at this size), which needs care: the
    recipes and their measurements are in docs/experiments.md ("Stage I: a ViT trained from scratch")."""
    variant = variant or "tiny"
    if variant == "tiny":
        config.train.lr = 3e-3  # the width-64 model learns the answer format in ~40 steps instead of ~100
        config.train.warmup = 10
    if variant in ("tiny", "small"):
        # Adam moves a from-scratch ViT coherently with the constant background: slower ViT, fixed random
        # patch projection (as MoCo v3 does), so the image tokens keep what tells images apart.
        config.train.vit_lr_scale = 0.1
        config.train.freeze_vit_patch_embedding = True
    return config
