"""Argument types of the commands: each refuses a bad value while the command line is parsed, before any work,
with argparse's one error line naming the option (``argument --slice-size: must be >= 1, got 0``; exit 2).

Use as ``parser.add_argument("--steps", type=positive_int)``; factories (``int_range``, ``float_range``,
``window``) return such a function with a readable ``__name__`` (argparse shows it for unparsable text).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

# Limits of the understanding prompt and decoding (commands/ask.py, eval): BAGEL's context is 32,768 positions
# (Qwen2.5's max_position_embeddings); a longer prompt is a mistake, not a question, and would hang the tokenizer
# and the packer before failing.
MAX_PROMPT_CHARS = 32_768
MAX_NEW_TOKENS = 8_192
# Pictures read as model input (PNG/JPEG): larger ones are refused before decoding (a 30k x 30k PNG is 900 M
# pixels; PIL's own bomb check stops at 179 M with a traceback).
MAX_IMAGE_PIXELS = 8192 * 8192


def _named(name: str, function: Callable) -> Callable:
    function.__name__ = name
    return function


def int_range(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An integer in ``[low, high]`` (either bound optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    return _named("integer", parse)


positive_int = int_range(1)
non_negative_int = int_range(0)


def float_range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False) -> Callable[[str], float]:
    """A finite float within the bounds (``low_open``/``high_open``: the bound itself excluded)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {value:g}")
        if high is not None and (value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high:g}, got {value:g}")
        return value

    return _named("number", parse)


finite_float = float_range()
positive_float = float_range(0.0, low_open=True)
non_negative_float = float_range(0.0)
fraction = float_range(0.0, 1.0)


def window(low: float | None = None, high: float | None = None) -> Callable[[str], tuple[float, float]]:
    """``LO,HI``: two finite numbers with ``LO < HI`` (within ``[low, high]`` when given)."""

    def parse(text: str) -> tuple[float, float]:
        parts = text.split(",")
        try:
            lo, hi = (float(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {text!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise argparse.ArgumentTypeError(f"LO,HI must be finite numbers, got {text!r}")
        if lo >= hi:
            raise argparse.ArgumentTypeError(f"LO must be below HI, got {text!r}")
        if (low is not None and lo < low) or (high is not None and hi > high):
            raise argparse.ArgumentTypeError(f"LO,HI must lie within {low:g}..{high:g}, got {text!r}")
        return lo, hi

    return _named("window", parse)


def existing_file(*suffixes: str) -> Callable[[str], Path]:
    """A path to an existing regular file (ending in one of ``suffixes`` when given)."""

    def parse(text: str) -> Path:
        path = Path(text)
        if not path.exists():
            raise argparse.ArgumentTypeError(f"{text}: file not found")
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{text}: not a file")
        if suffixes and not path.name.lower().endswith(suffixes):
            raise argparse.ArgumentTypeError(f"{text}: expected a {' or '.join(suffixes)} file")
        return path

    return _named("file", parse)


def existing_folder(text: str) -> Path:
    """A path to an existing folder."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {'not a folder' if path.exists() else 'folder not found'}")
    return path


def bounded_text(limit: int) -> Callable[[str], str]:
    """Text of at most ``limit`` characters (checked before any tokenizer sees it)."""

    def parse(text: str) -> str:
        if len(text) > limit:
            raise argparse.ArgumentTypeError(f"{len(text)} characters; at most {limit} are accepted")
        return text

    return _named("text", parse)


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse errors as the commands' own: one ``error: ...`` line naming the option (the usage block, which
    can run to 20 lines, is replaced by a pointer to ``--help``), exit status 2."""

    def error(message: str):
        print(f"error: {message} (see {parser.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    parser.error = error
