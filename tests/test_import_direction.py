"""Imports flow one way: no module of the three packages imports, even inside a function or under
``TYPE_CHECKING``, a module that imports it back; collage's backends are a leaf layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch_collage", "torch_graphpipe", "torch_cp", "torch_zoo")
# What a collage backend may import besides ``torch_collage.backends.*``: FX helpers that know no backend.
BACKEND_HELPERS = frozenset(
    {
        "torch_collage.graph",
        "torch_collage.freeze",
        "torch_collage.subgraph",
        "torch_collage.fresh_entry",
        "torch_collage.rewrite",
    }
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (``pkg.mod.attr`` -> ``pkg.mod``), or None."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every project module ``module`` imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{a.name}" for a in node.names]  # a submodule, or a name in ``base``
        for name in names:
            target = _resolve(name, known)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles (each line imports back into itself):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_collage_backends_are_a_leaf_layer() -> None:
    graph = import_graph()
    bad = {
        m: sorted(
            t for t in targets if not t.startswith("torch_collage.backends") and t not in BACKEND_HELPERS
        )
        for m, targets in graph.items()
        if m.startswith("torch_collage.backends")
    }
    bad = {m: [x for x in t if x.startswith("torch_collage")] for m, t in bad.items()}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"collage backends importing the layers above them: {bad}"
    helpers = {m: sorted(t - BACKEND_HELPERS) for m, t in graph.items() if m in BACKEND_HELPERS}
    assert not any(helpers.values()), f"FX helpers must import no other project module: {helpers}"


def test_the_checker_sees_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    """The checker itself: a cycle through a function-level import and one under TYPE_CHECKING."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (pkg / "c.py").write_text("from . import a\n")
    known = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py", "pkg.c": pkg / "c.py"}
    graph = {m: imports_of(m, p, known) for m, p in known.items()}
    assert graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_is_seen(package: str) -> None:
    assert any(m.startswith(package + ".") for m in _modules())
