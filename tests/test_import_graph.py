"""The package's import graph, read from the source with `ast` (nothing is imported): pid_cli's modules stand in
layers (LAYERS, top down) and import only sideways or down, never up, nor round in a circle; the kernels import
nothing of pid_cli outside kernels/. docs/architecture.md draws this graph; scripts/import_graph.py redraws it from
the data here, and a test below keeps the two equal."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pid_cli"

# Import circles known to remain, each the set of modules that form it; delete an entry once its circle is gone.
KNOWN_CYCLES: tuple[frozenset[str], ...] = ()

# The layers, top down, each a name and its units. A unit is a top-level module or a whole subpackage of pid_cli,
# named without the `pid_cli.` prefix ("__init__" is pid_cli/__init__.py). A module may import its own layer and
# the layers below, never one above: the order the code keeps today, written down so it stays kept. model/ and
# kernels/ sit below the registry, the Hub and the file readers: the network is told what to build and handed
# tensors, and knows nothing of files, downloads or device names. docs/architecture.md says what each unit holds.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("command line", ("cli",)),
    ("commands", ("doctor", "convert")),
    ("decode engine", ("decode",)),
    ("decoder", ("pipeline", "split")),
    ("stages", ("inputs", "text", "vae", "sampler", "outputs", "colorfix", "baselines")),
    ("foundation", ("registry", "hub", "paths", "devices", "files", "__init__")),
    ("network", ("model",)),
    ("kernels", ("kernels",)),
)

# Imports inside a function that go up a layer, each with its reason; nothing at module level may.
LAZY_UPWARD: dict[tuple[str, str], str] = {
    ("pid_cli", "pid_cli.pipeline"): "`pid_cli.Decoder` re-exports the library API on first use (__getattr__), "
                                     "so `import pid_cli` stays free of torch",
}


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
    """Module → the modules it imports: at module level only, or anywhere in it (functions included)."""
    known = modules()
    return {name: imported(name, path, known, module_level) - {name} for name, path in known.items()}


def unit(module: str) -> str:
    """The LAYERS unit of a module: `pid_cli.decode.job` → "decode", `pid_cli.cli` → "cli", `pid_cli` → "__init__"."""
    return module.split(".")[1] if "." in module else "__init__"


def layer_of() -> dict[str, int]:
    """Unit → its layer's index, 0 at the top."""
    return {u: i for i, (_, units) in enumerate(LAYERS) for u in units}


def upward(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    """The imports (importer, imported) whose target sits in a higher layer than the importer (a unit missing from
    LAYERS counts as no layer: the test that every module has one names it)."""
    rank = layer_of()
    return {(a, b) for a, targets in edges.items() for b in targets
            if unit(a) in rank and unit(b) in rank and rank[unit(b)] < rank[unit(a)]}


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


def test_every_module_has_a_layer_and_every_unit_exists():
    """A new module or subpackage fails here until it is placed in LAYERS (and the drawing regenerated)."""
    units = {unit(m) for m in modules()}
    listed = [u for _, layer in LAYERS for u in layer]
    assert len(listed) == len(set(listed)), "a unit is in two layers"
    assert not units - set(listed), f"place these in LAYERS: {sorted(units - set(listed))}"
    assert not set(listed) - units, f"LAYERS names what no longer exists: {sorted(set(listed) - units)}"


def test_no_module_level_import_goes_up_a_layer():
    found = sorted(upward(graph(module_level=True)))
    assert not found, "imports of a higher layer (move the code, or the layer if the design changed): " + ", ".join(
        f"{a} → {b}" for a, b in found)


def test_imports_inside_functions_go_up_only_where_known():
    """A lazy import is no licence to reach up a layer: each that does is listed, with its reason, in LAZY_UPWARD."""
    eager = graph(module_level=True)
    lazy = {a: targets - eager[a] for a, targets in graph(module_level=False).items()}
    found = upward(lazy)
    assert found <= set(LAZY_UPWARD), f"new upward imports: {sorted(found - set(LAZY_UPWARD))}"
    assert set(LAZY_UPWARD) <= found, f"gone, delete from LAZY_UPWARD: {sorted(set(LAZY_UPWARD) - found)}"


def test_the_drawing_in_docs_architecture_is_current():
    """docs/architecture.md's mermaid block is what scripts/import_graph.py prints for today's code."""
    printed = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py")], capture_output=True,
                             text=True, check=True).stdout.strip()
    blocks = re.findall(r"^```mermaid\n.*?^```$", (ROOT / "docs" / "architecture.md").read_text(), re.M | re.S)
    assert blocks == [printed], ("docs/architecture.md's drawing is stale: run `python scripts/import_graph.py` and "
                                 "paste its output over the ```mermaid block")
