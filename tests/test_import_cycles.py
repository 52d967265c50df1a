"""No import cycles inside the fastcomp package.

The graph is read from the source (ast), not by importing: an edge M -> N for every top-level import in
M (module level, including under `if`/`try`, not inside functions or classes) of a fastcomp module N, and
for every package __init__ that importing N runs first (N's parent packages that are not also M's: those
are already being imported when M runs). `from P import name` points at P.name when that is a module,
else at P itself. A cycle is reported with its path, e.g. fastcomp.a -> fastcomp.b -> fastcomp.a.

Imports inside functions are not edges: the few left in the package defer heavy optional packages
(matplotlib, diffusers, natten, triton) or the compiled extensions, never a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each importable name of the package lives in the source tree (pyproject's package-dir).
PACKAGE_DIRS = {"fastcomp": ROOT / "fastcomp", "fastcomp.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _top_level_imports(tree: ast.Module):
    """Import nodes that run when the module is imported: module body, descending into if/try/with."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    stack.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in _top_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.add(sub if sub in mods else source)
        edges = set()
        for target in targets:
            if target not in mods:
                continue  # outside the package (torch, numpy, ...)
            own = set(_parents(name)) | {name}
            edges.update(t for t in (*_parents(target), target) if t in mods and t not in own)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One cycle as a list of modules [a, b, ..., a], or None (iterative depth-first search)."""
    state = dict.fromkeys(graph, 0)  # 0 new, 1 on the current path, 2 done
    for start in sorted(graph):
        if state[start]:
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def test_graph_is_read():
    graph = import_graph()
    assert "fastcomp.probe" in graph and "fastcomp.kernels" in graph
    assert "fastcomp.ops" in graph["fastcomp"], "the parser lost the package's own imports"


def test_detector_finds_a_cycle():
    graph = {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.a"}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
