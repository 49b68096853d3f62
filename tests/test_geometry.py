"""The official image geometry (data/geometry.py): BAGEL's resize arithmetic, slots, fitting, and the pipeline
and trainer inputs that use them (data/pipeline.py, training/inputs.pack_budget)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from synermedgen_jax.data.geometry import (
    EDIT_VAE,
    EDIT_VIT,
    INFERENCE_VAE,
    INFERENCE_VIT,
    VLM_VIT,
    ImageRules,
    PackImages,
    ResizeRule,
    SlotResize,
    fit_into,
    rule_from_config,
)

NAMED = (EDIT_VAE, EDIT_VIT, VLM_VIT, INFERENCE_VAE, INFERENCE_VIT)


def bagel_size(width: int, height: int, max_size: int, min_size: int, stride: int, max_pixels: int,
               img_num: int = 1) -> tuple[int, int]:
    """BAGEL's ``MaxLongEdgeMinShortEdgeResize.forward`` size arithmetic (data/transforms.py), written out again in
    its own (width, height) order; returns ``(new_width, new_height)``."""

    def divisible(value):
        return max(stride, int(round(value / stride) * stride))

    def apply(w, h, s):
        return divisible(round(w * s)), divisible(round(h * s))

    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    new_w, new_h = apply(width, height, scale)
    if new_w * new_h > max_pixels / img_num:
        new_w, new_h = apply(new_w, new_h, max_pixels / img_num / (new_w * new_h))
    if max(new_w, new_h) > max_size:
        new_w, new_h = apply(new_w, new_h, max_size / max(new_w, new_h))
    return new_w, new_h


def test_rules_match_bagels_arithmetic():
    rng = random.Random(0)
    rules = NAMED + (ResizeRule(32, 100, 4, 5000), ResizeRule(28, 112, 14))
    for rule in rules:
        for _ in range(3000):
            h, w, k = rng.randint(1, 2500), rng.randint(1, 2500), rng.choice([1, 2, 3, 5, 14, 40])
            bw, bh = bagel_size(w, h, rule.max_side, rule.min_side, rule.stride, rule.max_pixels, k)
            assert rule.size_for(h, w, images=k) == (bh, bw), (rule, h, w, k)
    # The release's numbers (example.yaml; the brief's arithmetic): a 256² slice.
    assert EDIT_VAE.size_for(256, 256) == (512, 512)  # 32² = 1,024 latent tokens
    assert EDIT_VIT.size_for(256, 256) == (252, 252)  # 18² = 324 patches
    assert VLM_VIT.size_for(256, 256) == (378, 378)  # 27² = 729 patches
    assert VLM_VIT.max_pixels == 2_007_040 and EDIT_VAE.max_pixels == 14 * 14 * 9 * 1024
    assert EDIT_VAE.size_for(240, 320) == (512, 688)  # short side to 512, aspect kept, stride 16
    assert EDIT_VAE.size_for(100, 3000)[1] == 1024  # the long side wins over the short side's minimum


def test_rules_stay_inside_the_7b_position_tables():
    """Every size a rule gives fits BAGEL-7B's tables: max_latent_size 64 (1,024 px at 16 px a token) and the
    ViT's 70 patches a side (980 px)."""
    rng = random.Random(1)
    for rule, stride, table in ((EDIT_VAE, 16, 64), (INFERENCE_VAE, 16, 64), (EDIT_VIT, 14, 70), (VLM_VIT, 14, 70),
                                (INFERENCE_VIT, 14, 70)):
        for _ in range(3000):
            h, w = rng.randint(1, 4000), rng.randint(1, 4000)
            size = rule.size_for(h, w, images=rng.choice([1, 3]))
            assert size[0] % stride == 0 and size[1] % stride == 0
            assert max(size) // stride <= table, (rule, h, w, size)
    rules = ImageRules(EDIT_VAE, EDIT_VIT, VLM_VIT)
    rules.check_model(16, 64, 14, 70)  # BAGEL-7B-MoT
    with pytest.raises(ValueError, match="max_latent_size=32"):
        rules.check_model(16, 32, 14, 70)
    with pytest.raises(ValueError, match="stride 16 is not a multiple"):
        ImageRules(vae=EDIT_VAE).check_model(32, 64, 14, 70)


