"""tools/*.py are thin entry points (README "Tools"): no sys.path edits, one import of a package module's main."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

TOOLS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "tools").glob("*.py"))


@pytest.mark.parametrize("name", TOOLS)
def test_tool_is_a_thin_entry_point(name):
    source = (Path(__file__).resolve().parents[1] / "tools" / f"{name}.py").read_text()
    assert "sys.path" not in source
    imports = [node for node in ast.parse(source).body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert len(imports) == 1 and isinstance(imports[0], ast.ImportFrom), name
    assert imports[0].module.startswith("synermedgen_jax.") and [a.name for a in imports[0].names] == ["main"]
    assert callable(importlib.import_module(f"tools.{name}").main)  # as `python -m tools.NAME` runs it
