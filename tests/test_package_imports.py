"""The package's import graph: one namespace, no cycles, dependencies pointing one way.

Every `import` in every module of the installed `lumen` package counts, including imports
inside functions and under `TYPE_CHECKING`: a cycle hidden in a function is still a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The folders the project is known by, and the names they install under (setup.py).
FOLDERS = {"lumen.engine": "engine", "lumen.service": "service", "lumen.telemetry": "telemetry", "lumen.load": "load"}
# (importer, imported) prefixes that must never meet.
FORBIDDEN = [
    ("lumen.engine", "lumen.service"), ("lumen.engine", "lumen.load"), ("lumen.engine", "grpc"),
    ("lumen.engine", "grpc_health"), ("lumen.engine", "grpc_reflection"), ("lumen.engine", "lumen.v1"),
    ("lumen.telemetry", "lumen.engine"), ("lumen.telemetry", "lumen.service"), ("lumen.telemetry", "lumen.load"),
    ("lumen.load", "lumen.engine"), ("lumen.load", "lumen.service"),
]


def package_modules() -> dict[str, Path]:
    """Dotted name -> source file, for every module installed under lumen.* (stubs excepted)."""
    modules = {"lumen": REPO / "lumen" / "__init__.py"}
    for package, folder in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def imported_names(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module `name` imports (absolute names; `from pkg import submodule` counts as the submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name if is_package(name, modules) else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the lumen modules it imports, with the packages an import loads on the way
    (importing a.b.c runs a/__init__ and a/b/__init__), except the importer's own ancestors."""
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        ancestors = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        edges = set()
        for target in imported_names(name, path, modules):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix not in ancestors and prefix != name:
                    edges.add(prefix)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def test_no_import_cycles_inside_lumen():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("importer,imported", FORBIDDEN, ids=[f"{a}->{b}" for a, b in FORBIDDEN])
def test_dependencies_point_one_way(importer, imported):
    modules = package_modules()
    offending = sorted(
        f"{name} imports {target}"
        for name, path in modules.items() if name == importer or name.startswith(importer + ".")
        for target in imported_names(name, path, modules)
        if target == imported or target.startswith(imported + "."))
    assert offending == []


def test_no_module_imports_the_old_top_level_names():
    """Everything is imported as lumen.*: a stray `import engine` would load a second copy."""
    modules = package_modules()
    stray = sorted(f"{name} imports {target}" for name, path in modules.items()
                   for target in imported_names(name, path, modules)
                   if target.split(".")[0] in {"engine", "service", "telemetry", "load"})
    assert stray == []
