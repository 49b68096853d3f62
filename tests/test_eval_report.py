"""The eval command on a tiny built dataset: table, identity baseline vs an independent numpy/skimage
computation, absent routes, understanding accuracy, report files, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import train_helpers as h
from flax import nnx
from skimage.metrics import structural_similarity

from synermedgen_jax.__main__ import main as cli
from synermedgen_jax.data.records import RecordReader
from synermedgen_jax.data.tokenizer import load_tokenizer
from synermedgen_jax.inference import loading
from synermedgen_jax.modeling.synermedgen import SynerMedGen

TASKS = ["mni152-sim/brain/t1->t2", "mni152-sim/brain/t2->t1"]


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return h.build_data(tmp_path_factory.mktemp("evaldata"))


@pytest.fixture(scope="module")
def report(data, tiny_config, tmp_path_factory):
    # A random tiny model stands in for a trained checkpoint (load_for_inference is what --checkpoint calls).
    model = SynerMedGen(tiny_config, rngs=nnx.Rngs(params=0))
    inference = loading.Inference(model=model, tokenizer=load_tokenizer(data / "tokenizer.json"),
                                  image_size=(32, 32), vit_image_size=(28, 28))
    mp = pytest.MonkeyPatch()
    mp.setattr(loading, "load_for_inference", lambda path, tokenizer=None, mesh=None: inference)
    out = tmp_path_factory.mktemp("report")
    try:
        code = cli(["eval", "--checkpoint", "ckpt", "--data", str(data), "--split", "val", "--tasks", *TASKS,
                    "--steps", "3", "--max-slices", "3", "--max-instances", "2", "--batch-size", "3", "--out",
                    str(out), "--no-progress"])
    finally:
        mp.undo()
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_identity_row_matches_independent_metrics(report, data):
    _, results = report
    reader = RecordReader(data, "val")
    for name in TASKS:
        src, tgt = name.rsplit("/", 1)[1].split("->")
        row = results["synthesis"][name]
        assert row["slices"] == 3
        records = [reader[i] for i in row["records"]]
        ssims, maes = [], []
        for r in records:
            s, t = (np.asarray(r["images"][m], np.float64) for m in (src, tgt))
            ssims.append(100 * structural_similarity(s, t, gaussian_weights=True, sigma=1.5,
                                                     use_sample_covariance=False, data_range=2.0))
            lo, hi = r["norm"][tgt]["lo"], r["norm"][tgt]["hi"]
            error = np.abs(s - t) * (hi - lo) / 2  # |native(s) - native(t)| for the linear window map
            maes.append(error[np.asarray(r["mask"], bool)].mean())
        assert abs(row["identity"]["ssim"] - np.mean(ssims)) < 1e-2
        assert abs(row["identity"]["mae"] - np.mean(maes)) < 1e-3 * max(1.0, np.mean(maes))
        assert np.isfinite(row["model"]["ssim"]) and np.isfinite(row["model"]["mae"])
        assert row["model"]["ssim"] != row["identity"]["ssim"]


def test_report_files_groups_absent_and_understanding(report):
    out, results = report
    assert set(results["synthesis"]) == set(TASKS)
    assert results["absent"] == []  # --tasks restricts the list to the requested routes, both present
    ssim = [results["synthesis"][t]["model"]["ssim"] for t in TASKS]
    assert abs(results["groups"]["model"]["ssim"]["brats"] - np.mean(ssim)) < 1e-9
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["task"], r["method"]) for r in rows] == [(t, m) for t in TASKS for m in ("model", "identity")]
    md = (out / "results.md").read_text()
    assert "| mni152-sim/brain/t1->t2 | brats | 3 |" in md and "Group averages" in md
    for task in ("cts", "mi", "tia"):
        u = results["understanding"][task]
        assert u["n"] == 2 and 0 <= u["unparseable"] <= 2 and 0.0 <= u["accuracy"] <= 1.0
    grids = sorted(p.name for p in (out / "grids").iterdir())
    assert grids == ["mni152-sim_brain_t1-to-t2.png", "mni152-sim_brain_t2-to-t1.png"]
    from PIL import Image

    assert Image.open(out / "grids" / grids[0]).size == (4 * 32, 3 * 32)
    assert any(p.name.startswith("events") for p in (out / "tb").iterdir())


def test_all_routes_listed_and_errors(data, tmp_path, capsys, tiny_config):
    reader = RecordReader(data, "val")
    from synermedgen_jax.evaluation.evaluate import present_tasks

    present, absent = present_tasks(reader, ())
    assert len(present) == 18 and absent == []  # mni152-sim simulates every modality of its 18 routes
    present, absent = present_tasks(reader, ("brats",))
    assert present == {} and len(absent) == 12
    for args, message in [(["--data", str(tmp_path)], "not a built data folder"),
                          (["--data", str(data), "--tasks", "nope/x"], "unknown task or dataset"),
                          (["--data", str(data)], "checkpoint not found")]:
        code = cli(["eval", "--checkpoint", str(tmp_path / "none"), *args])
        err = capsys.readouterr().err.strip().splitlines()
        if message == "unknown task or dataset":
            assert code == 2 and "checkpoint not found" in err[0]  # the checkpoint is checked first
            continue
        assert code == 2 and len(err) == 1 and message in err[0], err
