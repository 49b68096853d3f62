"""configs/synermed.py:official — BAGEL's fine-tuning recipe as one mixed run — loads with the official numbers,
its 7B train state plans abstractly (nothing allocated), its official-geometry packs build from a simulated
SynerMed release at the real sizes, and its tiny twin trains 2 steps on that release."""

from __future__ import annotations

import numpy as np
import pytest

from synermedgen_jax.config import apply_overrides, load_config

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from synermedgen_jax.data.synermed_build import SynerMedBuildConfig, build_release
    from synermedgen_jax.data.synermed_sim import write_release

    root = tmp_path_factory.mktemp("release") / "SynerMed"
    write_release(root, slices_per_subject=4, row_group_size=4, bad=False)
    out = tmp_path_factory.mktemp("built") / "synermed"
    assert build_release(SynerMedBuildConfig(root=str(root), out=str(out), progress=False)).finished
    return out


def test_official_config_has_the_official_numbers():
    from synermedgen_jax.training import optim
    from synermedgen_jax.training.loop import resolve_config

    config = load_config("configs/synermed.py:official")
    assert load_config("configs/synermed.py").train.lr == config.train.lr  # "official" is the default variant
    t, d, pack = config.train, config.data, config.data.pack
    assert config.stage == "stage2_ucg" and config.model.variant == "bagel_7b_mot"
    assert (t.lr, t.warmup, t.schedule, t.b1, t.b2, t.eps, t.weight_decay) == (2e-5, 2000, "constant", 0.9, 0.95,
                                                                               1e-15, 0.0)
    assert (t.clip, t.ema, t.ema_warmup, t.ce_weight, t.mse_weight) == (1.0, 0.9999, False, 1.0, 1.0)
    assert (d.source, d.stage, d.stage2_weight, d.augment) == ("synermed", "mixed", 0.5, False)
    assert (d.cfg_text, d.cfg_vit, d.cfg_vae) == (0.1, 0.3, 0.3)
    assert 10240 <= pack.und_tokens + pack.gen_tokens <= 11520  # fine-tuning expected / max_num_tokens
    assert pack.vae_resize.to_dict() == dict(min_side=512, max_side=1024, stride=16, max_pixels=1_806_336)
    assert pack.vlm_vit_resize.max_pixels == 2_007_040 and pack.vit_resize.max_side == 518
    assert tuple(pack.image_size) == (512, 512) and tuple(pack.vit_image_size) == (378, 378)  # 256² slices
    assert config.init_from == "" and config.init_moe is False
    assert config.model.max_latent_size == 64 and config.model.vit.max_num_patch_per_side == 70
    resolved = resolve_config(config)
    assert optim.trainable_groups(resolved) == ("gen", "und")  # ViT, connector, both experts; the VAE frozen
    assert resolved.model.llm.freeze_und is False
    with pytest.raises(Exception, match="unknown variant"):
        load_config("configs/synermed.py:nope")


def test_official_7b_plans_abstractly():
    """The trainer's own abstract model of the 7B run (nnx.eval_shape: nothing allocated; what plan and
    model-info build) and an empty row of the official budget (plan's batch shapes)."""
    from synermedgen_jax.data.packing import PackBudget, PackBuilder, SpecialTokens, empty_row
    from synermedgen_jax.training.loop import build, resolve_config

    config = resolve_config(load_config("configs/synermed.py:official"))
    _, codec, _ = build(config)
    size = {name: int(np.prod(variable.value.shape)) for name, (_, variable) in codec.templates.items()}
    trained, frozen = sum(size[n] for n in codec.trainable), sum(size[n] for n in codec.frozen)
    assert 14.5e9 < trained < 14.7e9  # all of BAGEL-7B-MoT's 14.6 B parameters but the VAE
    assert 110e6 < frozen < 120e6  # the VAE (84 M) and the two frozen sin-cos position tables (32 M)
    row = empty_row(PackBuilder(PackBudget.from_config(config.data.pack), SpecialTokens(1, 2, 3, 4), config.model))
    assert row["vae_images"].shape == (5, 512, 512, 3)
    assert row["token_ids"].shape == (5632,) and row["latent_index"].shape == (5120,)


def test_official_packs_build_from_the_release_at_official_sizes(built):
    """Slots come from the release's slices (non-square here), samples are resized by the official rules and
    pack into the 7B budget (the model is never built)."""
    from synermedgen_jax.data import synermed
    from synermedgen_jax.data.packing import PackBuilder, SpecialTokens, VaeImage, VitImage
    from synermedgen_jax.data.pipeline import slice_shape
    from synermedgen_jax.data.release_samples import ReleaseSamples
    from synermedgen_jax.training import inputs

    config = apply_overrides(load_config("configs/synermed.py:official"), [f"--config.data.dir={built}"])
    shape = slice_shape(built, "synermed")
    assert shape[0] != shape[1]  # the simulated release's 8 mm slices are not square
    budget = inputs.pack_budget(config)
    height, width = shape
    assert budget.image_size == synermed_size(height, width, 512, 1024, 16)
    assert tuple(config.data.pack.slice_size) == shape  # written back: config.json names the slots used
    maker = ReleaseSamples(str(built), budget, inputs.pipeline_config(config.data), config.model)
    builder = PackBuilder(budget, SpecialTokens(1, 2, 3, 4), config.model)
    rng = np.random.default_rng(0)
    sizes = set()
    for kind in (synermed.EDIT, synermed.CONV):
        for index in range(3):
            out = maker((kind, index), rng)
            assert out is not None, (kind, index)  # fits an empty official row
            for item in out[0]:
                if isinstance(item, (VaeImage, VitImage)):
                    sizes.add((type(item).__name__, kind, item.pixels.shape[:2]))
            if not builder.fits(out[0]):
                builder.build()
            builder.add(out[0], rng)
    row = builder.build()
    assert row["vae_images"].shape == (budget.vae_images, *budget.image_size, 3)
    assert ("VaeImage", "edit", budget.image_size) in sizes
    assert ("VitImage", "edit", synermed_size(height, width, 224, 518, 14)) in sizes
    assert ("VitImage", "conv", synermed_size(height, width, 378, 980, 14)) in sizes


def synermed_size(height: int, width: int, min_side: int, max_side: int, stride: int) -> tuple[int, int]:
    """The rule's size of a slice far below ``min_side`` and not too elongated: the short side scaled to
    ``min_side``, each side rounded to the stride."""
    scale = min_side / min(height, width)
    return tuple(max(stride, round(round(side * scale) / stride) * stride) for side in (height, width))


def test_official_tiny_trains_two_steps_on_the_release(built, tmp_path):
    from train_helpers import read_metrics

    from synermedgen_jax.training.loop import train

    overrides = {"data.dir": str(built), "train.progress": False, "train.checkpoint_every": 2,
                 "train.async_checkpoint": False}
    config = apply_overrides(load_config("configs/synermed.py:official_tiny"),
                             [f"--config.{k}={v}" for k, v in overrides.items()])
    assert (config.train.steps, config.data.stage, config.train.finetune_und) == (2, "mixed", True)
    assert config.data.pack.vae_resize is None  # tiny keeps fixed squares (an 8-patch ViT table)
    assert train(config, tmp_path / "run") == 0
    curve = read_metrics(tmp_path / "run")
    assert sorted(curve) == [0, 1], curve
    for record in curve.values():  # CE and MSE in one loss: the mixed rows carry conversations and edits
        assert record["ce"] > 0 and record["mse"] > 0 and np.isfinite(record["loss"]), record
