"""The package's import graph, read from the source with `ast` (nothing is imported): the kernels sit below the
model (nothing under pid_cli/kernels imports pid_cli.model or anything else of pid_cli outside kernels/), and no
pid_cli modules import each other in a circle through their module-level imports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pid_cli"

# Import circles known to remain, each the set of modules that form it; delete an entry once its circle is gone.
KNOWN_CYCLES: tuple[frozenset[str], ...] = ()


def modules() -> dict[str, Path]:
    """Every module of pid_cli by dotted name (a package by its __init__.py)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(tree: ast.Module, module_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module: all of them, or only those that run when it is imported (not inside a
    function or class, nor under `if TYPE_CHECKING:`)."""
    if not module_level:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
        else:
            todo.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
    return found


def imported(name: str, path: Path, known: dict[str, Path], module_level: bool) -> set[str]:
    """The pid_cli modules that module `name` imports: `from package import submodule` counts as the submodule,
    `from module import name` as the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in import_nodes(ast.parse(path.read_text(), str(path)), module_level):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {t for t in targets if t in known}


def graph(module_level: bool) -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known, module_level) - {name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_the_package():
    """A guard on the checks below: the reader finds the modules and the imports they are known to have."""
    edges = graph(module_level=True)
    assert {"pid_cli.kernels.ops", "pid_cli.kernels.constants", "pid_cli.model.net"} <= set(edges)
    assert "pid_cli.kernels.ops" in edges["pid_cli.model.layers"]
    assert "pid_cli.kernels.constants" in edges["pid_cli.kernels.ops"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_kernels_import_nothing_of_pid_cli_outside_kernels():
    """Imports anywhere in the module, a function's included: the kernels are below the model, which imports them."""
    for name, targets in graph(module_level=False).items():
        if name == "pid_cli.kernels" or name.startswith("pid_cli.kernels."):
            outside = {t for t in targets if not t.startswith("pid_cli.kernels")}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_no_import_cycles_among_pid_cli_modules():
    found = cycles(graph(module_level=True))
    unknown = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not unknown, f"import cycles: {unknown}"
