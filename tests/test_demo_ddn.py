"""`fastcomp demo ddn --quick`: the whole demo pipeline in seconds, writing its PNGs."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fastcomp import cli

pytest.importorskip("sklearn", reason="the DDN demo trains on scikit-learn's digits: pip install scikit-learn")

PNGS = ["samples.png", "reconstructions.png", "guided_superres.png", "guided_inpainting.png",
        "hit_frequencies.png"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: see conftest.one_thread


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])  # IHDR width, height


def test_demo_ddn_quick_writes_its_pngs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "ddn", "--quick", "--out", str(out), "--steps", "24"]) == 0
    for name in PNGS:
        w, h = _png_size(out / name)
        assert w > 16 and h > 16
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 24 and metrics["final_train_loss"] > 0
    for key in ("hit_spread_before_split_and_prune", "hit_spread_after_split_and_prune"):
        assert len(metrics[key]["max_minus_min_times_K"]) == metrics["config"]["layers"]
    assert "final loss" in capsys.readouterr().err


def test_demo_router(capsys):
    assert cli.main(["demo", "--help"]) == 0
    assert "ddn" in capsys.readouterr().out
    assert cli.main(["demo", "nope"]) == 2
    assert "unknown demo" in capsys.readouterr().err
    assert "demo" in (cli.USAGE)
