"""Grain pipeline: resume gives the identical next batch, per-process sharding, mixing ratios, packing
errors, paired augmentation and Stage II samples."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from synermedgen_jax.__main__ import main as cli
from synermedgen_jax.config import load_config
from synermedgen_jax.data.packing import PackBudget, PackOverflowError, Text, VaeImage, VitImage
from synermedgen_jax.data.pipeline import PipelineConfig, packed_dataset, sample_dataset
from synermedgen_jax.data.record_samples import RecordSamples, paired_augment
from synermedgen_jax.data.records import RecordReader
from synermedgen_jax.data.understanding import render
from synermedgen_jax.data.volumes import MODALITY_NAMES

BUDGET = PackBudget(und_tokens=512, gen_tokens=256, vit_patches=256, vit_images=16, vae_images=8, ce_tokens=64,
                    image_size=(32, 32), vit_image_size=(56, 56))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("simdata")
    assert cli(["build-data", "--source", "mni152-sim", "--out", str(out), "--subjects", "2", "--sim-voxel-mm",
                "8", "--slice-size", "32", "--split", "1", "0", "0", "--instances-per-pair", "0.5",
                "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def model_config():
    return load_config("configs/models.py:tiny")


def _cfg(**kw):
    return PipelineConfig(process_index=0, process_count=1, **kw)


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", ["stage1", "mixed"])
def test_resume_gives_identical_next_batch(data, model_config, stage):
    config = _cfg(stage=stage, augment=True, rows_per_batch=2)
    it = iter(packed_dataset(data, BUDGET, model_config, config))
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    fresh = iter(packed_dataset(data, BUDGET, model_config, config))
    fresh.set_state(state)
    for want in expected:
        assert _same(next(fresh), want)
    # A different seed gives different data (the test above could not pass by returning constants).
    other = iter(packed_dataset(data, BUDGET, model_config, dataclasses.replace(config, seed=1)))
    assert not _same(next(other), next(iter(packed_dataset(data, BUDGET, model_config, config))))


def test_batches_have_static_shapes_and_content(data, model_config):
    it = iter(packed_dataset(data, BUDGET, model_config, _cfg(stage="stage1", rows_per_batch=3)))
    shapes = None
    for _ in range(3):
        batch = next(it)
        now = {k: v.shape for k, v in batch.items()}
        assert shapes is None or now == shapes
        shapes = now
        assert batch["token_ids"].shape == (3, BUDGET.und_tokens)
        assert batch["ce_mask"].sum() > 0 and batch["mse_mask"].sum() == 0  # Stage I: CE only
        assert (batch["sample_id"].max(axis=1) >= 1).all()  # several samples packed per row


def test_process_sharding_is_disjoint_and_complete(data):
    def tags(index, count):
        ds = sample_dataset(data, BUDGET, PipelineConfig(stage="vqa", shuffle=False, repeat=False,
                                                          process_index=index, process_count=count))
        return [tag for _, tag in ds]

    everything = tags(0, 1)
    parts = [tags(i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(everything)
    assert not set(parts[0]) & set(parts[1])


def test_mixing_follows_weights(data):
    config = _cfg(stage="mixed", stage2_weight=0.25, task_weights=(("cts", 2.0), ("tia", 1.0), ("mi", 1.0)))
    it = iter(sample_dataset(data, BUDGET, config))
    counts = Counter(next(it)[1].split("#")[0] for _ in range(400))
    assert counts["pairs"] == pytest.approx(100, abs=12)
    assert counts["cts"] == pytest.approx(150, abs=15)
    assert counts["tia"] == pytest.approx(75, abs=12) and counts["mi"] == pytest.approx(75, abs=12)
    assert counts["vqa"] == 0


def test_stage2_samples_and_cfg_dropout(data):
    config = _cfg(stage="stage2", cfg_text=0.5, cfg_vit=0.0, cfg_vae=0.0)
    it = iter(sample_dataset(data, BUDGET, config))
    texts = 0
    for _ in range(200):
        items, tag = next(it)
        assert tag.startswith("pairs#")
        noised = [x for x in items if isinstance(x, VaeImage) and x.noised]
        assert len(noised) == 1 and noised[0].pixels.shape == BUDGET.image_size
        assert sum(isinstance(x, VitImage) for x in items) == 1
        assert noised[0].pixels.min() >= -1.0 - 1e-5 and noised[0].pixels.max() <= 1.0 + 1e-5
        texts += any(isinstance(x, Text) for x in items)
    assert 70 <= texts <= 130  # text kept with probability 0.5


def test_paired_augmentation_moves_source_and_target_together():
    rng_img = np.random.default_rng(0)
    image = -np.ones((32, 32), np.float32)
    image[8:20, 10:24] = rng_img.uniform(0, 1, (12, 14))
    config = PipelineConfig(aug_rotate_deg=10.0, aug_shift=0.1)
    a, b = paired_augment([image, image * 0.5 - 0.5], np.random.default_rng(3), config)
    np.testing.assert_allclose(b, a * 0.5 - 0.5, atol=1e-5)  # same geometry on both
    assert not np.allclose(a, image)
    again = paired_augment([image], np.random.default_rng(3), config)[0]
    np.testing.assert_array_equal(again, a)


@pytest.mark.parametrize("task", ["cts", "mi"])
def test_understanding_augmentation_moves_an_instances_images_together(data, task):
    """``augment_understanding``: every image of a Stage I instance under one spatial transform (so that CTS's
    candidates still line up with the source), drawn from the sample's rng; off, the images are as recorded."""
    config = _cfg(stage="stage1", augment_understanding=True, aug_rotate_deg=10.0, aug_shift=0.1)
    source = RecordSamples(data, BUDGET, config)
    row = int(np.random.default_rng().integers(source.rows[task]))
    reader = RecordReader(data, "train")
    raw = [np.asarray(reader[rec]["images"][modality], np.float32)
           for rec, modality in render(source.tables[task], row).images]
    shown = [item.pixels for item in source((task, row), np.random.default_rng(5))[0] if isinstance(item, VitImage)]
    expected = paired_augment(raw, np.random.default_rng(5), config)
    for got, want in zip(shown, expected, strict=True):
        np.testing.assert_allclose(got, source.images.vlm_vit(want, images=len(raw)), atol=1e-6)
    plain = RecordSamples(data, BUDGET, dataclasses.replace(config, augment_understanding=False))
    unaugmented = [item.pixels for item in plain((task, row), np.random.default_rng(5))[0]
                   if isinstance(item, VitImage)]
    for got, image in zip(unaugmented, raw, strict=True):
        np.testing.assert_allclose(got, plain.images.vlm_vit(image, images=len(raw)), atol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(shown, unaugmented))


