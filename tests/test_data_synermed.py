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

from synermedgen_jax.data import images as image_io
from synermedgen_jax.data import route_text, synermed
from synermedgen_jax.data.pipeline import sample_dataset
from synermedgen_jax.data.release_samples import ReleaseSamples
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
        assert route_text.parse_route(text) == route, text
    assert route_text.chain_modalities([["Convert T1 to T2"], ["Convert T2 to FLAIR"]]) == ["t1", "t2", "flair"]
    assert route_text.chain_modalities([["do it"], ["Convert T2 to FLAIR"]]) == [None, "t2", "flair"]
    assert route_text.modality_from_path("pet_FDG/case_001.png") == "pet"
    assert route_text.modality_from_path("slice/t1ce/x.png") == "t1ce"
    assert route_text.modality_from_path("ct_FDG/a/b.png") == "ct"


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
        assert record["modalities"] == [route_text.modality_from_path(p) for p in images]
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
    assert list((out / "records").glob(".tmp-*"))  # the killed unit's partial shard (staging.atomic_path's temp name)
    result = _build(root, out)
    assert result.finished and result.units_resumed == 2
    assert not list((out / "records").glob(".tmp-*"))
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
                                                    ".py:tiny,source=synermed").data.pack)
        tags = []
        for p in range(2):
            config = PipelineConfig(stage=stage, shuffle=False, repeat=False, process_index=p, process_count=2,
                                    source="synermed")
            tags.append([tag for _, tag in sample_dataset(out, budget, config, geometry=model)])
        assert not set(tags[0]) & set(tags[1])
        assert sorted(tags[0] + tags[1]) == sorted(f"{kind}#{i}" for i in range(count))


# ----------------------------------------------------------------------------------------------- samples


def _png_pixels(blob: bytes) -> np.ndarray:
    # image_io.open_image: a truncated PNG decodes as in the official loaders (LOAD_TRUNCATED_IMAGES)
    return np.asarray(image_io.open_image(blob).convert("RGB"), np.float32)[..., 0] / 127.5 - 1.0


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
    config = load_config("configs/stage2_ucg.py:tiny,source=synermed")
    budget = PackBudget.from_config(config.data.pack)
    maker = ReleaseSamples(str(out), budget, PipelineConfig(cfg_text=0, cfg_vit=0, cfg_vae=0), config.model)
    size, vit = tuple(budget.image_size), tuple(budget.vit_image_size)
    edits = _records(out, "edit")
    for index, record in enumerate(edits):
        for seed in range(6):
            items, tag = maker(("edit", index), np.random.default_rng(seed))
            plan = synermed.edit_plan(len(record["images"]), record["instructions"], np.random.default_rng(seed),
                                      combined=record.get("combined"))
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
    s1 = load_config("configs/stage1_gau.py:tiny,source=synermed")
    maker = ReleaseSamples(str(out), PackBudget.from_config(s1.data.pack), PipelineConfig(), s1.model)
    for index, record in enumerate(convs):
        items, _ = maker(("conv", index), np.random.default_rng(0))
        images = [x for x in items if isinstance(x, VitImage)]
        assert len(images) == synermed.image_slots(record["turns"], len(record["images"]))
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


# ------------------------------------------------------------ rows the official loaders train leniently


def _which_image(pixels: np.ndarray, blobs: list[bytes]) -> int:
    """Which blob an item's pixels were made from (nearest after resizing each to the item's shape)."""
    from synermedgen_jax.data.volumes import resize_image

    candidates = [image_io.image_array(b) for b in blobs]
    return int(np.argmin([np.abs(resize_image(c, pixels.shape[:2]) - pixels).mean() for c in candidates]))


def _maker(out, stage: str = "stage2"):
    from synermedgen_jax.config import load_config
    from synermedgen_jax.data.packing import PackBudget
    from synermedgen_jax.data.pipeline import PipelineConfig

    config = load_config(f"configs/{'stage2_ucg' if stage == 'stage2' else 'stage1_gau'}.py:tiny,source=synermed")
    return ReleaseSamples(str(out), PackBudget.from_config(config.data.pack),
                          PipelineConfig(cfg_text=0, cfg_vit=0, cfg_vae=0), config.model)


