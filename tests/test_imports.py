"""Imports inside `athena` run one way: no module imports itself back through a chain of imports, and
athena/adapters imports its own package's modules at module level only, in the order its layout documents.

The graph is read from the source (ast), not by importing: every `import` / `from ... import` statement, at module
level or inside a function, is an edge to the athena module it names. Parent packages that Python also runs on
the way (`athena/__init__.py` for `import athena.config`) are not edges: they hold re-exports, not dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# athena/adapters, top to bottom: each module may import only modules above it (its __init__ re-exports them all).
ADAPTER_LAYERS = [
    "config", "linear", "base", "targets", "parts", "parts.lora", "parts.ia3", "parts.experts", "poly", "bottleneck",
    "inject", "hybrid", "merge", "io", "quantize",
    "autorank", "autorank.space", "autorank.search", "autorank.importance",
]
# Cycles outside athena/adapters that the restructuring of issue 15 is taking apart: each entry is one cycle's
# modules, reported as an expected failure until it is gone. None today.
KNOWN_CYCLES: list[set[str]] = []


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of `package` under `root` (a package is named by its __init__.py)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module of the package, line, inside a function) for each import statement of one module."""
    is_package = path.name == "__init__.py"
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, child.lineno, inside))
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(name, is_package, child.module, child.level)
                for alias in child.names:
                    submodule = f"{base}.{alias.name}"  # `from athena.adapters import config` names a module
                    found.append((submodule if submodule in modules else base, child.lineno, inside))
            visit(child, inside)

    visit(ast.parse(path.read_text(), str(path)), False)
    return [(target, line, inside) for target, line, inside in found if target in modules]


def _absolute(name: str, is_package: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    package = name.split(".") if is_package else name.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = module_names(root, package)
    return {name: {target for target, _, _ in imports_of(name, path, modules) if target != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_through(component, graph) for component in components]


def _cycle_through(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component (breadth first)."""
    start = min(component)
    paths = {nxt: [start, nxt] for nxt in sorted(graph[start] & component)}
    queue = list(paths)
    while start not in paths:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & component):
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    return paths[start]


def function_level_imports(root: Path, package: str, under: str) -> list[str]:
    modules = module_names(root, package)
    return [f"{path.relative_to(root)}:{line} imports {target} inside a function"
            for name, path in modules.items() if name == under or name.startswith(under + ".")
            for target, line, inside in imports_of(name, path, modules) if inside]


# ---------------------------------------------------------------- the checks themselves, on a planted package

def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checks_find_a_planted_cycle_and_a_function_level_import(tmp_path):
    root = _plant(tmp_path, {
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": "import torch\nfrom pkg import b\nA = 1\n",
        "pkg/b.py": "from .c import C\n",
        "pkg/c.py": "import pkg.sub.d\nC = 2\n",
        "pkg/sub/__init__.py": "from . import d\n",
        "pkg/sub/d.py": "from pkg.sub import e\n",
        "pkg/sub/e.py": "import os\n",
    })
    graph = import_graph(root, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.sub.d"},
                     "pkg.sub": {"pkg.sub.d"}, "pkg.sub.d": {"pkg.sub.e"}, "pkg.sub.e": set()}
    assert cycles(graph) == [] and function_level_imports(root, "pkg", "pkg") == []
    (root / "pkg/sub/e.py").write_text("def late():\n    from ..a import A\n    return A\n")
    assert cycles(import_graph(root, "pkg")) == [["pkg.a", "pkg.b", "pkg.c", "pkg.sub.d", "pkg.sub.e", "pkg.a"]]
    assert function_level_imports(root, "pkg", "pkg.sub") == [
        f"{Path('pkg/sub/e.py')}:2 imports pkg.a inside a function"]
    assert function_level_imports(root, "pkg", "pkg.b") == []


# ---------------------------------------------------------------- athena

def test_athena_has_no_import_cycle():
    found = cycles(import_graph(ROOT, "athena"))
    shown = "; ".join(" -> ".join(cycle) for cycle in found)
    assert not [c for c in found if any(m.startswith("athena.adapters") for m in c)], f"import cycles: {shown}"
    assert all(set(cycle) in KNOWN_CYCLES for cycle in found), f"import cycles: {shown}"
    if found:  # only cycles the restructuring (issue 15) is taking apart outside the adapters
        pytest.xfail(f"known import cycles outside athena/adapters: {shown}")


def test_adapters_import_athena_only_at_module_level():
    """A function-level import is how the old adapters package hid its cycles; none is needed now."""
    assert function_level_imports(ROOT, "athena", "athena.adapters") == []


def test_adapter_modules_import_only_the_layers_above_them():
    graph = import_graph(ROOT, "athena")
    names = [f"athena.adapters.{layer}" for layer in ADAPTER_LAYERS]
    assert set(names) | {"athena.adapters"} == {m for m in graph if m.startswith("athena.adapters")}, \
        "a module was added or removed: place it in ADAPTER_LAYERS"
    for position, name in enumerate(names):
        siblings = {m for m in graph[name] if m.startswith("athena.adapters")}
        below = siblings - set(names[:position])
        assert not below, f"{name} imports {sorted(below)}, which sit below it in ADAPTER_LAYERS"
    assert not {m for m in graph["athena.adapters.config"] if m.startswith("athena.")} - {"athena.errors"}
