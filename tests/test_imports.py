"""The package's import graph, read with `ast` from the source (every import statement, those
inside functions too, relative ones resolved): no cycles, and the layering DESIGN.md states:
models never import formats, formats never import models."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> its source folder (triton_kernels/ installs as fastdiff.triton_kernels)
SOURCES = {"fastdiff": ROOT / "fastdiff", "fastdiff.triton_kernels": ROOT / "triton_kernels"}
COMPILED = {"fastdiff._core"}  # extension modules: leaves of the graph (they import nothing of ours)


def _modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is_package) for every .py file of the package."""
    out = {}
    for pkg, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = (path, is_pkg)
    return out


def _resolve(name: str, modules) -> str | None:
    """The module an import of `name` runs last: `name` itself or, for an attribute of a module
    (from pkg import function), the nearest enclosing module of ours."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the fastdiff modules it imports (anywhere in its source)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in modules.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                # `from pkg import sub` imports the submodule pkg.sub; `from mod import f`, mod.
                names = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin
                         for a in node.names if f"{origin}.{a.name}" not in COMPILED]
            for n in names:
                if any(n == c or n.startswith(c + ".") for c in COMPILED):
                    continue
                if n == "fastdiff" or n.startswith("fastdiff."):
                    t = _resolve(n, modules)
                    if t is not None and t != mod:
                        targets.add(t)
        graph[mod] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Per strongly connected component of more than one module: its shortest cycle through
    its first module, then (if the component is larger) every member."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []

    def visit(v):  # Tarjan's algorithm
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
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(set(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for scc in sccs:
        start = min(scc)
        # shortest path back to start inside the component (breadth first)
        prev, frontier, found = {start: None}, [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & scc):
                    if w == start:
                        found = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path, v = [], found
        while v is not None:
            path.append(v)
            v = prev[v]
        cycle = path[::-1] + [start]
        cycles.append(cycle if len(scc) == len(cycle) - 1 else cycle + [f"(component: {', '.join(sorted(scc))})"])
    return cycles


def _reachable(graph, start: str) -> dict[str, str]:
    """module -> the module that imports it, for everything `start` imports, directly or not."""
    seen, todo = {start: None}, [start]
    while todo:
        v = todo.pop()
        for w in sorted(graph.get(v, ())):
            if w not in seen:
                seen[w] = v
                todo.append(w)
    return seen


def _chain(seen, end) -> str:
    path = [end]
    while seen[path[-1]] is not None:
        path.append(seen[path[-1]])
    return " -> ".join(reversed(path))


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_graph_sees_imports(graph):
    """The reader itself: relative, absolute and function-level imports all show."""
    assert "fastdiff.formats.files" in graph["fastdiff.formats.ldm"]  # from .files import ...
    assert "fastdiff.ops" in graph["fastdiff.models.unet"]  # from fastdiff import ops
    assert "fastdiff.formats.diffusers_folder" in graph["fastdiff.formats"]  # inside open_model
    assert "fastdiff" not in graph["fastdiff.sampling"]  # from fastdiff import _core: compiled


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer,forbidden", [("fastdiff.models", "fastdiff.formats"),
                                             ("fastdiff.formats", "fastdiff.models")])
def test_layers(graph, layer, forbidden):
    """DESIGN.md: models never import formats; formats produce plain data and never import
    models. Checked through every module a layer's modules import."""
    bad = []
    for mod in sorted(m for m in graph if m == layer or m.startswith(layer + ".")):
        seen = _reachable(graph, mod)
        bad += [_chain(seen, m) for m in seen if m == forbidden or m.startswith(forbidden + ".")]
    assert not bad, f"{layer} reaches {forbidden}:\n" + "\n".join("  " + b for b in sorted(set(bad)))
