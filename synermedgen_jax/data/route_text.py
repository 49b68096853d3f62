"""Routes from free text and paths: which modality an image folder holds, which modalities an instruction names
and in which roles (source -> target). Used by the release build (data/synermed_build.py) to count routes and by
``eval --metadata`` (evaluation/png_pairs.py) to group scores by route.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# Folder names of slice/<modality>/ (lower case, before any "_suffix" such as ct_FDG) -> modality key.
_FOLDER_MODALITY = {"t1": "t1", "t1n": "t1", "t1w": "t1", "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce",
                    "t2": "t2", "t2w": "t2", "flair": "flair", "t2f": "flair", "ct": "ct", "cbct": "cbct",
                    "pet": "pet", "suv": "pet", "mr": "mr", "mri": "mr"}
# Path parts that name no modality: the release's image root (data/synermed.SLICE_DIR) and "here".
_NOT_MODALITY = ("slice", ".")

_MENTION = re.compile(
    r"(?<![a-z0-9])(?:"
    r"(?P<cbct>cbct|cone[\s-]*beam(?:[\s-]*(?:ct|computed\s+tomography))?)"
    r"|(?P<t1ce>t1[\s-]*(?:ce|c|gd|\+\s*c)|contrast[\s-]*enhanced\s+t1(?:[\s-]*weighted)?|post[\s-]*contrast\s+t1"
    r"(?:[\s-]*weighted)?)"
    r"|(?P<flair>(?:t2[\s-]*)?flair)"
    r"|(?P<t1>t1(?:[\s-]*weighted|w)?)"
    r"|(?P<t2>t2(?:[\s-]*weighted|w)?)"
    r"|(?P<pet>(?:fdg[\s-]*)?pet)"
    r"|(?P<ct>ct|computed\s+tomography)"
    r"|(?P<mr>mri|mr)"
    r")(?![a-z0-9])", re.IGNORECASE)
# The nearest of these words before a mention decides its role (source or target of the step).
_CUE = re.compile(r"(?<![a-z])(?P<src>from|given|of this|in this|shown in|based on|using|on this|source)"
                  r"|(?P<tgt>to|into|as|generate|synthesi[sz]e|produce|create|predict|obtain|target)(?![a-z])",
                  re.IGNORECASE)
_MR_SEQUENCES = ("t1", "t1ce", "t2", "flair")


def modality_from_path(path: str) -> str | None:
    """``t1/BraTS_0001_070.png`` or ``slice/pet_FDG/x.png`` -> the modality of its folder (None if unknown)."""
    parts = [p for p in Path(str(path)).parts[:-1] if p not in _NOT_MODALITY]
    for part in parts:
        name = part.lower().split("_")[0].split("-")[0]
        if name in _FOLDER_MODALITY:
            return _FOLDER_MODALITY[name]
    return None


def mentions(text: str) -> list[tuple[str, int]]:
    """Modality mentions ``(modality, start offset)`` in order; a bare "MRI" is dropped next to a sequence name."""
    found = [(m.lastgroup, m.start()) for m in _MENTION.finditer(text)]
    if any(name in _MR_SEQUENCES for name, _ in found):
        found = [(name, at) for name, at in found if name != "mr"]
    return found


def parse_route(text: str) -> tuple[str, str] | None:
    """(source, target) modality named by one instruction, or None when it does not name two modalities."""
    first: dict[str, int] = {}
    for name, at in mentions(text):
        first.setdefault(name, at)
    if len(first) < 2:
        return None
    roles = {}
    for name, at in first.items():
        cues = list(_CUE.finditer(text[max(0, at - 40):at]))
        roles[name] = cues[-1].lastgroup if cues else None
    order = sorted(first, key=first.get)
    src = next((m for m in order if roles[m] == "src"), None)
    tgt = next((m for m in order if roles[m] == "tgt" and m != src), None)
    if src is None:
        src = next((m for m in order if m != tgt and roles[m] is None), None) or next(m for m in order if m != tgt)
    if tgt is None:
        tgt = next(m for m in order if m != src)
    return src, tgt


def step_route(phrasings: Sequence[str]) -> tuple[str, str] | None:
    """The route a step's phrasings agree on most (ties: the first phrasing's)."""
    votes = Counter(r for r in (parse_route(p) for p in phrasings) if r is not None)
    return votes.most_common(1)[0][0] if votes else None


def chain_modalities(instruction_list: Sequence[Sequence[str]]) -> list[str | None]:
    """Modality of each image of an edit chain, from its steps' routes (None where no step names it)."""
    steps = [step_route(p) for p in instruction_list]
    mods: list[str | None] = [steps[0][0] if steps and steps[0] else None]
    for i, route in enumerate(steps):
        following = steps[i + 1] if i + 1 < len(steps) else None
        mods.append(route[1] if route else (following[0] if following else None))
    return mods


def route_name(src: str | None, tgt: str | None) -> str:
    """``"t1->t2"``; ``"?"`` for an unknown side; ``"unknown"`` when neither is known."""
    return f"{src or '?'}->{tgt or '?'}" if (src or tgt) else "unknown"
