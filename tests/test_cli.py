"""The `fastcomp` command line and the README's two commands."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

from fastcomp import backends
from fastcomp.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_info_lists_every_backend_with_its_status(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for op in backends.ops():
        assert op in out
    assert "torch" in out and "extension cache" in out
    assert re.search(r"local_conditional_attention\s+reference\s+ok", out)


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_console_script_runs():
    res = subprocess.run([sys.executable, "-m", "fastcomp.cli", "info"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "backends" in res.stdout


def readme_block(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {name} -->\s*```bash\n(.*?)\n```\s*<!-- /{name} -->", text, re.S)
    assert m, f"README.md lost its {name} block"
    return m.group(1).strip()


def test_readme_commands_install_torch_pinned_and_ci_runs_the_test_command():
    for name, runs in (("main-command", "fastcomp bench"), ("test-command", "python -m pytest")):
        cmd = readme_block(name)
        assert "\n" not in cmd, f"{name} must be one command"
        assert "pip install torch==2.13.0" in cmd and cmd.endswith(runs)
        assert re.search(r"pip install (?!torch==)\S*torch\b", cmd) is None  # never an unpinned torch
    assert "test-command" in (ROOT / ".ci" / "run").read_text()
