"""The official inference convention both ways: ``synthesize --metadata`` writes what the official script writes
(RGB, generated size, ``crop(getbbox())``, contiguous ``--split-count/--split-index`` chunks), and ``eval
--metadata`` aligns such outputs by a stated rule or skips them with a reason — never stretches them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from synermedgen_jax.__main__ import main as cli
from synermedgen_jax.data.geometry import ResizeRule
from synermedgen_jax.data.volumes import resize_image
from synermedgen_jax.evaluation.png_pairs import score_pairs
from synermedgen_jax.inference import metadata as meta
from synermedgen_jax.inference.loading import Inference, InferenceError
from synermedgen_jax.inference.sampler import Sampler, SamplerConfig

# ------------------------------------------------------------------------------------- bounding box and crop


def _bordered(rng, shape, channels):
    """A random uint8 picture whose nonzero pixels lie in a random box (zero borders of random widths)."""
    image = np.zeros((*shape, channels) if channels else shape, np.uint8)
    top, left = rng.integers(0, shape[0] // 2 + 1), rng.integers(0, shape[1] // 2 + 1)
    bottom, right = rng.integers(top + 1, shape[0] + 1), rng.integers(left + 1, shape[1] + 1)
    block = rng.integers(0, 256, (bottom - top, right - left, *image.shape[2:]), dtype=np.uint8)
    block[rng.random(block.shape) < 0.7] = 0  # sparse, so box edges are often set by a single channel of one pixel
    image[top:bottom, left:right] = block
    return image


def test_getbbox_and_official_crop_equal_pil():
    rng = np.random.default_rng(0)
    for trial in range(60):
        shape = tuple(int(v) for v in rng.integers(2, 40, 2))
        image = _bordered(rng, shape, channels=(None, 3)[trial % 2])
        assert meta.getbbox(image) == Image.fromarray(image).getbbox(), (trial, shape)
    for image in (np.zeros((5, 7), np.uint8), np.zeros((5, 7, 3), np.uint8)):
        assert meta.getbbox(image) is None and Image.fromarray(image).getbbox() is None
    # official_pixels == the official script's steps done with PIL: quantise, RGB, crop(getbbox()).
    for _ in range(20):
        generated = rng.uniform(-1.0, 1.0, tuple(int(v) for v in rng.integers(4, 32, 2))).astype(np.float32)
        generated[: rng.integers(0, 3)] = -1.0
        generated[:, generated.shape[1] - rng.integers(0, 3):] = -1.0
        generated[rng.random(generated.shape) < 0.3] = -0.999  # truncates to 0 as the official cast does
        picture = Image.fromarray(np.floor((generated * 0.5 + 0.5) * 255).astype(np.uint8)).convert("RGB")
        expected = np.asarray(picture.crop(picture.getbbox()))
        np.testing.assert_array_equal(meta.official_pixels(generated), expected)
    black = meta.official_pixels(np.full((6, 4), -1.0, np.float32))
    assert black.shape == (6, 4, 3) and not black.any()  # crop(None) keeps the whole picture


# ------------------------------------------------------------------------------------------------- splitting


def _official_split(items, split_count, split_index):
    """The official script's split, transcribed: ceil-sized contiguous chunks over the insertion order."""
    split_size = (len(items) + split_count - 1) // split_count
    split_start = split_index * split_size
    split_end = min(split_start + split_size, len(items))
    return items[split_start:split_end]


def test_split_partitions_keys_as_the_official_script():
    for n in range(0, 14):
        keys = [f"k{(7 * i) % 13:02d}_{i}" for i in range(n)]  # insertion order is not sorted order
        for count in range(1, 7):
            chunks = [meta.split_keys(keys, count, i) for i in range(count)]
            assert chunks == [_official_split(keys, count, i) for i in range(count)]
            assert [k for chunk in chunks for k in chunk] == keys  # union = all, disjoint, in file order
    for count, index in ((0, 0), (-1, 0), (3, 3), (3, -1)):
        with pytest.raises(InferenceError, match="--split-"):
            meta.split_keys(["a"], count, index)


