"""No import cycles inside the fastcomp package.

The graph is read from the source (ast), not by importing: an edge M -> N for every top-level import in
M (module level, including under `if`/`try`, not inside functions or classes) of a fastcomp module N, and
for every package __init__ that importing N runs first (N's parent packages that are not also M's: those
are already being imported when M runs). `from P import name` points at P.name when that is a module,
else at P itself, also when P encloses M (`from . import f` in P.m while P's __init__ imports P.m is a
cycle: it works only while __init__ defines f before that import). A cycle is reported with its path,
e.g. fastcomp.a -> fastcomp.b -> fastcomp.a.

Imports inside functions are not edges: the few left in the package defer heavy optional packages
(matplotlib, diffusers, natten, triton) or the compiled extensions, never a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each importable name of the package lives in the source tree (pyproject's package-dir).
PACKAGE_DIRS = {"fastcomp": ROOT / "fastcomp", "fastcomp.kernels": ROOT / "kernels"}


def modules(package_dirs: dict[str, Path] = PACKAGE_DIRS) -> dict[str, Path]:
    found = {}
    for prefix, folder in package_dirs.items():
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


def import_graph(package_dirs: dict[str, Path] = PACKAGE_DIRS) -> dict[str, set[str]]:
    mods = modules(package_dirs)
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
        own = set(_parents(name)) | {name}
        edges = set()
        for target in targets:
            if target not in mods:
                continue  # outside the package (torch, numpy, ...)
            # The target itself, even an enclosing package (`from .. import name` reads its __init__), and
            # the parent packages importing it runs, except those already running when this module runs.
            edges.update(t for t in _parents(target) if t in mods and t not in own)
            if target != name:
                edges.add(target)
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
    assert find_cycle({"p": {"p.a"}, "p.a": {"p.b"}, "p.b": set()}) is None


def test_detector_reads_package_imports(tmp_path):
    """The two cycles the package had: a submodule reading a name from its own package's __init__ (which
    imports the submodule), and a module importing p.types, which runs p's __init__ that imports it back."""
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "__init__.py").write_text("from .noise import g\ndef f(): pass\n")
    (tmp_path / "p" / "noise.py").write_text("from . import f\n\ndef g():\n    from . import f\n")
    assert find_cycle(import_graph({"p": tmp_path / "p"})) == ["p", "p.noise", "p"]
    (tmp_path / "p" / "noise.py").write_text("def g():\n    from . import f  # inside a function: no edge\n")
    assert find_cycle(import_graph({"p": tmp_path / "p"})) is None
    (tmp_path / "p" / "__init__.py").write_text("from .fast import run\n")
    (tmp_path / "p" / "fast.py").write_text("from p.ref import spec\n")
    (tmp_path / "p" / "ref.py").write_text("try:\n    from q.types import T\nexcept ImportError:\n    pass\n")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "__init__.py").write_text("from .types import T\nfrom p import run\n")
    (tmp_path / "q" / "types.py").write_text("T = int\n")
    dirs = {"p": tmp_path / "p", "q": tmp_path / "q"}
    assert find_cycle(import_graph(dirs)) == ["p", "p.fast", "p.ref", "q", "p"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
