"""The published SynerMed release as a data source: build, samples, resume, shares, training, metadata I/O.

A small release in the exact layout (pyarrow Parquet with several row groups, PNG slices from the embedded
simulation, a JSONL of multi-image multi-turn conversations, and one of each bad row) is written once per
module by data/synermed_sim.py.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synermedgen_jax.data import synermed
from synermedgen_jax.data.synermed_build import SynerMedBuildConfig, build_release

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from synermedgen_jax.data.synermed_sim import write_release

    root = tmp_path_factory.mktemp("release") / "SynerMed"
    expected = write_release(root, slices_per_subject=6, row_group_size=3)
    return root, expected


def _build(root, out, **kw):
    kw.setdefault("jsonl_chunk_mb", 2e-3)  # ~2 KB JSONL units: several conversation units
    return build_release(SynerMedBuildConfig(root=str(root), out=str(out), progress=False, **kw))


@pytest.fixture(scope="module")
def built(release, tmp_path_factory):
    root, _ = release
    out = tmp_path_factory.mktemp("built") / "synermed"
    result = _build(root, out)
    assert result.finished
    return out, result


def _records(out, kind):
    from synermedgen_jax.data.records import RecordReader

    reader = RecordReader(out, kind)
    return [reader[i] for i in range(len(reader))]


def _shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((Path(out) / "records").glob("*.array_record"))}


# ------------------------------------------------------------------------------------------------ routes


def test_routes_are_recovered_from_instructions_and_paths():
    cases = {
        "Convert the T1-weighted MRI image to T2-weighted MRI": ("t1", "t2"),
        "Synthesize a FLAIR MRI image from this T2-weighted MRI image": ("t2", "flair"),
        "Generate the CT image of the same anatomy shown in this CBCT image.": ("cbct", "ct"),
        "Translate contrast-enhanced T1 MRI into T2-weighted MRI": ("t1ce", "t2"),
        "Translate this T1CE (MRI) image into a T2-FLAIR image.": ("t1ce", "flair"),
        "cone-beam CT to CT": ("cbct", "ct"),
        "Predict FDG-PET from CT": ("ct", "pet"),
        "Make it sharper": None,
    }
    for text, route in cases.items():
        assert synermed.parse_route(text) == route, text
    assert synermed.chain_modalities([["Convert T1 to T2"], ["Convert T2 to FLAIR"]]) == ["t1", "t2", "flair"]
    assert synermed.chain_modalities([["do it"], ["Convert T2 to FLAIR"]]) == [None, "t2", "flair"]
    assert synermed.modality_from_path("pet_FDG/case_001.png") == "pet"
    assert synermed.modality_from_path("slice/t1ce/x.png") == "t1ce"
    assert synermed.modality_from_path("ct_FDG/a/b.png") == "ct"


# ------------------------------------------------------------------------------------------------- build


def test_every_good_row_is_kept_and_bad_rows_say_why(release, built):
    import pyarrow.parquet as pq

    root, expected = release
    out, result = built
    assert pq.ParquetFile(root / synermed.PARQUET_NAME).metadata.num_row_groups >= 3
    table = pq.read_table(root / synermed.PARQUET_NAME).to_pylist()
    edits = _records(out, "edit")
    assert [r["row"] for r in edits] == sorted(expected["edit_rows"])
    for record in edits:
        row = table[record["row"]]
        assert record["images"] == row["image_list"]  # the original PNG bytes, in order
        assert record["instructions"] == row["instruction_list"]
        assert record["modalities"] == expected["edit_rows"][record["row"]]
    convs = _records(out, "conv")
    lines = (root / synermed.JSONL_NAME).read_text().splitlines()
    assert {r["line"]: len(r["images"]) for r in convs} == expected["conv_lines"]
    for record in convs:
        obj = json.loads(lines[record["line"] - 1])
        images = obj["image"] if isinstance(obj["image"], list) else [obj["image"]]
        assert record["images"] == images and record["turns"] == obj["conversations"]
        assert record["modalities"] == [synermed.modality_from_path(p) for p in images]
    counts = result.manifest["counts"]
    assert counts["edit_steps_by_route"] == expected["edit_steps_by_route"]
    assert counts["records"] == {"edit": len(expected["edit_rows"]), "conv": len(expected["conv_lines"])}
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    rows = {s["row"]: s["reason"] for s in skipped if "row" in s}
    lines_bad = {s["line"]: s["reason"] for s in skipped if "line" in s}
    assert rows.keys() == expected["bad_rows"].keys() and lines_bad.keys() == expected["bad_lines"].keys()
    for row, reason in expected["bad_rows"].items():
        assert rows[row].startswith(reason), (row, rows[row])
    for line, reason in expected["bad_lines"].items():
        assert lines_bad[line].startswith(reason), (line, lines_bad[line])
    assert (out / "slice").resolve() == (root / "slice").resolve()
    from data_helpers import verify_shards

    assert verify_shards(out) == []


def test_resume_after_a_kill_mid_build(release, built, tmp_path):
    root, _ = release
    reference, _ = built
    out = tmp_path / "killed"
    # A real SIGKILL while the third unit's shard is being written (two units finished before it).
    script = f"""