def test_split_then_process_share_covers_every_key_once(monkeypatch):
    import jax

    from synermedgen_jax.commands.synthesize_metadata import share_of_keys

    keys = [f"key{i}" for i in range(11)]
    seen = []
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    for count in (1, 2):
        for process in range(3):
            monkeypatch.setattr(jax, "process_index", lambda p=process: p)
            for index in range(count):
                mine, _ = share_of_keys(keys, count, index)
                assert mine == _official_split(_official_split(keys, count, index), 3, process)
                seen.extend(mine)
    assert sorted(seen) == sorted(keys * 2)
    # Default on P processes: chunk process_index of P.
    monkeypatch.setattr(jax, "process_index", lambda: 2)
    assert share_of_keys(keys, None, None)[0] == _official_split(keys, 3, 2)


def test_bad_split_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps({"a": {"id": "x.png", "prompt": "p"}}))
    base = ["synthesize", "--checkpoint", str(tmp_path / "none"), "--metadata", str(metadata), "--image-root",
            str(tmp_path), "--output-dir", str(tmp_path / "out"), "--no-progress"]
    for extra, message in ((["--split-count", "0"], "--split-count 0: must be at least 1"),
                           (["--split-count", "2", "--split-index", "2"], "--split-index 2: must be in 0..1"),
                           (["--split-index", "1"], "--split-index 1: must be in 0..0")):
        assert cli([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- synthesis: sizes, styles


class _Tokenizer:
    def encode(self, text):
        return [len(text) % 7 + 1]


def _fake_generate(calls):
    def generate(self, sources, instruction_ids, *, seed=0, batch_size=8, indices=None, progress=None):
        calls.append((self.image_size, self.vit_image_size, len(sources)))
        h, w = self.image_size
        out = np.full((len(sources), h, w), -1.0, np.float32)  # black border of 2 rows / 3 columns
        out[:, 2:, 3:] = np.linspace(-0.5, 0.9, (h - 2) * (w - 3)).reshape(h - 2, w - 3)
        return out

    return generate


def test_outputs_official_by_default_one_sampler_per_size_and_ours_on_request(tmp_path, monkeypatch):
    """Sources of 16×16 and 16×24 with a small aspect-preserving rule: two distinct generated sizes, so two
    samplers; official outputs are RGB at the generated size cropped to the bounding box, ``ours`` grey at the
    source's size; existing outputs are skipped."""
    calls = []
    monkeypatch.setattr(Sampler, "__init__", lambda self, model, special, image_size, vit_image_size, config, *,
                        mesh=None, image_first=False: self.__dict__.update(
                            image_size=tuple(image_size), vit_image_size=tuple(vit_image_size), batch_divisor=1))
    monkeypatch.setattr(Sampler, "generate", _fake_generate(calls))
    monkeypatch.setattr(Inference, "special", property(lambda self: None))
    inference = Inference(model=None, tokenizer=_Tokenizer(), image_size=(32, 32), vit_image_size=(28, 28),
                          vae_rule=ResizeRule(32, 64, 16), vit_rule=ResizeRule(28, 56, 14))
    root = tmp_path / "src"
    root.mkdir()
    sizes = {"sq0": (16, 16), "sq1": (16, 16), "wide": (16, 24)}
    for key, shape in sizes.items():
        Image.fromarray(np.full(shape, 100, np.uint8)).save(root / f"{key}.png")
    metadata = {key: {"id": f"{key}.png", "prompt": "Convert T1 to T2"} for key in sizes}
    config = SamplerConfig(num_steps=2)
    official, ours = tmp_path / "official", tmp_path / "ours"
    (official / "sq1.png").parent.mkdir()
    (official / "sq1.png").write_bytes(b"kept")
    result = meta.synthesize_metadata(inference, metadata, root, official, sampler_config=config)
    assert result == {"written": ["sq0", "wide"], "existing": ["sq1"], "failed": []}
    assert sorted(calls) == [((32, 32), (28, 28), 1), ((32, 48), (28, 42), 1)]
    for key, generated in (("sq0", (32, 32)), ("wide", (32, 48))):
        with Image.open(official / f"{key}.png") as image:
            assert image.mode == "RGB" and image.size == (generated[1] - 3, generated[0] - 2)
    assert (official / "sq1.png").read_bytes() == b"kept"
    calls.clear()
    result = meta.synthesize_metadata(inference, metadata, root, ours, sampler_config=config, output_style="ours",
                                      keys=meta.split_keys(list(metadata), 2, 0))
    assert result["written"] == ["sq0", "sq1"] and len(calls) == 1  # one group: same prompt, same source size
    with Image.open(ours / "sq0.png") as image:
        assert image.mode == "L" and image.size == (16, 16)
    with pytest.raises(InferenceError, match="--output-style"):
        meta.synthesize_metadata(inference, metadata, root, ours, sampler_config=config, output_style="theirs")


# ------------------------------------------------------------------------------------------ eval alignment


def _smooth(rng, shape):
    return resize_image(rng.uniform(0, 1, (shape[0] // 8 + 1, shape[1] // 8 + 1)), shape)


def _write(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)


def test_official_outputs_are_aligned_and_other_shapes_skipped_never_stretched(tmp_path, capsys):
    """A close prediction P at the target's size is written as the official script would write it after
    generating it at the official rule's size (608×512 for 96×80, 6.3×/6.4×) or at 1.5×: cropped to its box, RGB.

    Official size (the generation map fits, so the factor is exact): aligned, it scores as P uncropped and resized
    back within 0.5 SSIM points (the crop costs nothing) and as P scored directly within 3 SSIM points and 1.5
    grey levels of MAE (what the up/down resampling and the official truncating cast cost). At 1.5× the factor
    is fitted from the crop's shape alone, known to the edges' ±1 px: within 7 SSIM points and 2.5 grey levels of
    P scored directly (this 96×80 body has sharp edges; a half-pixel error costs more here than on a 256² slice).
    A prediction of another aspect ratio is skipped with its reason, never stretched."""
    rng = np.random.default_rng(0)
    th, tw = 96, 80
    rows, cols = np.mgrid[:th, :tw]
    body = ((rows - 50) / 34) ** 2 + ((cols - 38) / 25) ** 2 <= 1
    target = np.zeros((th, tw), np.float32)
    target[body] = 60 + 150 * _smooth(rng, (th, tw))[body]
    target = np.round(target)
    pred = np.zeros_like(target)
    pred[body] = np.clip(target[body] + 20 * _smooth(rng, (th, tw))[body] - 10, 1, 255)
    pred = np.round(pred)
    targets, preds = tmp_path / "targets", tmp_path / "preds"
    metadata = {}
    generated_15 = resize_image(pred / 127.5 - 1.0, (144, 120))
    generated_official = resize_image(pred / 127.5 - 1.0, (608, 512))  # INFERENCE_VAE.size_for(96, 80)
    outputs = {
        "direct": pred,
        "crop15": meta.official_pixels(generated_15),
        "full15": meta.official_uint8(generated_15),
        "crop_official": meta.official_pixels(generated_official),
        "full_official": meta.official_uint8(generated_official),
        "skew": resize_image(pred, (96, 120)),  # stretched along one axis only: must not be scored
    }
    for key, pixels in outputs.items():
        _write(targets / f"{key}.png", target)
        _write(preds / f"{key}.png", np.clip(np.round(pixels), 0, 255))
        metadata[key] = {"id": f"t1/{key}.png", "prompt": "Convert the T1-weighted MRI image to T2-weighted MRI"}
    report = score_pairs(metadata, preds, targets=targets)
    rows = {r["key"]: r for r in report["keys"]}
    assert {k: r["alignment"] for k, r in rows.items()} == {
        "direct": "as-is", "crop15": "bbox", "full15": "rescaled", "crop_official": "bbox",
        "full_official": "rescaled"}
    direct, crop, full, crop15 = rows["direct"], rows["crop_official"], rows["full_official"], rows["crop15"]
    assert abs(crop["ssim"] - full["ssim"]) < 0.5 and abs(crop["mae"] - full["mae"]) < 0.2, (crop, full)
    assert abs(crop["ssim"] - direct["ssim"]) < 3.0 and abs(crop["mae"] - direct["mae"]) < 1.5, (crop, direct)
    assert abs(crop15["ssim"] - direct["ssim"]) < 7.0 and abs(crop15["mae"] - direct["mae"]) < 2.5, crop15
    assert abs(rows["full15"]["ssim"] - direct["ssim"]) < 3.0
    assert [s["key"] for s in report["skipped"]] == ["skew"]
    assert "cannot be aligned" in report["skipped"][0]["reason"] and "96x120" in report["skipped"][0]["reason"]
    assert report["counts"] == {"scored": 5, "as_is": 1, "rescaled": 2, "bbox": 2, "skipped": 1, "missing": 0}

    # The command: skipped keys are counted in the summary, warned about, and recorded in scores.json.
    out = tmp_path / "scores"
    assert cli(["eval", "--metadata", str(_metadata_file(tmp_path, metadata)), "--predictions", str(preds),
                "--targets", str(targets), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "skipped (cannot be aligned) 1" in captured.out and "1 prediction(s) skipped" in captured.err
    written = json.loads((out / "scores.json").read_text())
    assert written["counts"]["skipped"] == 1 and written["skipped"][0]["key"] == "skew"
    assert "skew" not in (out / "scores.csv").read_text()


def _metadata_file(tmp_path, metadata):
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(metadata))
    return path


@pytest.mark.usefixtures("fast_compile")
def test_tiny_model_cli_writes_official_style_by_default(tiny_config, tmp_path, monkeypatch, capsys):
    """The real sampler through ``synthesize --metadata`` (the checkpoint loader stubbed with a tiny model):
    official by default, RGB, at most the generated 16×16 (the 20×20 source's size is not kept); a rerun skips
    it. (``--output-style ours`` is checked above with a stub sampler: one compile here is enough.)"""
    from flax import nnx

    from synermedgen_jax.commands import synthesize_metadata
    from synermedgen_jax.data.tokenizer import build_default_tokenizer
    from synermedgen_jax.modeling.synermedgen import SynerMedGen

    config = tiny_config.copy_and_resolve_references()
    config.vae.sample_posterior = False
    inference = Inference(model=SynerMedGen(config, rngs=nnx.Rngs(params=0)), tokenizer=build_default_tokenizer(),
                          image_size=(16, 16), vit_image_size=(28, 28))
    monkeypatch.setattr(synthesize_metadata, "load_for_inference", lambda path, tokenizer=None: inference)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20), dtype=np.uint8)).save(tmp_path / "s.png")
    path = _metadata_file(tmp_path, {"case": {"id": "s.png", "prompt": "Convert T1 to T2"}})
    argv = ["synthesize", "--checkpoint", "stub", "--metadata", str(path), "--image-root", str(tmp_path),
            "--output-dir", str(tmp_path / "out"), "--steps", "2", "--no-progress"]
    assert cli(argv) == 0
    with Image.open(tmp_path / "out" / "case.png") as image:
        assert image.mode == "RGB" and image.size[0] <= 16 and image.size[1] <= 16
    assert "wrote 1 image(s)" in capsys.readouterr().out
    assert cli(argv) == 0 and "1 existed (skipped)" in capsys.readouterr().out
