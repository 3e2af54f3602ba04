"""diptych's modules import one another in one direction only.

A cycle held together by an import inside a function works until someone moves that import,
and it hides which module owns what. This test parses every module with ``ast`` (top-level
and function-level imports alike; ``importlib.import_module`` with a computed name is not an
import edge) and fails on any cycle, printing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "diptych"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The diptych module an import of ``name`` loads (``a.b.c`` may name an attribute of ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """module -> the diptych modules it imports anywhere in its body."""
    modules = _modules() if modules is None else modules
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t.split(".")[0] != "diptych":
                    continue
                hit = _resolve(t, modules)
                if hit is not None and hit != mod:
                    edges.add(hit)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_finder_sees_a_function_level_cycle(tmp_path):
    """The oracle for the real test: a cycle closed by an import inside a function is found."""
    pkg = tmp_path / "diptych"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from diptych.core.b import x\n")
    (pkg / "core" / "b.py").write_text("def f():\n    from . import a\n    return a\nx = 1\n")
    (pkg / "core" / "c.py").write_text("import diptych.core.a\n")
    global ROOT
    old = ROOT
    ROOT = tmp_path
    try:
        mods = {_module_name(p): p for p in pkg.rglob("*.py")}
    finally:
        ROOT = old
    graph = import_graph(mods)
    assert graph["diptych.core.c"] == {"diptych.core.a"}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"diptych.core.a", "diptych.core.b"}
    (pkg / "core" / "b.py").write_text("x = 1\n")
    assert find_cycle(import_graph(mods)) is None


def test_diptych_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
