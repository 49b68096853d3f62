"""A small tokenizer in Qwen2's format, made with the ``tokenizers`` package (no download), for the weights tests.

Qwen2's layout: a byte-level BPE whose pre-tokenizer splits with Qwen2's regex, then its special tokens appended
after the merged vocabulary (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, and in Qwen2.5 the vision
tokens among others). Written both as ``tokenizer.json`` and as the slow format (``vocab.json`` + ``merges.txt`` +
``tokenizer_config.json`` with ``added_tokens_decoder``), as a Hugging Face download holds them.
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen2's pre-tokenizer pattern (contractions, letters, single digits, punctuation runs, newlines, spaces).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN25_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                   "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                   "<|vision_end|>")
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # no vision tokens: BAGEL adds them


def make_qwen2_tokenizer(folder: Path, total: int, *, specials: tuple[str, ...] = QWEN25_SPECIALS,
                         files: str = "both", texts: list[str] | None = None) -> dict[str, int]:
    """Writes a Qwen2-format tokenizer of at most ``total`` tokens (specials included) into ``folder``;
    ``files``: "json" (tokenizer.json), "slow" (vocab.json + merges.txt + tokenizer_config.json) or "both".
    Returns ``{special token: id}``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from synermedgen_jax.data.prompts import corpus

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=total - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    ids = {t: tok.token_to_id(t) for t in specials}
    if files in ("json", "both"):
        tok.save(str(folder / "tokenizer.json"))
    if files in ("slow", "both"):
        tok.model.save(str(folder))  # vocab.json + merges.txt
        decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True} for t, i in ids.items()}
        config = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": decoder, "bos_token": None,
                  "eos_token": "<|im_end|>" if "<|im_end|>" in ids else "<|endoftext|>",
                  "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
                  "additional_special_tokens": [t for t in specials if t != "<|endoftext|>"],
                  "model_max_length": 32768, "clean_up_tokenization_spaces": False}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ids