def test_fit_into_keeps_what_fits_and_shrinks_the_rest():
    assert fit_into((512, 384), (512, 512), 16) == (512, 384)
    assert fit_into((688, 512), (512, 512), 16) == (512, 368)  # 512/688 of each side, down to 16 px
    for _ in range(200):
        size = tuple(int(x) * 16 for x in np.random.default_rng(_).integers(1, 80, 2))
        h, w = fit_into(size, (512, 640), 16)
        assert h <= 512 and w <= 640 and h % 16 == 0 and w % 16 == 0
        if size[0] <= 512 and size[1] <= 640:
            assert (h, w) == size
        else:  # one scale for both sides, each rounded down to the stride
            scale = min(512 / size[0], 640 / size[1])
            for side, exact in ((h, size[0] * scale), (w, size[1] * scale)):
                assert exact - 16 < side <= max(exact, 16)


def test_slots_follow_the_stage_and_rules_read_from_config():
    rules = ImageRules.from_pack(dict(vae_resize=dict(min_side=512, max_side=1024, stride=16),
                                      vit_resize=EDIT_VIT, vlm_vit_resize=None))
    assert rules.vae == EDIT_VAE and rules.vit == EDIT_VIT and rules.vlm_vit is None and rules.any
    assert not ImageRules.from_pack({}).any
    full = ImageRules(EDIT_VAE, EDIT_VIT, VLM_VIT)
    assert full.slots((256, 256), "stage2", (0, 0), (0, 0)) == ((512, 512), (252, 252))
    assert full.slots((256, 256), "stage1", (0, 0), (0, 0)) == ((512, 512), (378, 378))
    assert full.slots((256, 256), "mixed", (0, 0), (0, 0)) == ((512, 512), (378, 378))
    assert full.slots((29, 25), "mixed", (0, 0), (0, 0)) == ((592, 512), (434, 378))
    assert rules.slots((256, 256), "stage1", (0, 0), (56, 56)) == ((512, 512), (56, 56))  # no VLM rule: fixed
    with pytest.raises(ValueError, match="resize rule"):
        rule_from_config(dict(min_side=1, typo=2))


def test_slot_resize_and_pack_images():
    image = np.linspace(-1, 1, 30 * 20, dtype=np.float32).reshape(30, 20)
    fixed = PackImages((32, 32), (28, 28))
    assert fixed.vae(image).shape == (32, 32) and fixed.vit(image).shape == (28, 28)
    tiny = ImageRules(ResizeRule(16, 48, 4), ResizeRule(14, 42, 14), ResizeRule(28, 56, 14))
    images = PackImages((48, 32), (42, 42), tiny)
    assert images.vae(image).shape == (32, 20) and images.vae.fitted == 0  # the rule's size fits the slot: kept
    assert images.vit(image).shape == (28, 14) and images.vlm_vit(image).shape == (42, 28)
    small_slot = SlotResize((16, 16), ResizeRule(16, 48, 4))
    assert small_slot(image).shape == (16, 8) and small_slot.fitted == 1  # 32x20 fitted into 16x16
    rgb = np.zeros((30, 20, 3), np.float32)
    assert images.vae(rgb).shape == (32, 20, 3)


