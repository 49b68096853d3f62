"""Tokenizers: the embedded byte-level BPE trained on our own prompts, and the Qwen2.5 tokenizer of a real
checkpoint read from a local folder. Both are wrapped by ``Tokenizer`` with BAGEL's special tokens.

A Qwen2-format tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``) gets
BAGEL's four tokens the way BAGEL's ``add_special_tokens`` adds them: each of ``<|im_start|>``, ``<|im_end|>``,
``<|vision_start|>``, ``<|vision_end|>`` that the vocabulary lacks is appended, in that order, after the existing
ids (Qwen2.5 has all four, so its ids are unchanged: 151644, 151645, 151652, 151653). ``describe()`` is what a build
manifest and an import record, and :func:`tokenizer_mismatch` is the one rule that compares two of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from synermedgen_jax.data.prompts import corpus
from synermedgen_jax.data.records import write_text

SPECIAL_TOKENS = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "pad": "<|endoftext|>",
}
DEFAULT_VOCAB_SIZE = 512  # the tiny model's vocabulary; `small` has 1024
BAGEL_ADDED = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")  # add_special_tokens' order


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids)``, the special ids and ``vocab_size``."""

    def __init__(self, backend, *, source: str = ""):
        self._tok = backend
        self.source = source
        ids = {}
        for role, token in SPECIAL_TOKENS.items():
            tid = backend.token_to_id(token)
            if tid is None and role == "pad":  # only fills masked slots; BAGEL never adds a pad token
                tid = backend.token_to_id(SPECIAL_TOKENS["eos"])
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

    @property
    def fingerprint(self) -> str:
        """sha256 of the whole vocabulary (token → id, added tokens included): equal iff every id means the same."""
        vocab = sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()

    def describe(self) -> dict:
        """What a build manifest and an import record: ``vocab_size``, ``special_ids``, ``fingerprint``, ``source``."""
        return {"vocab_size": self.vocab_size, "special_ids": self.special_ids, "fingerprint": self.fingerprint,
                "source": self.source}

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        write_text(path, self._tok.to_str())


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE over ``texts`` with the special tokens first (ids 0-4). Deterministic."""
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
    return train_tokenizer(corpus(), vocab_size)


def add_bagel_tokens(backend) -> int:
    """Appends the BAGEL tokens the vocabulary lacks, in BAGEL's order; returns how many were added.

    BAGEL calls ``tokenizer.add_tokens`` for each token not among the special tokens, and ``add_tokens`` skips a
    token already in the vocabulary, so "absent from the vocabulary" gives the same ids. They are marked special
    here so that decoding skips them, which changes no id.
    """
    missing = [token for token in BAGEL_ADDED if backend.token_to_id(token) is None]
    if missing:
        backend.add_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
    return len(missing)


def _from_backend(backend, source: str) -> Tokenizer:
    add_bagel_tokens(backend)
    return Tokenizer(backend, source=source)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """From a ``tokenizer.json`` file, or a folder holding one or Qwen2's slow-format files (``vocab.json`` +
    ``merges.txt`` + ``tokenizer_config.json``, read with transformers' Qwen2 tokenizer class), e.g. a BAGEL or
    Qwen2.5 download; BAGEL's tokens are added when missing (module docstring). Raises ``ValueError`` /
    ``FileNotFoundError`` naming the file."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{file}: not a readable tokenizer.json ({err})") from err
        return _from_backend(backend, str(file))
    if path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        try:
            from transformers import Qwen2Tokenizer  # optional heavy dependency: only Qwen2-format folders
        except ImportError as err:
            raise FileNotFoundError(f"{path}: vocab.json + merges.txt need transformers, not installed") from err
        try:
            hf = Qwen2Tokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: vocab.json + merges.txt not readable as a Qwen2 tokenizer ({err})") from err
        backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
        if backend is None:
            raise ValueError(f"{path}: transformers gave no tokenizers backend for this folder")
        return _from_backend(backend, str(path))
    if path.is_dir():
        raise FileNotFoundError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt, in this folder")
    raise FileNotFoundError(f"{path}: no such tokenizer file or folder")


def tokenizer_mismatch(found: dict, expected: dict | None, vocab_rows: int) -> str | None:
    """Why the ids of tokenizer ``found`` (a ``describe()`` dict) cannot drive a model with ``vocab_rows``
    embedding rows trained with ``expected`` (None: unknown), or None when they can."""
    size = int(found.get("vocab_size", 0))
    if size > vocab_rows:
        return (f"the tokenizer has {size} tokens but the model's embedding has {vocab_rows} rows "
                "(a tokenizer of another model)")
    if not expected:
        return None
    if found.get("fingerprint") and expected.get("fingerprint") and found["fingerprint"] != expected["fingerprint"]:
        want, got = expected.get("special_ids", {}), found.get("special_ids", {})
        detail = next((f"{role} is id {got.get(role)} here but {want[role]} in the weights' tokenizer"
                       for role in ("bos", "eos", "vision_start", "vision_end") if got.get(role) != want.get(role)),
                      "the vocabularies differ (same special ids, other token ids)")
        return (f"not the tokenizer the weights were trained with ({expected.get('source') or 'recorded'}): "
                f"{detail}")
    return None
