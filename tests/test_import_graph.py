"""The package's import graph, read from the source: no cycles, and outputs build objects only.

Every ``import`` counts, those inside functions included: a cycle hidden in a function still
runs (the first call imports a half-initialised module, or depends on who imported whom
first).  Imports under ``if TYPE_CHECKING:`` never run and do not count.  ``from a import b``
is an edge to ``a.b`` when ``b`` is a submodule, else to ``a``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "dicom_node"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
# What outputs/* may not import, directly or through other dicom_node modules: they turn an
# Analysis into DICOM objects; persisting and queueing them is the jobs' business.
OUTPUTS_FORBIDDEN = ("dicom_node.db", "dicom_node.jobs", "dicom_node.store", "sqlalchemy")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module (dicom_node module, or a third-party name)
    line: int

    def describe(self) -> str:
        return f"{self.source} -> {self.target} ({module_path(self.source)}:{self.line})"


def module_path(module: str) -> str:
    relative = Path(*module.split("."))
    package = ROOT.parent / relative / "__init__.py"
    return str(
        (package if package.exists() else ROOT.parent / f"{relative}.py").relative_to(ROOT.parent)
    )


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements anywhere in ``tree`` except the body of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return found


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> list[Edge]:
    """The runtime imports of one module, resolved to modules where they are ours."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    edges = []
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            edges += [Edge(module, alias.name, node.lineno) for alias in node.names]
            continue
        base = _base(module, is_package, node)
        if base == "__future__":
            continue
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            edges.append(Edge(module, candidate if candidate in known else base, node.lineno))
    return edges


def import_graph() -> dict[str, list[Edge]]:
    """Module -> its edges, for every module of the package."""
    modules = package_modules()
    known = set(modules)
    return {module: imports_of(module, path, known) for module, path in modules.items()}


def _internal(graph: dict[str, list[Edge]], edge: Edge) -> bool:
    return edge.target in graph and edge.target != edge.source


def strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter([e.target for e in graph[root] if _internal(graph, e)]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter([e.target for e in graph[child] if _internal(graph, e)])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(components)


def _cycle_in(graph: dict[str, list[Edge]], component: list[str]) -> list[str]:
    """One cycle through the component's first module (breadth-first, so a shortest one)."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph[node]:
                if edge.target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if edge.target in members and edge.target not in previous:
                    previous[edge.target] = node
                    following.append(edge.target)
        frontier = following
    return component


def test_the_import_graph_has_no_cycles() -> None:
    graph = import_graph()
    report = []
    for component in strongly_connected(graph):
        members = set(component)
        edges = sorted(
            {
                e.describe()
                for m in component
                for e in graph[m]
                if e.target in members and e.target != m
            }
        )
        report.append(
            " -> ".join(_cycle_in(graph, component))
            + "\n    edges in the cycle:\n"
            + "\n".join(f"      {edge}" for edge in edges)
        )
    assert not report, "import cycles:\n  " + "\n  ".join(report)


def test_outputs_import_no_database_jobs_or_store() -> None:
    graph = import_graph()
    violations = []
    for start in sorted(m for m in graph if m.startswith(f"{PACKAGE}.outputs")):
        seen, pending, via = {start}, [start], {start: ""}
        while pending:
            node = pending.pop()
            for edge in graph[node]:
                target = edge.target
                if any(target == f or target.startswith(f + ".") for f in OUTPUTS_FORBIDDEN):
                    chain = f" (through {via[node]})" if via[node] else ""
                    violations.append(f"{start}: {edge.describe()}{chain}")
                elif target in graph and target not in seen:
                    seen.add(target)
                    via[target] = f"{via[node]} -> {target}" if via[node] else target
                    pending.append(target)
    assert not violations, "outputs/* must not reach these:\n  " + "\n  ".join(violations)


def test_the_graph_sees_imports_inside_functions_and_resolves_submodules(tmp_path: Path) -> None:
    """The reader itself: a function-level import and ``from pkg import submodule`` are edges,
    a TYPE_CHECKING import is not (so the two tests above can fail)."""
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from dicom_node import results\n"
        "from dicom_node.results import Box\n"
        "if TYPE_CHECKING:\n"
        "    from dicom_node.db import models\n"
        "def f():\n"
        "    from dicom_node.jobs import cams\n"
        "    import sqlalchemy.orm\n"
    )
    known = {
        "dicom_node",
        "dicom_node.results",
        "dicom_node.jobs",
        "dicom_node.jobs.cams",
        "dicom_node.db",
        "dicom_node.db.models",
    }
    targets = {e.target for e in imports_of("dicom_node.mod", source, known)}
    assert targets == {"typing", "dicom_node.results", "dicom_node.jobs.cams", "sqlalchemy.orm"}
    cyclic = {
        "a": [Edge("a", "b", 1)],
        "b": [Edge("b", "c", 1)],
        "c": [Edge("c", "a", 1)],
        "d": [Edge("d", "a", 1)],
    }
    assert strongly_connected(cyclic) == [["a", "b", "c"]]
    assert _cycle_in(cyclic, ["a", "b", "c"]) == ["a", "b", "c", "a"]
