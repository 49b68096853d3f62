"""Parsing generated answers of the understanding tasks and scoring their accuracy.

* CTS and TIA answers are one option letter A-D. Accepted forms (case-insensitive, surrounding spaces
  ignored): ``B``, ``B.``, ``B)``, ``(B)``, ``Answer: B``, ``The answer is (B).``. Anything else (a
  sentence, two letters, a letter outside A-D) is unparseable.
* MI answers map each of the four panels A-D to a modality, e.g. ``A: FLAIR (MRI), B: CBCT, C: CT,
  D: T1 (MRI)``. Entries may be separated by commas, semicolons or newlines, with any spacing and case;
  the modality may be written as its display name (``T1 (MRI)``), its bare name (``T1``, ``FLAIR``) or the
  registry name (``t1ce``). The answer is unparseable unless all four panels appear exactly once, each
  with a known modality.

Accuracy counts an unparseable prediction as wrong; the number of unparseable predictions is reported
beside it so a reader can tell "wrong" from "did not answer in the format".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from synermedgen_jax.data.routes import MODALITIES

__all__ = ["LETTERS", "UNDERSTANDING_TASKS", "parse_choice", "parse_modality_map", "parse_answer", "accuracy"]

LETTERS = "ABCD"
UNDERSTANDING_TASKS = ("cts", "mi", "tia")

_CHOICE_RE = re.compile(
    r"^(?:(?:the\s+)?(?:correct\s+)?answer(?:\s+is)?\s*[:=]?\s*)?"  # optional "Answer:" / "The answer is"
    r"(?:\(\s*([a-d])\s*\)|([a-d])\s*[.)]?)"  # "(B)" or "B" / "B." / "B)"
    r"\s*\.?$",
    re.IGNORECASE,
)

# Normalised spelling (lowercase, no spaces/hyphens/underscores) -> registry modality name.
_MODALITY_ALIASES: dict[str, str] = {m: m for m in MODALITIES}
_MODALITY_ALIASES.update({
    "mri": "mr",
    "t1(mri)": "t1", "t1ce(mri)": "t1ce", "t2(mri)": "t2", "flair(mri)": "flair",
    "t1mri": "t1", "t1cemri": "t1ce", "t2mri": "t2", "flairmri": "flair",
    "conebeamct": "cbct",
})
_ENTRY_RE = re.compile(r"^\s*\(?([a-d])\)?\s*[:=]\s*(.+?)\s*$", re.IGNORECASE)


def parse_choice(text: str) -> str | None:
    """Option letter ``"A"``-``"D"`` of a CTS/TIA answer, or None when unparseable."""
    if not isinstance(text, str):
        return None
    m = _CHOICE_RE.match(text.strip())
    if m is None:
        return None
    return (m.group(1) or m.group(2)).upper()


def _modality(text: str) -> str | None:
    key = re.sub(r"[\s_\-]+", "", text.strip().rstrip(".").lower())
    return _MODALITY_ALIASES.get(key)


def parse_modality_map(text: str) -> dict[str, str] | None:
    """Panel -> modality mapping of an MI answer (e.g. ``{"A": "flair", ...}``), or None when unparseable."""
    if not isinstance(text, str):
        return None
    entries = [e for e in re.split(r"[,;\n]+", text.strip()) if e.strip()]
    mapping: dict[str, str] = {}
    for entry in entries:
        m = _ENTRY_RE.match(entry)
        if m is None:
            return None
        letter, modality = m.group(1).upper(), _modality(m.group(2))
        if modality is None or letter in mapping:
            return None
        mapping[letter] = modality
    if sorted(mapping) != list(LETTERS):
        return None
    return {k: mapping[k] for k in LETTERS}


def _check_task(task: str) -> str:
    t = task.lower() if isinstance(task, str) else task
    if t not in UNDERSTANDING_TASKS:
        raise ValueError(f"unknown understanding task {task!r}; valid tasks: {', '.join(UNDERSTANDING_TASKS)}")
    return t


def parse_answer(task: str, text: str) -> str | dict[str, str] | None:
    """Parse one generated answer of ``task`` ("cts", "mi" or "tia"); None when unparseable."""
    return parse_modality_map(text) if _check_task(task) == "mi" else parse_choice(text)


def _reference(task: str, answer, index: int):
    """A ground-truth answer: text in the generated format, or for MI already a panel -> modality dict."""
    if task == "mi" and isinstance(answer, Mapping):
        ref = {str(k).upper(): _modality(str(v)) for k, v in answer.items()}
        ok = sorted(ref) == list(LETTERS) and all(ref.values())
        ref = {k: ref[k] for k in LETTERS} if ok else None
    else:
        ref = parse_answer(task, answer)
    if ref is None:
        raise ValueError(f"answers[{index}] is not a valid {task.upper()} answer: {answer!r}")
    return ref


def accuracy(task: str, predictions: Sequence[str], answers: Sequence) -> dict[str, float | int]:
    """Exact-match accuracy of generated answers.

    Args:
      task: "cts", "mi" or "tia" (case-insensitive).
      predictions: generated answer texts.
      answers: ground truths, same length: letters for CTS/TIA; for MI an answer string or a
        panel -> modality mapping. A ground truth that does not parse is a ValueError (a data bug).

    Returns:
      ``{"accuracy": correct / n, "n": n, "unparseable": count}`` (accuracy NaN when n == 0). For MI also
      ``"panel_accuracy"``: the fraction of the 4n panels named correctly (unparseable answers score 0).
    """
    t = _check_task(task)
    if isinstance(predictions, str) or isinstance(answers, str):
        raise ValueError("predictions and answers must be sequences of answers, not a single string")
    if len(predictions) != len(answers):
        raise ValueError(f"predictions and answers differ in length: {len(predictions)} vs {len(answers)}")
    n = len(predictions)
    correct = unparseable = panels = 0
    for i, (pred, ans) in enumerate(zip(predictions, answers)):
        ref = _reference(t, ans, i)
        got = parse_answer(t, pred)
        if got is None:
            unparseable += 1
            continue
        correct += int(got == ref)
        if t == "mi":
            panels += sum(got[k] == ref[k] for k in LETTERS)
    out: dict[str, float | int] = {"accuracy": correct / n if n else float("nan"), "n": n,
                                   "unparseable": unparseable}
    if t == "mi":
        out["panel_accuracy"] = panels / (4 * n) if n else float("nan")
    return out
