"""The weights' tokenizer: Qwen2-format files read with BAGEL's tokens added as BAGEL adds them, and a build or
tokenizer whose ids do not fit the weights refused in one line by train, synthesize and ask."""

from __future__ import annotations

import json

import pytest
import torch
import train_helpers as h
from port_fixtures import make_bagel_folder, port_test_config
from qwen_tokenizer import QWEN2_SPECIALS, QWEN25_SPECIALS, make_qwen2_tokenizer

BAGEL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


def _bagel_ids_with_transformers(folder) -> dict[str, int]:
    """The reference: transformers' Qwen2 tokenizer and BAGEL's ``add_special_tokens`` rule (data/data_utils.py):
    each BAGEL token not among the special-tokens map is passed to ``add_tokens``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    known = []
    for value in tokenizer.special_tokens_map.values():
        known += [value] if isinstance(value, str) else list(value)
    tokenizer.add_tokens([t for t in BAGEL_TOKENS if t not in known])
    return {t: tokenizer.convert_tokens_to_ids(t) for t in BAGEL_TOKENS}


@pytest.mark.parametrize("specials", [QWEN25_SPECIALS, QWEN2_SPECIALS], ids=["qwen2.5", "no-vision-tokens"])
@pytest.mark.parametrize("files", ["json", "slow"])
def test_qwen2_format_gets_bagel_tokens_as_bagel_adds_them(tmp_path, specials, files):
    from synermedgen_jax.data.tokenizer import load_tokenizer

    make_qwen2_tokenizer(tmp_path / "both", 300, specials=specials)
    make_qwen2_tokenizer(tmp_path / "tok", 300, specials=specials, files=files)
    ours = load_tokenizer(tmp_path / "tok")
    expected = _bagel_ids_with_transformers(tmp_path / "both")
    got = dict(zip(BAGEL_TOKENS, (ours.bos_id, ours.eos_id, ours.vision_start_id, ours.vision_end_id), strict=True))
    assert got == expected
    assert ours.vocab_size == 300 + (2 if specials == QWEN2_SPECIALS else 0)
    text = "Synthesize the T2-weighted MRI of this T1 slice; answer A, B, C or D."
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(tmp_path / "both"), local_files_only=True)
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text


def test_unreadable_tokenizer_folder_is_one_line(tmp_path):
    from synermedgen_jax.data.tokenizer import load_tokenizer

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, nor vocab.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path / "bad")


def test_mismatch_rule():
    from synermedgen_jax.data.tokenizer import tokenizer_mismatch

    weights = {"vocab_size": 400, "special_ids": {"bos": 390, "eos": 391, "vision_start": 398, "vision_end": 399},
               "fingerprint": "a", "source": "BAGEL"}
    assert tokenizer_mismatch(weights, weights, 512) is None
    assert "embedding has 300 rows" in tokenizer_mismatch(weights, None, 300)
    embedded = {"vocab_size": 512, "special_ids": {"bos": 0, "eos": 1, "vision_start": 2, "vision_end": 3},
                "fingerprint": "b"}
    assert "bos is id 0 here but 390" in tokenizer_mismatch(embedded, weights, 512)
    same_specials = dict(weights, fingerprint="c")
    assert "other token ids" in tokenizer_mismatch(same_specials, weights, 512)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_config):
    """A tiny BAGEL folder with a Qwen2-format tokenizer, its import, and a build made with the embedded BPE."""
    from synermedgen_jax.__main__ import main as cli

    root = tmp_path_factory.mktemp("weights")
    config = port_test_config(tiny_config)
    make_bagel_folder(root / "bagel", config, seed=5, dtype=torch.bfloat16)
    make_qwen2_tokenizer(root / "bagel", int(config.llm.vocab_size))
    assert cli(["import", "--bagel", str(root / "bagel"), "--out", str(root / "ck")]) == 0
    return root, h.build_data(root / "embedded")


def test_import_records_the_weights_tokenizer(weights):
    root, _ = weights
    info = json.loads((root / "ck" / "port.json").read_text())["tokenizer"]
    assert info["special_ids"]["bos"] == 502 and info["vocab_size"] == 512 and len(info["fingerprint"]) == 64


def test_train_refuses_a_build_of_another_tokenizer(weights, tmp_path, capsys):
    from synermedgen_jax.__main__ import main as cli

    root, embedded = weights
    code = cli(["train", "--config", "configs/stage1_gau.py:tiny", "--workdir", str(tmp_path / "run"),
                f"--config.data.dir={embedded}", f"--config.init_from={root / 'ck'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "not the tokenizer the weights were trained with" in err[0] and "bos is id 0 here but 502" in err[0]
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("checkpoint", ["ck", "bagel"])
def test_inference_refuses_another_tokenizer(weights, checkpoint, tmp_path, capsys):
    from synermedgen_jax.__main__ import main as cli

    root, embedded = weights
    png = tmp_path / "s.png"
    from PIL import Image

    Image.new("L", (20, 24), 128).save(png)
    code = cli(["ask", "--checkpoint", str(root / checkpoint), "--image", str(png), "--prompt", "Which modality?",
                "--tokenizer", str(embedded / "tokenizer.json")])
    err = capsys.readouterr().err.strip().splitlines()
    # The import recorded its tokenizer; a PyTorch folder given directly brings its own: both refuse another.
    assert code == 2 and len(err) == 1 and "not the tokenizer the weights were trained with" in err[0], err