@pytest.mark.parametrize("flag", ["augment_understanding", "redraw_options"])
def test_release_source_refuses_records_only_flags(built, flag):
    from synermedgen_jax.config import load_config
    from synermedgen_jax.data.packing import PackBudget
    from synermedgen_jax.data.pipeline import PipelineConfig

    config = load_config("configs/stage1_gau.py:tiny,source=synermed")
    with pytest.raises(ValueError, match=f"{flag} is for the records build"):
        ReleaseSamples.for_stream(str(built[0]), PackBudget.from_config(config.data.pack),
                                  PipelineConfig(**{flag: True}), config.model)


def test_combined_rows_are_kept_with_the_official_sequence(release, built):
    """SynerMedGen's edit_dataset_new.py parse_row: a combined_instruction value (a string, a list of phrasings or a
    list of such lists: the first one) or one instruction for 3+ images -> images 0..N-2 as conditioning (VAE, ViT),
    one phrasing, image N-1 as the target."""
    from synermedgen_jax.data.packing import Text, VaeImage, VitImage
    from synermedgen_jax.data.tokenizer import load_tokenizer

    assert synermed.combined_phrasings(3, [["a", "b"]]) == ["a", "b"]  # form 1
    assert synermed.combined_phrasings(2, [["a"]]) is None  # one step, two images: the ordinary chain
    assert synermed.combined_phrasings(3, [["a"], ["b"]]) is None
    assert synermed.combined_phrasings(3, [["a"], ["b"]], "c") == ["c"]  # form 2 wins over a chain
    assert synermed.combined_phrasings(2, [["a"]], ["c", "d"]) == ["c", "d"]
    assert synermed.combined_phrasings(3, [["a"], ["b"]], [["c", "d"], ["e"]]) == ["c", "d"]
    assert synermed.combined_phrasings(3, [["a"], ["b"]], []) is None  # an empty value: the row's own steps
    with pytest.raises(synermed.RowError, match="empty instruction list: the combined instruction"):
        synermed.check_edit_row([b"x"] * 3, [["a"], ["b"]], " ")
    for seed in range(20):  # the plan: every image but the last is context, one phrasing, the last the target
        plan = synermed.edit_plan(4, [["unused"]], np.random.default_rng(seed), combined=["p", "q"])
        assert plan[:3] == [("cond", 0), ("cond", 1), ("cond", 2)] and plan[4] == ("target", 3)
        assert plan[3][0] == "text" and plan[3][1] in ("p", "q")

    root, expected = release
    out, result = built
    assert len(expected["combined_rows"]) == 2
    assert result.manifest["counts"]["kept_as_official"][synermed.KEPT_COMBINED] == 2
    records = {r["row"]: (i, r) for i, r in enumerate(_records(out, "edit"))}
    tok = load_tokenizer(out / "tokenizer.json")
    maker = _maker(out)
    drawn = set()
    for row, phrasings in expected["combined_rows"].items():
        index, record = records[row]
        assert record["combined"] == phrasings and record["modalities"] == expected["edit_rows"][row]
        n = len(record["images"])
        for seed in range(4):
            items, _ = maker(("edit", index), np.random.default_rng(seed))
            kinds = [(type(x).__name__, getattr(x, "noised", False), x.cfg) for x in items]
            assert kinds == [("VaeImage", False, True), ("VitImage", False, True)] * (n - 1) + [
                ("Text", False, True), ("VaeImage", True, False)]
            for k in range(n - 1):
                assert _which_image(items[2 * k].pixels, record["images"]) == k
                assert _which_image(items[2 * k + 1].pixels, record["images"]) == k
            assert _which_image(items[-1].pixels, record["images"]) == n - 1
            text = items[-2]
            assert isinstance(text, Text) and not text.loss and tok.decode(text.token_ids) in phrasings
            drawn.add(tok.decode(text.token_ids))
            assert isinstance(items[0], VaeImage) and isinstance(items[1], VitImage)
    assert len(drawn) == 3  # both phrasings of form 1 are drawn, and form 2's one


