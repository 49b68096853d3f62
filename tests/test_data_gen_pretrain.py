"""Generic generation pre-training data (data/gen_pretrain.py, ``data.stage = "gen_pretrain"``): every sample is
a same-modality edit, never a cross-modal pair — checked on the images the pipeline emits, not only on the table."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from synermedgen_jax.__main__ import main as cli
from synermedgen_jax.config import load_config
from synermedgen_jax.data import gen_pretrain, prompts
from synermedgen_jax.data.packing import PackBudget, Text, VaeImage
from synermedgen_jax.data.pipeline import PipelineConfig, packed_dataset, sample_dataset
from synermedgen_jax.data.records import RecordReader, load_index
from synermedgen_jax.data.tokenizer import load_tokenizer
from synermedgen_jax.data.volumes import MODALITY_NAMES, display_name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("gp_data")
    assert cli(["build-data", "--source", "mni152-sim", "--out", str(out), "--subjects", "2", "--sim-voxel-mm",
                "8", "--slice-size", "32", "--split", "1", "0", "0", "--instances-per-pair", "0.5",
                "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def config():
    return load_config("configs/gen_pretrain.py:tiny")


def test_config_trains_the_generation_expert_on_edits(config):
    assert config.stage == "stage2_ucg" and config.data.stage == "gen_pretrain"
    assert not config.init_moe and config.train.ema == 0.0


def test_edit_table_is_same_modality_and_covers_every_edit(data):
    index = load_index(data, "train")
    table = gen_pretrain.edit_table(index)
    assert np.array_equal(table["src"], table["tgt"])  # the claim: no cross-modal pair
    assert Counter(gen_pretrain.EDITS[e] for e in table["edit"]).keys() == set(gen_pretrain.EDITS)
    case, z = np.asarray(index["case"]), np.asarray(index["slice_index"])
    for rec, tgt, edit in zip(table["rec"], table["tgt_rec"], table["edit"]):
        step = {"slice_up": 1, "slice_down": -1}.get(gen_pretrain.EDITS[edit], 0)
        assert case[tgt] == case[rec] and z[tgt] == z[rec] + step
    again = gen_pretrain.edit_table(index)  # deterministic: the built data decides it, not a run's seed
    assert all(np.array_equal(table[k], again[k]) for k in table)


def _matches(image: np.ndarray, candidates: dict[str, np.ndarray]) -> set[str]:
    return {m for m, c in candidates.items() if np.allclose(image, c, atol=1e-5)}


def _noise_only(noisy: np.ndarray, clean: np.ndarray) -> bool:
    """``noisy`` is ``clean`` plus noise of at most the largest std, clipped to [-1, 1] (clipping only shrinks it)."""
    return float(np.sqrt(np.mean((noisy - clean) ** 2))) <= gen_pretrain.NOISE_STD[1] * 1.1


def test_every_sample_is_a_same_modality_edit(data, config):
    """Each emitted sample's source and target images are matched against every modality of the records: the
    source is the declared (record, modality) image and the target is that modality's edit, so no sample pairs
    two modalities. Instructions name the sample's own modality only."""
    budget = PackBudget.from_config(config.data.pack)
    pipe = PipelineConfig(stage="gen_pretrain", augment=False, cfg_text=0.0, cfg_vit=0.0, cfg_vae=0.0, shuffle=False,
                          repeat=False, process_index=0, process_count=1)
    table = gen_pretrain.edit_table(load_index(data, "train"))
    reader, tokenizer = RecordReader(data, "train"), load_tokenizer(data / "tokenizer.json")
    images = {}
    seen = 0
    for items, tag in sample_dataset(data, budget, pipe):
        row = int(tag.split("#")[1])
        rec, tgt_rec = int(table["rec"][row]), int(table["tgt_rec"][row])
        modality, edit = MODALITY_NAMES[int(table["src"][row])], gen_pretrain.EDITS[int(table["edit"][row])]
        for r in (rec, tgt_rec):
            images.setdefault(r, {m: np.asarray(v, np.float32) for m, v in reader[r]["images"].items()})
        source, target = (item.pixels for item in items if isinstance(item, VaeImage))
        source, target = np.squeeze(source), np.squeeze(target)
        if edit == "denoise":  # the source is the clean slice plus noise, clipped to [-1, 1]
            src_match = {m for m, c in images[rec].items() if _noise_only(source, c)}
            tgt_match = _matches(target, images[rec])
        else:
            src_match = _matches(source, images[rec])
            rng = np.random.default_rng(0)  # only the denoising edit draws numbers
            tgt_match = {m for m, c in images[tgt_rec].items()
                         if np.allclose(target, gen_pretrain.apply_edit(edit, images[rec][m], c, rng)[1], atol=1e-5)}
        assert modality in src_match and modality in tgt_match, (tag, edit, modality, src_match, tgt_match)
        assert src_match & tgt_match, f"{tag}: a cross-modal pair ({src_match} -> {tgt_match})"
        text = tokenizer.decode(next(item for item in items if isinstance(item, Text)).token_ids)
        assert text == prompts.gen_pretrain_instruction(edit, int(table["template"][row]), modality)
        assert all(display_name(m) not in text for m in MODALITY_NAMES
                   if m != modality and display_name(m) not in display_name(modality))
        seen += 1
    assert seen == len(table["rec"])  # one pass over the table, every edit row emitted


def test_packs_fit_the_stage2_budget_and_carry_a_target(data, config):
    """The small and tiny Stage II pack budgets hold a pre-training sample (the instructions are short)."""
    budget = PackBudget.from_config(config.data.pack)
    pipe = PipelineConfig(stage="gen_pretrain", augment=True, rows_per_batch=2, process_index=0, process_count=1)
    batch = next(iter(packed_dataset(data, budget, config.model, pipe)))
    assert batch["sample_id"].shape[0] == 2 and (batch["sample_id"] >= 0).any()
    small = load_config("configs/gen_pretrain.py:small").data.pack
    tokenizer = load_tokenizer(data / "tokenizer.json")
    longest = max(len(tokenizer.encode(prompts.gen_pretrain_instruction(e, t, m)))
                  for e in gen_pretrain.EDITS for t in (0, 1) for m in MODALITY_NAMES)
    from synermedgen_jax.data.routes import all_tasks

    assert longest <= max(len(tokenizer.encode(t.instruction)) for t in all_tasks()) <= small.und_tokens
