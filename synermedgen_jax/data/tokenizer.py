"""Tokenizers: the embedded byte-level BPE trained on our own prompts, and the Qwen2.5 tokenizer of a real
checkpoint read from a local folder. Both are wrapped by ``Tokenizer`` with BAGEL's special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

SPECIAL_TOKENS = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "pad": "<|endoftext|>",
}
DEFAULT_VOCAB_SIZE = 512  # the tiny model's vocabulary; `small` has 1024


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids)``, the special ids and ``vocab_size``."""

    def __init__(self, backend, *, source: str = ""):
        self._tok = backend
        self.source = source
        ids = {}
        for role, token in SPECIAL_TOKENS.items():
            tid = backend.token_to_id(token)
            if tid is None:
                raise ValueError(f"{source or 'tokenizer'}: special token {token!r} ({role}) is missing")
            ids[role] = int(tid)
        self.bos_id = ids["bos"]
        self.eos_id = ids["eos"]
        self.vision_start_id = ids["vision_start"]
        self.vision_end_id = ids["vision_end"]
        self.pad_id = ids["pad"]

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def special_ids(self) -> dict[str, int]:
        return {"bos": self.bos_id, "eos": self.eos_id, "vision_start": self.vision_start_id,
                "vision_end": self.vision_end_id, "pad": self.pad_id}

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        from synermedgen_jax.data.records import write_text

        write_text(path, self._tok.to_str())


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE over ``texts`` with the special tokens first (ids 0-4). Deterministic."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = list(SPECIAL_TOKENS.values())
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet + special tokens "
                         f"({256 + len(specials)})")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return Tokenizer(tok, source="embedded BPE")


def build_default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    from synermedgen_jax.data.prompts import corpus

    return train_tokenizer(corpus(), vocab_size)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """From a ``tokenizer.json`` file or a folder holding one (e.g. a Qwen2.5 / BAGEL download).

    Falls back to ``transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)`` for folders
    with only slow-tokenizer files (vocab.json + merges.txt).
    """
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        try:
            return Tokenizer(HFTokenizer.from_file(str(file)), source=str(file))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{file}: not a readable tokenizer.json ({err})") from err
    if path.is_dir():
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise FileNotFoundError(f"{path}: no tokenizer.json and transformers is not installed") from err
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{path}: transformers loaded a slow tokenizer; a fast tokenizer is needed")
        for token in SPECIAL_TOKENS.values():  # Qwen2.5 has them; add if a folder lacks vision tokens
            if backend.token_to_id(token) is None:
                backend.add_special_tokens([token])
        return Tokenizer(backend, source=str(path))
    raise FileNotFoundError(f"{path}: no tokenizer.json here")