def test_truncated_png_is_kept_as_pillow_decodes_it_with_load_truncated_images(release, built):
    from PIL import Image, ImageFile

    from synermedgen_jax.data.volumes import DataError

    root, expected = release
    out, result = built
    [row] = expected["truncated_rows"]
    index, record = next((i, r) for i, r in enumerate(_records(out, "edit")) if r["row"] == row)
    blob = record["images"][1]
    with pytest.raises(OSError, match="truncated"):  # Pillow's default: the strict reader drops the row
        Image.open(io.BytesIO(blob)).load()
    image, lenient = image_io.decode_image(blob)
    assert lenient and ImageFile.LOAD_TRUNCATED_IMAGES is False  # the setting did not outlive the decode
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # what the official loaders set for the whole process
    try:
        reference = Image.open(io.BytesIO(blob))
        reference.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    ours = np.asarray(image)
    assert np.array_equal(ours, np.asarray(reference)) and image.mode == reference.mode
    assert (ours[-1] == 0).all() and ours[0].any()  # the part past the data is black; the rest decoded
    expected_pixels = np.asarray(reference.convert("L"), np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(image_io.image_array(blob), expected_pixels)
    assert not image_io.decode_image(record["images"][0])[1]  # a whole PNG decodes strictly
    with pytest.raises(DataError, match="truncated"):  # scoring predictions stays strict
        image_io.grey_array(blob)
    assert result.manifest["counts"]["kept_as_official"][synermed.KEPT_TRUNCATED] == 1
    items, _ = _maker(out)(("edit", index), np.random.default_rng(0))  # trains like any row
    assert items


def _change_format_reference(turns: list[dict], n_images: int) -> list:
    """The official change_format's elements as (kind, text, loss), read off its code independently of
    conversation_plan: per human turn, marker j becomes an image only while j < n_images."""
    out = []
    for turn in turns:
        if turn["from"] == "gpt":
            out.append(("text", turn["value"], True))
        elif "<image>" not in turn["value"]:
            out.append(("text", turn["value"], False))
        else:
            parts = turn["value"].split("<image>")
            for j, part in enumerate(parts):
                if part.strip() != "":
                    out.append(("text", part.strip(), False))
                if j != len(parts) - 1 and j < n_images:
                    out.append(("image",))
    return out


def test_extra_image_markers_are_dropped_as_the_official_loader_reads_them(release, built):
    from synermedgen_jax.data.packing import Text, VitImage
    from synermedgen_jax.data.tokenizer import load_tokenizer

    cases = [
        ([{"from": "human", "value": "<image> Compare <image> with the atlas."}, {"from": "gpt", "value": "T1."}], 1),
        ([{"from": "human", "value": "A<image>B<image><image>C"}, {"from": "gpt", "value": "x <image> y"},
          {"from": "human", "value": "  no marker  "}, {"from": "gpt", "value": "z"}], 2),
        ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "a"},
          {"from": "human", "value": "<image> more"}, {"from": "gpt", "value": "b"}], 3),
        ([{"from": "human", "value": "<image> one"}, {"from": "gpt", "value": "a"}], 2),  # an image left unused
    ]
    for turns, n in cases:
        plan = synermed.conversation_plan(turns, n)
        assert [("image",) if p[0] == "image" else p for p in plan] == _change_format_reference(turns, n)
        images = [p[1] for p in plan if p[0] == "image"]
        assert images == list(range(len(images))) == list(range(synermed.image_slots(turns, n)))
        got_images, got_turns, kept = synermed.check_conversation({"image": [f"t1/{k}.png" for k in range(n)],
                                                                   "conversations": turns}, lambda p: None)
        assert len(got_images) == n and got_turns == turns
    assert synermed.check_conversation({"image": ["a.png"], "conversations": cases[0][0]}, lambda p: None)[2] == [
        synermed.KEPT_EXTRA_MARKERS]
    # Each human turn may take all the images: 2 + 1 > 2 asks for a third image the line lacks (the official
    # loader fails while packing it), so the line is skipped.
    with pytest.raises(synermed.RowError, match="<image> count mismatch: .* place 3 images"):
        synermed.check_conversation({"image": ["a.png", "b.png"], "conversations": cases[2][0]}, lambda p: None)

    root, expected = release
    out, result = built
    kept = result.manifest["counts"]["kept_as_official"]
    assert kept[synermed.KEPT_EXTRA_MARKERS] == 1 and kept[synermed.KEPT_UNUSED_IMAGES] == 1
    tok = load_tokenizer(out / "tokenizer.json")
    maker = _maker(out, "stage1")
    convs = {r["line"]: (i, r) for i, r in enumerate(_records(out, "conv"))}
    for line in expected["lenient_lines"]:
        index, record = convs[line]
        items, _ = maker(("conv", index), np.random.default_rng(0))
        reference = _change_format_reference(record["turns"], len(record["images"]))
        assert len(items) == len(reference)
        for item, ref in zip(items, reference):
            if ref[0] == "image":
                assert isinstance(item, VitImage) and _which_image(item.pixels, [
                    (out / "slice" / p).read_bytes() for p in record["images"]]) == 0
            else:
                assert isinstance(item, Text) and tok.decode(item.token_ids) == ref[1] and item.loss == ref[2]
        assert sum(isinstance(x, VitImage) for x in items) == 1


