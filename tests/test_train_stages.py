"""Short CPU runs of each stage on the tiny config: stage 0 VAE improves reconstruction and is loadable by
Stage I (vae_from); Stage I raises held-out answer-token accuracy; Stage II (init_from + init_moe) lowers the
flow-matching loss; optimizer state exists only for trained parameters; grad accumulation is exact."""

from __future__ import annotations

import numpy as np
import pytest
import train_helpers as h

from synermedgen_jax.config import apply_overrides, load_config

PAD = 2  # training/logging.image_grid's padding


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return h.build_data(tmp_path_factory.mktemp("stagedata"))


def _config(spec: str, data, **extra):
    base = {"data.dir": str(data), "train.progress": False, "train.eval_every": 0}
    base.update(extra)
    return apply_overrides(load_config(spec), [f"--config.{k}={v}" for k, v in base.items()])


def test_masks_give_no_optimizer_state_to_frozen_params(data):
    from synermedgen_jax.training import loop, optim, step

    for spec, trained, frozen in [("configs/stage1_gau.py:tiny", "connector.fc1.kernel",
                                   "language_model.layers.0.mlp_moe_gen.up_proj.kernel"),
                                  ("configs/stage2_ucg.py:tiny", "llm2vae.kernel", "vit_model.post_layernorm.weight")]:
        config = loop.resolve_config(_config(spec, data))
        model, codec, _ = loop.build(config)
        state = step.init_state(codec, model, optim.make_optimizer(config.train), config.train)
        assert trained in state["params"] and frozen in state["frozen"] and frozen not in state["params"]
        mu = state["opt"][1][0].mu
        assert set(mu) == set(state["params"])
        assert not any(name.startswith("vae.") for name in state["params"])


def test_vae_then_stage1_then_stage2(data, tmp_path):
    from synermedgen_jax.training.loop import read_metrics, train

    vae_dir = tmp_path / "vae"
    assert train(_config("configs/vae.py:tiny", data, **{"train.steps": 30, "train.rows": 8,
                                                         "train.lr": 3e-3, "train.checkpoint_every": 30,
                                                         "train.eval_every": 30, "train.eval_rows": 8}), vae_dir) == 0
    curve = read_metrics(vae_dir)
    first, last = np.mean([curve[s]["l1"] for s in range(3)]), np.mean([curve[s]["l1"] for s in range(27, 30)])
    assert last < 0.8 * first, (first, last)
    assert read_metrics(vae_dir, eval_records=True)[30]["images"]["psnr"] > 0

    s1 = tmp_path / "s1"
    config = _config("configs/stage1_gau.py:tiny", data, **{"train.steps": 60, "train.checkpoint_every": 60,
                                                           "train.eval_every": 60, "train.eval_rows": 16,
                                                           "vae_from": str(vae_dir)})
    assert train(config, s1) == 0
    from synermedgen_jax.training.checkpoint import load_model

    _, vae_model = load_model(str(vae_dir))
    _, model = load_model(str(s1))
    np.testing.assert_array_equal(np.asarray(model.vae.encoder.conv_in.kernel[...]),
                                  np.asarray(vae_model.vae.encoder.conv_in.kernel[...]))
    curve = read_metrics(s1)
    assert np.mean([curve[s]["ce"] for s in range(55, 60)]) < np.mean([curve[s]["ce"] for s in range(5)]) - 0.5
    held_out = read_metrics(s1, eval_records=True)[60]
    # Answer tokens on held-out instances (other subject): well above the 1/512 of an untrained vocabulary.
    assert held_out["mi"]["token_accuracy"] > 0.3
    # Generated answers (KV-cached greedy decoding, parsed as `eval` parses them) of held-out prompts are in
    # the answer format: a letter for CTS/TIA, a four-panel modality map for MI. (Above-chance *accuracy* on
    # held-out instances is not reached by a run this short; see the Stage I notes in configs/train_common.py.)
    from synermedgen_jax.evaluation.evaluate import EvalConfig, evaluate_understanding
    from synermedgen_jax.inference.loading import load_for_inference

    answers = evaluate_understanding(load_for_inference(str(s1)), str(data), EvalConfig(
        split="val", max_instances=16, batch_size=16, max_new_tokens=32))
    assert sorted(answers) == ["cts", "mi", "tia"] and all(r["n"] == 16 for r in answers.values())
    assert answers["cts"]["unparseable"] == answers["tia"]["unparseable"] == 0, answers
    # MI answers are 17-29 tokens long; after 60 steps an occasional one still breaks the format (2/16 seen).
    assert answers["mi"]["unparseable"] <= 4, answers["mi"]

    s2 = tmp_path / "s2"
    config = _config("configs/stage2_ucg.py:tiny", data, **{"train.steps": 40, "train.checkpoint_every": 40,
                                                           "init_from": str(s1), "train.lr": 2e-3,
                                                           "train.image_every": 20, "train.image_slices": 2,
                                                           "train.image_sample_steps": 4})
    assert train(config, s2) == 0
    _check_sample_grids(s2, data)
    curve = read_metrics(s2)
    assert np.mean([curve[s]["mse"] for s in range(35, 40)]) < 0.9 * np.mean([curve[s]["mse"] for s in range(5)])
    _, stage2 = load_model(str(s2), ema=False)
    # init_moe copied the understanding expert; frozen und weights equal Stage I's.
    np.testing.assert_array_equal(np.asarray(stage2.connector.fc1.kernel[...]),
                                  np.asarray(load_model(str(s1), ema=False)[1].connector.fc1.kernel[...]))


