"""The package's shape, read from its source with ``ast`` (nothing is imported or run).

- No import cycle among the package's modules (module-level imports; an import inside a function is how
  a cycle hides, so those are counted too, and forbidden where the design says so).
- In ``data/``, ``kernels/`` and ``commands/`` no import sits inside a function, except of an optional heavy
  dependency a user may not have installed or should not pay for at start-up (``OPTIONAL``).
- Names the design keeps in one place are defined once.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "synermedgen_jax"
ROOT = "synermedgen_jax"
# Optional or heavy at start-up: the PyTorch side (references, conversions), the template anatomy, tensorboard,
# the release's Parquet reader.
OPTIONAL = {"torch", "transformers", "diffusers", "nilearn", "tensorboardX", "pyarrow"}
NO_LOCAL_IMPORTS = ("data", "kernels", "commands")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    modules = {_module_name(path): ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}
    assert len(modules) > 50, f"{PACKAGE}: expected the package's modules, found {len(modules)}"
    return modules


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The package modules one import statement loads (``from a import b`` names ``a.b`` when it is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == ROOT]
    base = node.module or ""
    if node.level:  # relative: resolve against this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    if base.split(".")[0] != ROOT:
        return []
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]


def _function_bodies(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _local_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found = {}
    for function in _function_bodies(tree):
        for node in ast.walk(function):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found[id(node)] = node
    return list(found.values())


def import_graph(include_local: bool) -> dict[str, set[str]]:
    """``{module: package modules it imports}``; module-level imports, plus those in functions if asked."""
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, tree in modules.items():
        is_package = (PACKAGE.parent / Path(*name.split("."))).is_dir()
        local = {id(node) for node in _local_imports(tree)}
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and (include_local or id(node) not in local):
                if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                    continue
                edges.update(target for target in _imported(node, name, is_package, known)
                             if target in known and target != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("include_local", [False, True], ids=["module-level", "with-imports-in-functions"])
def test_no_import_cycle(include_local):
    found = cycles(import_graph(include_local))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(component) for component in found)


@pytest.mark.parametrize("folder", NO_LOCAL_IMPORTS)
def test_no_imports_inside_functions(folder):
    offenders = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for node in _local_imports(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or "."]
            if any(name.split(".")[0] not in OPTIONAL for name in names):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {', '.join(names)}")
    assert not offenders, "imports inside functions:\n" + "\n".join(offenders)


@pytest.mark.parametrize("name", ["executed_step_flops", "MESH_AXES", "write_atomic", "SampleMaker",
                                  "sample_dataset", "STAGES"])
def test_defined_once(name):
    places = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            defined = ([node.name] if isinstance(node, ast.FunctionDef | ast.ClassDef) else
                       [target.id for target in getattr(node, "targets", [getattr(node, "target", None)])
                        if isinstance(target, ast.Name)] if isinstance(node, ast.Assign | ast.AnnAssign) else [])
            if name in defined:
                places.append(str(path.relative_to(PACKAGE.parent)))
    assert len(places) <= 1, f"{name} is defined in {places}"


# README's architecture map, bottom to top; a module imports only from its own layer or those below.
LAYERS = [("stages", "staging", "axes", "ssim", "locking", "config"), ("data",), ("kernels",), ("modeling",),
          ("sharding",), ("training", "port"), ("inference",), ("evaluation",), ("accounting",), ("benchmark",),
          ("commands", "__main__")]


def _layer(module: str) -> int | None:
    part = module.split(".")[1] if "." in module else None
    return next((index for index, names in enumerate(LAYERS) if part in names), None)


def test_imports_point_down_the_layers():
    upward = [f"{module} -> {target}" for module, targets in import_graph(include_local=True).items()
              for target in targets
              if None not in (_layer(module), _layer(target)) and _layer(target) > _layer(module)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))