import os, signal
from synermedgen_jax.data import synermed_build as b
done = []
original = b._UnitWriter.write
def write(self, record):
    if len(done) >= 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, record)
b._UnitWriter.write = write
run = b.run_unit
def counted(*a, **k):
    s = run(*a, **k)
    done.append(s["id"])
    return s
b.run_unit = counted
b.build_release(b.SynerMedBuildConfig(root={str(root)!r}, out={str(out)!r}, progress=False, jsonl_chunk_mb=2e-3))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(list((out / "parts").glob("*.json"))) == 2 and not (out / "manifest.json").exists()
    assert list((out / "records").glob(".*.tmp"))  # the killed unit's partial shard
    result = _build(root, out)
    assert result.finished and result.units_resumed == 2
    assert not list((out / "records").glob(".*.tmp"))
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert (out / "skipped.jsonl").read_text() == (reference / "skipped.jsonl").read_text()
    ref = json.loads((reference / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    assert got["counts"] == ref["counts"] and got["shards"] == ref["shards"]
    assert (out / "tokenizer.json").read_text() == (reference / "tokenizer.json").read_text()


def test_two_processes_build_and_read_disjoint_shares(release, built, tmp_path):
    from synermedgen_jax.data.pipeline import PipelineConfig
    from synermedgen_jax.data.synermed_build import make_plan

    root, expected = release
    reference, _ = built
    out = tmp_path / "shared"
    units = [u["id"] for u in make_plan(root, SynerMedBuildConfig(root=str(root), out=str(out),
                                                                  jsonl_chunk_mb=2e-3))["units"]]
    first = _build(root, out, process_index=1, process_count=2)
    assert not first.finished
    share1 = {p.stem for p in (out / "parts").glob("*.json")}
    assert share1 == set(units[1::2])
    second = _build(root, out, process_index=0, process_count=2, workers=2)  # the last one writes the manifest
    assert second.finished and second.units_resumed == 0
    assert {p.stem for p in (out / "parts").glob("*.json")} - share1 == set(units[0::2])
    assert _shard_bytes(out) == _shard_bytes(reference)

    # Training-time shares: process p of 2 reads records p::2 of each kind; together: everything, once.
    from synermedgen_jax.config import load_config
    from synermedgen_jax.data.packing import PackBudget

    model = load_config("configs/models.py:tiny")
    for stage, kind, count in (("stage2", "edit", len(expected["edit_rows"])),
                               ("stage1", "conv", len(expected["conv_lines"]))):
        budget = PackBudget.from_config(load_config(f"configs/{'stage2_ucg' if stage == 'stage2' else 'stage1_gau'}"
                                                    ".py:synermed_tiny").data.pack)
        tags = []
        for p in range(2):
            config = PipelineConfig(stage=stage, shuffle=False, repeat=False, process_index=p, process_count=2,
                                    source="synermed")
            tags.append([tag for _, tag in synermed.sample_dataset(out, budget, config, geometry=model)])
        assert not set(tags[0]) & set(tags[1])
        assert sorted(tags[0] + tags[1]) == sorted(f"{kind}#{i}" for i in range(count))


# ----------------------------------------------------------------------------------------------- samples


def _png_pixels(blob: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), np.float32)[..., 0] / 127.5 - 1.0


def test_edit_plans_follow_the_official_hop_rule():
    steps = [["a0", "a1"], ["b0"], ["c0"]]  # 4 images
    seen = set()
    for seed in range(400):
        plan = synermed.edit_plan(4, steps, np.random.default_rng(seed))
        kinds = [p[0] for p in plan]
        start = plan[0][1]
        assert kinds[0] == "cond" and kinds[-1] == "target"
        end = plan[-1][1]
        assert 1 <= end - start <= 2
        texts = [p[1] for p in plan if p[0] == "text"]
        if "mid" in kinds:  # interleaved 2-step hop: text, intermediate (loss + conditioning), text, target
            assert kinds == ["cond", "text", "mid", "text", "target"] and plan[2][1] == start + 1
            seen.add("interleaved")
        elif len(texts) == 1 and texts[0].count(".") == 2:  # concatenated 2-step hop: "A. B.", no intermediate
            assert kinds == ["cond", "text", "target"] and end == start + 2 and end != 3
            first, second = texts[0][:-1].split(". ")
            assert first in steps[start] and second in steps[start + 1]
            seen.add("concatenated")
        else:
            assert kinds == ["cond", "text", "target"] and end == start + 1
            if texts[0].endswith("."):  # a concatenation that ended on the last image, shortened by one step
                assert end == 2 and texts[0][:-1] in steps[1]
                seen.add("shortened")
            else:
                assert texts[0] in steps[end - 1]
                seen.add("one step")
    assert seen == {"interleaved", "concatenated", "one step", "shortened"}
    # Without the official shortening, a concatenation may end on the last image.
    ends = {synermed.edit_plan(3, steps[:2], np.random.default_rng(s), synermed.SynerMedConfig(
        shorten_concat_at_end=False))[-1][1] for s in range(100)}
    assert ends == {1, 2}


def test_samples_carry_the_right_images_order_and_loss(built):
    from synermedgen_jax.config import load_config
    from synermedgen_jax.data.packing import PackBudget, Text, VaeImage, VitImage
    from synermedgen_jax.data.pipeline import PipelineConfig
    from synermedgen_jax.data.tokenizer import load_tokenizer
    from synermedgen_jax.data.volumes import resize_image

    out, _ = built
    tok = load_tokenizer(out / "tokenizer.json")
    config = load_config("configs/stage2_ucg.py:synermed_tiny")
    budget = PackBudget.from_config(config.data.pack)
    maker = synermed.SampleMaker(str(out), budget, PipelineConfig(cfg_text=0, cfg_vit=0, cfg_vae=0), config.model)
    size, vit = tuple(budget.image_size), tuple(budget.vit_image_size)
    edits = _records(out, "edit")
    for index, record in enumerate(edits):
        for seed in range(6):
            items, tag = maker(("edit", index), np.random.default_rng(seed))
            plan = synermed.edit_plan(len(record["images"]), record["instructions"], np.random.default_rng(seed))
            assert tag == f"edit#{index}"
            k = 0
            for what, value in plan:
                pixels = None if what == "text" else _png_pixels(record["images"][value])
                if what == "cond":
                    a, b = items[k:k + 2]
                    assert isinstance(a, VaeImage) and a.cfg and not a.noised and isinstance(b, VitImage)
                    np.testing.assert_allclose(a.pixels, resize_image(pixels, size), atol=1e-6)
                    np.testing.assert_allclose(b.pixels, resize_image(pixels, vit), atol=1e-6)
                    k += 2
                elif what == "text":
                    assert isinstance(items[k], Text) and not items[k].loss and items[k].cfg
                    assert list(items[k].token_ids) == tok.encode(value)
                    k += 1
                elif what == "mid":
                    a, b, c = items[k:k + 3]
                    assert a.noised and not b.noised and b.cfg and isinstance(c, VitImage)
                    np.testing.assert_allclose(a.pixels, resize_image(pixels, size), atol=1e-6)
                    k += 3
                else:
                    assert isinstance(items[k], VaeImage) and items[k].noised and not items[k].cfg
                    np.testing.assert_allclose(items[k].pixels, resize_image(pixels, size), atol=1e-6)
                    k += 1
            assert k == len(items)
    convs = _records(out, "conv")
    s1 = load_config("configs/stage1_gau.py:synermed_tiny")
    maker = synermed.SampleMaker(str(out), PackBudget.from_config(s1.data.pack), PipelineConfig(), s1.model)
    for index, record in enumerate(convs):
        items, _ = maker(("conv", index), np.random.default_rng(0))
        images = [x for x in items if isinstance(x, VitImage)]
        assert len(images) == len(record["images"])
        for image, path in zip(images, record["images"]):
            expected = resize_image(_png_pixels((out / "slice" / path).read_bytes()), vit)
            np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
        texts = [x for x in items if isinstance(x, Text)]
        gpt = [t["value"] for t in record["turns"] if t["from"] == "gpt"]
        assert [tok.decode(t.token_ids) for t in texts if t.loss] == gpt
        human = [p.strip() for t in record["turns"] if t["from"] == "human"
                 for p in t["value"].split("<image>") if p.strip()]
        assert [tok.decode(t.token_ids) for t in texts if not t.loss] == human
        # Order: the first item of the first human turn; images where the markers were.
        first = record["turns"][0]["value"]
        assert isinstance(items[0], VitImage if first.lstrip().startswith("<image>") else Text)


# ------------------------------------------------------------------------------------ training, inference


@pytest.fixture(scope="module")
def trained(built, tmp_path_factory):
    from synermedgen_jax.config import apply_overrides, load_config
    from synermedgen_jax.training.loop import train

    out, _ = built
    runs = tmp_path_factory.mktemp("runs")
    common = {"data.dir": str(out), "train.progress": False, "train.steps": 3, "train.rows": 2,
              "train.checkpoint_every": 3, "train.log_every": 1, "train.async_checkpoint": False}
    s1 = runs / "s1"
    config = apply_overrides(load_config("configs/stage1_gau.py:synermed_tiny"),
                             [f"--config.{k}={v}" for k, v in common.items()])
    assert train(config, s1) == 0
    s2 = runs / "s2"
    config = apply_overrides(load_config("configs/stage2_ucg.py:synermed_tiny"),
                             [f"--config.{k}={v}" for k, v in {**common, "init_from": str(s1)}.items()])
    assert train(config, s2) == 0
    return s1, s2


def test_stage1_and_stage2_train_from_the_release(trained):
    from train_helpers import read_metrics

    s1, s2 = trained
    for workdir, key in ((s1, "ce"), (s2, "mse")):
        curve = read_metrics(workdir)
        assert sorted(curve)[-1] == 3 or len(curve) == 3, curve
        assert all(np.isfinite(record[key]) and record[key] > 0 for record in curve.values()), curve


def test_synthesize_metadata_writes_one_png_per_key_and_skips_existing(release, trained, tmp_path):
    from PIL import Image

    from synermedgen_jax.__main__ import build_parser
    from synermedgen_jax.__main__ import main as cli

    root, _ = release
    _, s2 = trained
    args = build_parser().parse_args(["synthesize", "--checkpoint", "x", "--metadata", "m.json", "--image-root", "r",
                                      "--output-dir", "o"])
    assert (args.steps, args.shift, args.cfg_text, args.cfg_img) == (50, 3.0, 4.0, 1.5)  # the official defaults
    slices = sorted((root / "slice").rglob("*.png"))
    t1 = [p for p in slices if p.parent.name == "t1"][:3]
    metadata = {f"case{i}_t1_t2": {"id": str(p.relative_to(root / "slice")),
                                   "prompt": "Convert the T1-weighted MRI image to T2-weighted MRI"}
                for i, p in enumerate(t1)}
    metadata["ct_pet/case0"] = {"id": "ct/sim0000.png", "prompt": "Predict FDG-PET from CT"}
    meta_path = tmp_path / "metadata.json"
    meta_path.write_text(json.dumps(metadata))
    preds = tmp_path / "preds"
    argv = ["synthesize", "--checkpoint", str(s2), "--metadata", str(meta_path), "--image-root", str(root / "slice"),
            "--output-dir", str(preds), "--steps", "3", "--batch-size", "2", "--no-progress"]
    assert cli(argv) == 0
    written = {str(p.relative_to(preds))[:-4] for p in preds.rglob("*.png")}
    assert written == set(metadata)
    for key, entry in metadata.items():
        with Image.open(preds / f"{key}.png") as out_image, Image.open(root / "slice" / entry["id"]) as source:
            assert out_image.size == source.size
    first = (preds / "case0_t1_t2.png").read_bytes()
    (preds / "case1_t1_t2.png").unlink()
    (preds / "case2_t1_t2.png").write_bytes(b"kept")  # an existing output is never recomputed
    assert cli(argv) == 0
    assert (preds / "case1_t1_t2.png").read_bytes() and (preds / "case2_t1_t2.png").read_bytes() == b"kept"
    assert (preds / "case0_t1_t2.png").read_bytes() == first

    # Scores per route from PNG pairs: the predictions against themselves, then against the T2 targets.
    (preds / "case2_t1_t2.png").write_bytes(first)
    targets = tmp_path / "targets"
    for key, entry in metadata.items():
        target = root / "slice" / entry["id"].replace("t1/", "t2/").replace("ct/", "pet_FDG/")
        (targets / key).parent.mkdir(parents=True, exist_ok=True)
        (targets / f"{key}.png").write_bytes(target.read_bytes())
    assert cli(["eval", "--metadata", str(meta_path), "--predictions", str(preds), "--targets", str(preds),
                "--out", str(tmp_path / "self")]) == 0
    report = json.loads((tmp_path / "self" / "scores.json").read_text())
    assert report["routes"]["t1->t2"]["n"] == 3 and report["routes"]["ct->pet"]["n"] == 1
    assert all(r["ssim"] == pytest.approx(100.0) and r["mae"] == 0 for r in report["keys"])
    assert cli(["eval", "--metadata", str(meta_path), "--predictions", str(preds), "--targets", str(targets),
                "--out", str(tmp_path / "real")]) == 0
    report = json.loads((tmp_path / "real" / "scores.json").read_text())
    assert set(report["routes"]) == {"t1->t2", "ct->pet"} and not report["missing"]
    assert all(r["ssim"] < 100 and r["mae"] > 0 for r in report["keys"])