def test_redrawn_options_put_the_true_pair_at_the_answer_letter(data):
    """``redraw_options``: a CTS sample's answer letter, drawn afresh from the sample's rng, labels the image that is
    the source's own slice in the target modality (read from the record, not from the instance table)."""
    source = RecordSamples(data, BUDGET, _cfg(stage="stage1", task_weights=(("cts", 1.0),), redraw_options=True))
    letters = set()
    row = int(np.random.default_rng().integers(source.rows["cts"]))  # one instance, met twelve times
    src_rec = int(source.tables["cts"]["img_rec"][row, 0])
    target = MODALITY_NAMES[int(source.tables["cts"]["img_mod"][row, 1])]
    truth = source.images.vlm_vit(np.asarray(RecordReader(data, "train")[src_rec]["images"][target], np.float32),
                                  images=5)
    for seed in range(12):
        items = source(("cts", row), np.random.default_rng(seed))[0]
        letter = source.tokenizer.decode(list(items[-1].token_ids)).strip()
        assert items[-1].loss and letter in "ABCD"
        letters.add(letter)
        candidates = [item.pixels for item in items if isinstance(item, VitImage)][1:]
        matches = [i for i, pixels in enumerate(candidates) if np.allclose(pixels, truth, atol=1e-6)]
        assert matches == ["ABCD".index(letter)]
    assert len(letters) >= 3  # the same instance's letter moves (12 draws give all four with probability ~0.9)


