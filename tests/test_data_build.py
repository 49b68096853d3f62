"""End-to-end builds of small NIfTI folders in the SynthRAD2023, BraTS and autoPET layouts, broken cases
included: skips with reasons, manifest counts and checksums, record contents back in native units, splits."""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict

import nibabel as nib
import numpy as np
import pytest
from data_helpers import verify_shards

from synermedgen_jax.__main__ import main as cli
from synermedgen_jax.data.records import RecordReader, load_index
from synermedgen_jax.data.volumes import denormalise

Z_LO, Z_HI = 4, 15  # the synthetic body occupies axial slices 4..15: 12 valid slices per good case


def _body(shape):
    body = np.zeros(shape, bool)
    x, y = shape[0], shape[1]
    body[x // 5: x - x // 5, y // 5: y - y // 5, Z_LO:Z_HI + 1] = True
    return body


def _volume(modality, shape, rng):
    body = _body(shape)
    if modality in ("ct", "cbct"):
        data = np.where(body, rng.normal(40, 10, shape), -1000.0)
        data[body & (rng.random(shape) < 0.1)] = 1200.0  # some bone
    elif modality == "pet":
        data = np.where(body, rng.gamma(2.0, 2.0, shape), 0.0)
    else:
        data = np.where(body, rng.uniform(100, 900, shape), 0.0)
    return data.astype(np.float32)


def _write(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _case(folder, names_modalities, shape, rng, mask=False):
    for name, modality in names_modalities:
        _write(folder / f"{name}.nii.gz", _volume(modality, shape, rng))
    if mask:
        _write(folder / "mask.nii.gz", _body(shape).astype(np.uint8))


def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("layouts")
    sq = (24, 24, 20)  # square in-plane and slice size 24: records hold voxels exactly (no resize)
    # SynthRAD2023
    s = root / "synthrad"
    for task, anatomy, case in [("Task1", "brain", "1BA001"), ("Task1", "brain", "1BA002"),
                                ("Task1", "pelvis", "1PA001"), ("Task1", "pelvis", "1PA002")]:
        _case(s / task / anatomy / case, [("mr", "mr"), ("ct", "ct")], sq, rng, mask=True)
    _write(s / "Task1/pelvis/1PA002/ct.nii.gz", _volume("ct", (24, 24, 19), rng))  # shape mismatch
    for anatomy, case in [("brain", "2BA001"), ("brain", "2BA002"), ("brain", "2BA003"), ("pelvis", "2PA001"),
                          ("pelvis", "2PA002")]:
        _case(s / "Task2" / anatomy / case, [("cbct", "cbct"), ("ct", "ct")], sq, rng, mask=True)
    nan = _volume("cbct", sq, rng)
    nan[5, 5, 5] = np.inf
    _write(s / "Task2/brain/2BA002/cbct.nii.gz", nan)
    _truncate(s / "Task2/brain/2BA003/ct.nii.gz")
    (s / "Task2/pelvis/2PA002/cbct.nii.gz").unlink()
    # BraTS 2021 + 2023 layouts
    b = root / "brats"
    shape = (24, 28, 20)
    for case in ("BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003"):
        _case(b / case, [(f"{case}_{m}", m) for m in ("t1", "t1ce", "t2", "flair")], shape, rng)
    _write(b / "BraTS2021_00002" / "BraTS2021_00002_dwi.nii.gz", _volume("t1", shape, rng))  # unknown
    for m in ("t1", "t1ce", "t2", "flair"):  # all-zero volumes: empty foreground
        _write(b / "BraTS2021_00003" / f"BraTS2021_00003_{m}.nii.gz", np.zeros(shape, np.float32))
    for case in ("BraTS-GLI-00004-000", "BraTS-GLI-00004-001", "BraTS-GLI-00005-000"):
        _case(b / case, [(f"{case}-{k}", m) for k, m in (("t1n", "t1"), ("t1c", "t1ce"), ("t2w", "t2"),
                                                           ("t2f", "flair"))], shape, rng)
    huge = b / "BraTS-GLI-00005-000" / "BraTS-GLI-00005-000-t2w.nii.gz"
    raw = bytearray(gzip.decompress(huge.read_bytes()))
    raw[42:48] = np.array([30000] * 3, "<i2").tobytes()  # header dim[1..3]: an absurd size
    huge.write_bytes(gzip.compress(bytes(raw)))
    # autoPET
    a = root / "autopet"
    for patient, study in [("PETCT_a", "s1"), ("PETCT_a", "s2"), ("PETCT_b", "s1"), ("PETCT_c", "s1"),
                           ("PETCT_d", "s1")]:
        _case(a / patient / study, [("CTres", "ct"), ("SUV", "pet")], shape, rng)
    _write(a / "PETCT_a/s1/SEG.nii.gz", np.zeros(shape, np.uint8))  # shipped extra file: ignored
    shifted = np.eye(4)
    shifted[:3, 3] = [3.0, 0.0, 0.0]
    _write(a / "PETCT_c/s1/SUV.nii.gz", _volume("pet", shape, rng), shifted)  # misaligned pair
    return root


def _build(source, root, out, *extra):
    return cli(["build-data", "--source", source, "--root", str(root), "--out", str(out), "--no-progress",
                "--seed", "1", *extra])


@pytest.fixture(scope="module")
def built(layouts, tmp_path_factory):
    outs = {}
    for source, sub, extra in [("synthrad2023", "synthrad", ["--slice-size", "24", "--dtype", "float32"]),
                               ("brats", "brats", ["--slice-size", "32"]),
                               ("autopet", "autopet", ["--slice-size", "32", "--split", "0.5", "0.25", "0.25"])]:
        out = tmp_path_factory.mktemp(f"out_{sub}")
        assert _build(source, layouts / sub, out, *extra) == 0
        outs[source] = out
    return outs


def _skipped(out):
    return {json.loads(line)["case"]: json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()}


def test_bad_cases_are_skipped_with_reasons(built):
    expected = {
        "synthrad2023": {"synthrad2023/task1/pelvis/1PA002": r"ct is not aligned with mr \(shape",
                         "synthrad2023/task2/brain/2BA002": r"cbct.nii.gz: 1 of 11520 voxels are NaN or Inf",
                         "synthrad2023/task2/brain/2BA003": r"ct.nii.gz: (truncated|unreadable)",
                         "synthrad2023/task2/pelvis/2PA002": r"missing modality cbct"},
        "brats": {"brats/brain/BraTS2021_00002": r"unknown modality file BraTS2021_00002_dwi.nii.gz",
                  "brats/brain/BraTS2021_00003": r"empty foreground",
                  "brats/brain/BraTS-GLI-00005-000": r"t2w.nii.gz: header claims an absurd size"},
        "autopet": {"autopet/whole-body/PETCT_c/s1": r"SUV.nii.gz: pet is not aligned with ct \(affine"},
    }
    for source, cases in expected.items():
        skipped = _skipped(built[source])
        assert set(skipped) == set(cases), source
        for case, pattern in cases.items():
            assert re.search(pattern, skipped[case]["reason"]), skipped[case]
            assert skipped[case]["file"]


def test_manifest_counts_and_checksums(built):
    good_cases = {"synthrad2023": 5, "brats": 4, "autopet": 4}
    for source, out in built.items():
        manifest = json.loads((out / "manifest.json").read_text())
        assert verify_shards(out) == []
        counts = manifest["counts"]
        assert sum(counts["cases"].values()) == good_cases[source]
        total = sum(counts["records"].values())
        assert total == good_cases[source] * (Z_HI - Z_LO + 1)
        for split, n in counts["records"].items():
            shard_total = sum(s["records"] for s in manifest["shards"][split])
            assert shard_total == n
            if n:
                assert len(RecordReader(out, split)) == n
        assert manifest["code_version"].startswith("0.")
        assert manifest["config"]["seed"] == 1
    routes = json.loads((built["synthrad2023"] / "manifest.json").read_text())["counts"]["pairs_by_route"]
    assert {r for split in routes.values() for r in split} == {"mr->ct", "ct->mr", "cbct->ct", "ct->cbct"}
    brats_routes = json.loads((built["brats"] / "manifest.json").read_text())["counts"]["pairs_by_route"]
    assert len({r for split in brats_routes.values() for r in split}) == 12


def test_records_hold_native_values_and_metadata(built, layouts):
    out = built["synthrad2023"]
    seen = 0
    for split in ("train", "val", "test"):
        index = load_index(out, split)
        if not index["case"]:
            continue
        reader = RecordReader(out, split)
        for i in range(len(reader)):
            record = reader[i]
            case = index["cases"][index["case"][i]]
            assert record["case_id"] == case["case_id"] and record["slice_index"] == index["slice_index"][i]
            assert Z_LO <= record["slice_index"] <= Z_HI and record["depth"] == 20
            if record["case_id"] != "1BA001" or record["slice_index"] != 9:
                continue
            seen += 1
            ct = nib.load(str(layouts / "synthrad/Task1/brain/1BA001/ct.nii.gz")).get_fdata()
            expected = np.clip(ct[:, ::-1, 9].T, -1024, 3071)  # rows anterior first, columns left to right
            np.testing.assert_allclose(denormalise(record["images"]["ct"], record["norm"]["ct"]), expected,
                                       atol=0.05)
            assert record["norm"]["ct"] == {"kind": "hu_window", "lo": -1024.0, "hi": 3071.0}
            mr = nib.load(str(layouts / "synthrad/Task1/brain/1BA001/mr.nii.gz")).get_fdata()
            mask = nib.load(str(layouts / "synthrad/Task1/brain/1BA001/mask.nii.gz")).get_fdata() > 0
            lo, hi = np.percentile(mr[mask], [0.5, 99.5])
            assert record["norm"]["mr"]["lo"] == pytest.approx(lo, rel=1e-5)
            assert record["norm"]["mr"]["hi"] == pytest.approx(hi, rel=1e-5)
            assert record["spacing"] == [1.0, 1.0, 1.0] and record["mask"].dtype == bool
            np.testing.assert_array_equal(record["mask"], mask[:, ::-1, 9].T)
            assert record["routes"] == [["mr", "ct"], ["ct", "mr"]]
    assert seen == 1


def test_no_patient_in_two_splits(built):
    for out in built.values():
        split_of = defaultdict(set)
        for split in ("train", "val", "test"):
            for case in load_index(out, split)["cases"]:
                split_of[case["patient_id"]].add(split)
        assert all(len(s) == 1 for s in split_of.values()), split_of
    brats_patients = {c["patient_id"] for s in ("train", "val", "test") for c in load_index(built["brats"], s)["cases"]}
    assert "BraTS-GLI-00004" in brats_patients  # the 2023 timepoints -000 and -001 are one patient
    autopet_cases = [c for s in ("train", "val", "test") for c in load_index(built["autopet"], s)["cases"]]
    assert sum(c["patient_id"] == "PETCT_a" for c in autopet_cases) == 2


def test_existing_output_needs_overwrite_and_nothing_valid_fails(built, layouts, tmp_path, capsys):
    assert _build("autopet", layouts / "autopet", built["autopet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    broken = tmp_path / "broken"
    (broken / "BraTS2021_00009").mkdir(parents=True)
    (broken / "BraTS2021_00009" / "BraTS2021_00009_t1.nii.gz").write_bytes(b"garbage")
    out = tmp_path / "out"
    assert _build("brats", broken, out) == 2
    assert "no valid record remains" in capsys.readouterr().err
    skipped = (out / "skipped.jsonl").read_text().splitlines()
    assert len(skipped) == 1 and "BraTS2021_00009" in skipped[0]
    assert _build("synthrad2023", tmp_path / "nowhere", tmp_path / "o2") == 2