def _check_sample_grids(workdir, data):
    """The Stage II grids at steps 20 and 40: PNG and tensorboard image; the source/target columns are the
    held-out record slices, the step-40 prediction column is what an independent Sampler run on the saved
    EMA weights produces."""
    from PIL import Image

    from synermedgen_jax.data.records import RecordReader
    from synermedgen_jax.data.tokenizer import load_tokenizer
    from synermedgen_jax.inference.sampler import Sampler, SamplerConfig
    from synermedgen_jax.modeling.packing import SpecialTokens
    from synermedgen_jax.training.checkpoint import load_model
    from synermedgen_jax.training.logging import image_grid
    from synermedgen_jax.training.train_eval import SampleGrids

    pngs = sorted((workdir / "images").glob("*.png"))
    assert [p.name for p in pngs] == ["step_00000020.png", "step_00000040.png"]
    assert not list((workdir / "images").glob(".*tmp"))  # atomic writes leave no temporary file
    grids = [np.asarray(Image.open(p).convert("L")) for p in pngs]
    h = w = 32
    assert grids[0].shape == (2 * (h + PAD) + PAD, 3 * (w + PAD) + PAD)
    cell = lambda g, i, j: g[PAD + i * (h + PAD):PAD + i * (h + PAD) + h, PAD + j * (w + PAD):PAD + j * (w + PAD) + w]
    config, model = load_model(str(workdir))
    picked = SampleGrids(config, None, workdir, None)  # the same slice choice, read independently below
    reader = RecordReader(data, "val")
    for i, rec in enumerate(picked.indices):
        record = reader[int(rec)]
        want = image_grid([np.asarray(record["images"][m], np.float32)[None] for m in (picked.src, picked.tgt)])[0]
        np.testing.assert_array_equal(cell(grids[1], i, 0), cell(want, 0, 0))
        np.testing.assert_array_equal(cell(grids[1], i, 1), cell(want, 0, 1))
    tok = load_tokenizer(data / "tokenizer.json")
    sampler = Sampler(model, SpecialTokens.from_tokenizer(tok), (h, w), tuple(config.data.pack.vit_image_size),
                      SamplerConfig(num_steps=4))
    preds = sampler.generate(picked.sources, picked.instruction, seed=int(config.train.seed), indices=picked.indices)
    want = image_grid([preds])[0]
    for i in range(len(preds)):
        # uint8 rounding of the same float computation: at most one grey level apart.
        diff = np.abs(cell(grids[1], i, 2).astype(int) - cell(want, i, 0).astype(int))
        assert diff.max() <= 1, diff.max()
    assert not np.array_equal(grids[0][:, 2 * (w + PAD):], grids[1][:, 2 * (w + PAD):])  # weights moved
    images = [(tag, step) for tag, step in _tb_images(workdir / "tb") if tag.startswith("samples/")]
    assert images == [(f"samples/{picked.src}_to_{picked.tgt}", 20), (f"samples/{picked.src}_to_{picked.tgt}", 40)]


def _tb_images(folder) -> list[tuple[str, int]]:
    """``(tag, step)`` of every image summary in a tensorboard folder (TFRecord framing: u64 length, u32 crc,
    payload, u32 crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        raw = path.read_bytes()
        pos = 0
        while pos + 12 <= len(raw):
            (length,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            out += [(v.tag, event.step) for v in event.summary.value if v.HasField("image")]
    return out
