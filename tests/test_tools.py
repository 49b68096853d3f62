"""tools/*.py are thin entry points (README "Tools"): no sys.path edits, one import of a package module's main
(plus ``os`` where an environment variable must be set before jax starts)."""

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
    package = [node for node in imports
               if isinstance(node, ast.ImportFrom) and node.module.startswith("synermedgen_jax.")]
    others = [alias.name for node in imports if node not in package for alias in node.names]
    assert len(package) == 1 and [a.name for a in package[0].names] == ["main"], name
    assert set(others) <= {"os"}, f"{name}: imports {others} besides the package's main"
    assert callable(importlib.import_module(f"tools.{name}").main)  # as `python -m tools.NAME` runs it