def test_sample_larger_than_budget_is_a_clear_error(data, model_config):
    small = dataclasses.replace(BUDGET, und_tokens=60)
    it = iter(packed_dataset(data, small, model_config, _cfg(stage="stage1")))
    with pytest.raises(PackOverflowError, match=r"sample (cts|tia|mi)#\d+ needs"):
        next(it)


# ---------------------------------------------------------------------------------------------------------------
# The look-ahead packer (data/packing.fill_row in data/pipeline._PackIterator).

def _find(state, key):
    """The first value of ``key`` anywhere in a nested iterator state."""
    if isinstance(state, dict):
        if key in state:
            return state[key]
        for value in state.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


@pytest.mark.parametrize("stage", ["stage1", "mixed"])
def test_lookahead_resume_is_exact_after_every_row(data, model_config, stage):
    """A state saved after any row (through JSON, as Grain's checkpoint handler writes it) restores the rows the
    uninterrupted run made next, including states where later samples were packed ahead of a waiting one."""
    import json

    config = _cfg(stage=stage, augment=True, rows_per_batch=1, lookahead=8)
    it = iter(packed_dataset(data, BUDGET, model_config, config))
    states, rows = [], []
    for _ in range(8):
        states.append(json.loads(json.dumps(it.get_state())))
        rows.append(next(it))
    assert any(_find(state, "packed_ahead") for state in states), "no state had samples packed out of order"
    for k in (1, 4, 6):
        fresh = iter(packed_dataset(data, BUDGET, model_config, config))
        fresh.set_state(states[k])
        for want in rows[k:]:
            assert _same(next(fresh), want)


def test_lookahead_rows_fit_the_budget_and_beat_next_fit(data, model_config):
    from synermedgen_jax.data.packing import REAL_COUNT_KEYS, real_counts

    def first_rows(lookahead):
        it = iter(packed_dataset(data, BUDGET, model_config, _cfg(stage="mixed", rows_per_batch=12,
                                                                     lookahead=lookahead)))
        return real_counts(next(it), model_config)

    look, next_fit = first_rows(32), first_rows(1)
    for key in REAL_COUNT_KEYS[:6]:
        assert (look[key] <= getattr(BUDGET, key)).all(), key
    real = lambda counts: (counts["und_tokens"] + counts["gen_tokens"]).mean()  # noqa: E731
    assert real(look) >= real(next_fit)
    assert look["samples"].mean() > next_fit["samples"].mean()  # the packer changed something


class _Rows:
    """Packs integer sizes into rows of capacity ``cap`` with ``fill_row``; records each sample's arrival row and
    packed row."""

    def __init__(self, sizes, cap, lookahead):
        self.stream, self.window, self.cap, self.lookahead = iter(enumerate(sizes)), [], cap, lookahead
        self.row, self.used, self.arrived_in, self.packed_in = 0, 0, {}, {}

    def refill(self):
        item = next(self.stream, None)
        if item is None:
            return False
        self.arrived_in[item[0]] = self.row
        self.window.append(item)
        return True

    def fits(self, item):
        return self.used + item[1] <= self.cap

    def take(self, item):
        self.used += item[1]
        self.packed_in[item[0]] = self.row

    def run(self):
        from synermedgen_jax.data.packing import fill_row

        while fill_row(self.window, self.refill, self.fits, self.take, self.lookahead):
            assert self.used <= self.cap
            self.row, self.used = self.row + 1, 0
        return self


def test_fill_row_waits_at_most_lookahead_rows_and_is_next_fit_at_one():
    sizes = np.random.default_rng(0).integers(1, 60, size=400).tolist()
    for lookahead in (1, 4, 32):
        rows = _Rows(sizes, 100, lookahead).run()
        assert sorted(rows.packed_in) == list(range(len(sizes)))  # every sample packed once
        assert max(rows.packed_in[i] - rows.arrived_in[i] for i in rows.packed_in) <= lookahead
        if lookahead == 1:  # next-fit, written out
            expect, total, row = {}, 0, 0
            for i, size in enumerate(sizes):
                if total + size > 100:
                    row, total = row + 1, 0
                expect[i], total = row, total + size
            assert rows.packed_in == expect