def test_a_smaller_image_sits_top_left_in_its_slot_with_only_its_own_tokens(tiny_config):
    from synermedgen_jax.data.packing import PackBudget, PackBuilder, SpecialTokens, VaeImage

    budget = PackBudget(und_tokens=16, gen_tokens=64, vit_patches=4, vit_images=1, vae_images=2, ce_tokens=4,
                        image_size=(32, 32), vit_image_size=(28, 28))
    builder = PackBuilder(budget, SpecialTokens(1, 2, 3, 4), tiny_config)  # latent stride 4: an 8x8 slot grid
    wide = np.full((16, 32), 0.5, np.float32)
    builder.add([VaeImage(wide, noised=True)], np.random.default_rng(0))
    row = builder.build()
    assert int(row["mse_mask"].sum()) == 4 * 8  # a 4x8 latent grid, not the slot's 8x8
    np.testing.assert_array_equal(row["vae_images"][0, :16, :, 0], wide)
    assert not row["vae_images"][0, 16:].any()  # zeros below it (BAGEL pads its VAE batch the same way)
    np.testing.assert_array_equal(row["latent_index"][:32], (np.arange(4)[:, None] * 8 + np.arange(8)).ravel())


# ------------------------------------------------------------------------------------ pipeline and trainer


TINY_RULES = {"vae_resize": dict(min_side=40, max_side=64, stride=4),  # tiny: 4 px a latent token, 16 a side
              "vit_resize": dict(min_side=28, max_side=56, stride=14),
              "vlm_vit_resize": dict(min_side=42, max_side=112, stride=14)}


@pytest.fixture(scope="module")
def records_build(tmp_path_factory):
    from synermedgen_jax.__main__ import main as cli

    out = tmp_path_factory.mktemp("geometry") / "sim"
    assert cli(["build-data", "--source", "mni152-sim", "--out", str(out), "--subjects", "1", "--sim-voxel-mm",
                "8", "--slice-size", "32", "--split", "1", "0", "0", "--instances-per-pair", "0.5",
                "--no-progress"]) == 0
    return out


def test_pack_budget_sizes_slots_from_the_build_and_batches_follow(records_build):
    from synermedgen_jax.config import apply_overrides, load_config
    from synermedgen_jax.data.pipeline import slice_shape
    from synermedgen_jax.data.volumes import DataError
    from synermedgen_jax.training import inputs

    assert slice_shape(records_build) == (32, 32)
    with pytest.raises(DataError, match="cannot read the slice shape"):
        slice_shape(records_build / "nothing")
    config = apply_overrides(load_config("configs/stage2_ucg.py:tiny"), [
        f"--config.data.dir={records_build}", "--config.data.stage=mixed", "--config.train.rows=2",
        "--config.data.pack.und_tokens=512", "--config.data.pack.vit_patches=64", "--config.data.pack.vit_images=16",
        "--config.data.pack.ce_tokens=32",
        *[f"--config.data.pack.{k}={v}" for k, v in TINY_RULES.items()]])
    assert config.data.pack.vae_resize.min_side == 40
    budget = inputs.pack_budget(config)
    # 32² slices: VAE 40² (short side to 40), ViT max(28², 42²) in a mixed stage; written back into the config.
    assert budget.image_size == (40, 40) and budget.vit_image_size == (42, 42)
    assert tuple(config.data.pack.image_size) == (40, 40)
    batch = next(inputs.train_batches(config))
    assert batch["vae_images"].shape[2:4] == (40, 40)
    for row in batch["vit_image_id"]:  # image ids count per row
        _, counts = np.unique(row[row >= 0], return_counts=True)
        assert set(counts) <= {4, 9}  # edit ViT images 28² (2x2 patches), understanding ones 42² (3x3)
    latents = batch["mse_mask"].sum(axis=-1)
    assert all(n % 100 == 0 for n in latents)  # each noised target is 10x10 latent tokens
    # A budget that cannot hold one sample at these slots is one line naming the field.
    small = apply_overrides(config, ["--config.data.pack.gen_tokens=150"])
    with pytest.raises(ValueError, match="gen_tokens=150 cannot hold"):
        inputs.pack_budget(small)