def test_build_summary_counts_every_remaining_skip_reason(release, built):
    from collections import Counter

    from synermedgen_jax.data.synermed_build import summary_lines

    _, expected = release
    out, result = built
    want = Counter(list(expected["bad_rows"].values()) + list(expected["bad_lines"].values()))
    counts = result.manifest["counts"]
    assert counts["skipped_by_reason"] == dict(want) and counts["skipped_rows"] == sum(want.values())
    assert counts["kept_as_official"] == expected["kept_as_official"]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert all(s["reason"].startswith(s["code"]) for s in skipped)
    printed = summary_lines(result)
    for code, n in want.items():
        assert f"skipped: {n} x {code}" in printed
    for what, n in expected["kept_as_official"].items():
        assert f"kept as the official loaders read them: {n} x {what}" in printed
    # Every reason the validation can give has a fixed code (the row, image, turn or path is in the message).
    png = synermed_sim_png()
    edit_cases = {
        "no images": ([], [["a"]]), "row with one image": ([png], []),
        "empty instruction list": ([png, png], [[" "]]),
        "instruction count mismatch": ([png] * 4, [["a"], ["b"]]),
        "corrupt image blob": ([png, b"\x89PNG\r\n\x1a\n not a picture"], [["a"]]),
    }
    for code, (blobs, steps) in edit_cases.items():
        with pytest.raises(synermed.RowError) as err:
            synermed.check_edit_row(blobs, steps)
        assert err.value.code == code and str(err.value).startswith(code)
    conv_cases = {
        "not a JSON object": [1], "no conversations list": {"conversations": []},
        "bad turn": {"conversations": [{"from": "bot", "value": "x"}]},
        "no gpt turn": {"conversations": [{"from": "human", "value": "x"}]},
        "bad image field": {"image": [3], "conversations": [{"from": "gpt", "value": "x"}]},
        "image path outside slice/": {"image": "../x.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        "<image> count mismatch": {"image": "a.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"},
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "y"}]},
        "missing slice file": {"image": "a.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
    }
    for code, obj in conv_cases.items():
        with pytest.raises(synermed.RowError) as err:
            synermed.check_conversation(obj, lambda p: ("missing slice file", f"slice/{p}"))
        assert err.value.code == code and str(err.value).startswith(code)


def synermed_sim_png() -> bytes:
    from synermedgen_jax.data.synermed_sim import png_bytes

    return png_bytes(np.arange(64, dtype=np.uint8).reshape(8, 8))


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
    config = apply_overrides(load_config("configs/stage1_gau.py:tiny,source=synermed"),
                             [f"--config.{k}={v}" for k, v in common.items()])
    assert train(config, s1) == 0
    s2 = runs / "s2"
    config = apply_overrides(load_config("configs/stage2_ucg.py:tiny,source=synermed"),
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
    # The official defaults: guidance comes from the checkpoint's model family unless a flag sets it.
    from synermedgen_jax.inference.family import DEFAULTS

    assert (args.steps, args.shift, args.cfg_text, args.cfg_img) == (50, 3.0, None, None)
    assert (DEFAULTS["synermedgen"].cfg_text, DEFAULTS["synermedgen"].cfg_img) == (4.0, 1.5)
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
            "--output-dir", str(preds), "--steps", "3", "--batch-size", "2", "--no-progress",
            "--output-style", "ours"]  # grey at the source's size (the default is the official RGB crop)
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
