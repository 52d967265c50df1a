"""The layout the architecture rests on (ARCHITECTURE.md): one package per op, and kernels that import nothing
of the ops above them (no import cycles anywhere: tests/test_import_cycles.py).

Imports are read from the sources (ast), function bodies included for the kernels rule; importing
``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, as Python does. One fresh process then imports
every module in two orders, so any import-time error fails.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The installed package's folders (pyproject's package-dir): fastcomp.kernels is kernels/, fastcomp.csrc csrc/.
PACKAGE_DIRS = {"fastcomp": ROOT / "fastcomp", "fastcomp.kernels": ROOT / "kernels", "fastcomp.csrc": ROOT / "csrc"}
OPS = ("attention", "disk_mask", "ddn", "probe_demux")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(module: str, path: pathlib.Path, modules, *, module_level_only: bool) -> set[str]:
    """The modules of the package that ``module`` imports (targets resolved to submodules where they are)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()

    def resolve(level: int, name):
        if level == 0:
            return name
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (level - 1)]
        return ".".join(base + ([name] if name else []))

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = resolve(node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
            elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                    visit(block)
            elif not module_level_only and isinstance(node, ast.AST):
                visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text()).body)
    targets = {t for t in targets if t in modules and t != module}
    own = {".".join(module.split(".")[:k]) for k in range(1, module.count(".") + 2)}
    for t in list(targets):  # importing a.b.c runs the __init__ of a and a.b first
        parts = t.split(".")
        targets.update(a for a in (".".join(parts[:k]) for k in range(1, len(parts))) if a in modules and a not in own)
    return targets


def test_kernels_import_nothing_above_them():
    """kernels/ (Triton) is the lowest layer: it may use the build cache's location (fastcomp._build), never
    the ops, the registry, the references or anything built on them; not even in a function body."""
    modules = _modules()
    bad = {}
    for m, p in modules.items():
        if m.startswith("fastcomp.kernels"):
            above = {t for t in _imports(m, p, modules, module_level_only=False)
                     if not t.startswith("fastcomp.kernels") and t not in ("fastcomp", "fastcomp._build")}
            if above:
                bad[m] = sorted(above)
    assert not bad, bad


def test_one_place_per_op():
    """Each op: fastcomp/ops/<op>/ with its public function, reference and custom ops; its C++ in csrc/<op>/;
    its Triton kernels in kernels/<op>.py (every op here has a triton backend)."""
    for op in OPS:
        folder = ROOT / "fastcomp" / "ops" / op
        for name in ("__init__.py", "reference.py", "library.py", "cpu.py", "triton.py"):
            assert (folder / name).is_file(), folder / name
        assert (ROOT / "kernels" / f"{op}.py").is_file(), op
        assert any((ROOT / "csrc" / op).glob("*.cpp")), op
    from fastcomp import _build

    for name, sources in _build.EXTENSIONS.items():
        for source in sources:
            assert (ROOT / "csrc" / source).is_file(), source
            if name != "cuda":
                assert source.startswith(f"{name}/"), (name, source)


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_process():
    names = sorted(_modules())
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')\n"
    for order in (names, names[::-1]):
        run = subprocess.run([sys.executable, "-c", script, *order], capture_output=True, text=True, timeout=300,
                             cwd=ROOT)
        assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
