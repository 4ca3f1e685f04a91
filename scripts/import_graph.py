"""Print the drawing of pid_cli's import graph that docs/architecture.md holds: a mermaid flowchart, one box per layer.

    python scripts/import_graph.py         # paste the output over the ```mermaid block of docs/architecture.md
    python scripts/import_graph.py --all   # every direct import, no arrow left out (busier)

It draws what tests/test_import_graph.py checks, from the same data (its LAYERS and its `ast` reader), so the
drawing is the tested one; that test fails when the doc's block differs from this output. A subpackage is one node
(`decode/`), a top-level module one node (`cli`); a solid arrow is a module-level import, a dashed one an import
made only inside functions (e.g. cli.py's, which keep `pid --help` fast). For readability an arrow that a longer path
already implies is left out (solid arrows against solid paths, dashed against any), so following the arrows
still reaches everything a part imports, directly or not. pid_cli/__init__.py is left out: every module imports it
implicitly, and it holds only the version and a lazy `Decoder` re-export.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_import_graph import LAYERS, graph, layer_of, unit

LEFT_OUT = {"__init__"}


def unit_edges(module_level: bool) -> set[tuple[str, str]]:
    """Module imports collapsed to their units, without a unit's imports of itself."""
    return {(unit(a), unit(b)) for a, targets in graph(module_level).items() for b in targets
            if unit(a) != unit(b) and not {unit(a), unit(b)} & LEFT_OUT}


def label(name: str) -> str:
    return f"{name}/" if (Path(__file__).resolve().parents[1] / "pid_cli" / name).is_dir() else name


def implied(edges: set[tuple[str, str]], a: str, b: str) -> bool:
    """Whether a path of two arrows or more of `edges` leads from a to b (the unit graph has no circles)."""
    todo, seen = [c for x, c in edges if x == a and c != b], set()
    while todo:
        v = todo.pop()
        if v == b:
            return True
        if v not in seen:
            seen.add(v)
            todo += [c for x, c in edges if x == v]
    return False


def mermaid(every_import: bool = False) -> str:
    rank = layer_of()
    order = {u: i for i, u in enumerate(u for _, units in LAYERS for u in units)}
    lines = ["```mermaid", "flowchart TD"]
    for i, (name, units) in enumerate(LAYERS):
        lines.append(f'    subgraph layer{i} ["{name}"]')
        lines += [f'        {u}["{label(u)}"]' for u in units if u not in LEFT_OUT]
        lines.append("    end")
    eager, anywhere = unit_edges(module_level=True), unit_edges(module_level=False)
    lazy = anywhere - eager
    if not every_import:
        eager, lazy = {e for e in eager if not implied(eager, *e)}, {e for e in lazy if not implied(anywhere, *e)}
    for a, b in sorted(eager | lazy, key=lambda e: (rank[e[0]], order[e[0]], rank[e[1]], order[e[1]])):
        lines.append(f"    {a} {'-->' if (a, b) in eager else '-.->'} {b}")
    lines.append("```")
    return "\n".join(lines)


if __name__ == "__main__":
    print(mermaid(every_import="--all" in sys.argv[1:]))
