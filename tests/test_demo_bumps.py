"""`fastcomp demo bumps --quick`: the whole pipeline (train, sample at held-out and seen locations, score,
table, JSON, figure) in seconds. Pipeline only: a 30-step model is not expected to be accurate."""

from __future__ import annotations

import json

import pytest

from fastcomp import cli

pytest.importorskip("matplotlib", reason="the demo draws its sample grids with matplotlib")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: see conftest.one_thread


def test_demo_bumps_quick_pipeline(tmp_path, capsys):
    out = tmp_path / "bumps"
    assert cli.main(["demo", "bumps", "--quick", "--locality", "both", "--steps", "12", "--out", str(out),
                     "--no-progress", "--checkpoints", "--samples", "6", "--sampler-steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "| local | held-out |" in printed and "| global | seen |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["steps"] == 12 and results["quick"] is True
    assert [m["locality"] for m in results["models"]] == ["local", "global"]
    for m in results["models"]:
        assert set(m["splits"]) == {"held-out", "seen"}
        for r in m["splits"].values():
            assert 0.0 <= r["accuracy"] <= r["one_bump"] <= 1.0 and r["n"] == 6
    assert "| model | split |" in (out / "results.md").read_text()
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints-local").iterdir()) == [
        "checkpoint-00000012.json", "checkpoint-00000012.safetensors"]


def test_demo_bumps_is_listed_and_checks_its_options(capsys):
    assert cli.main(["demo", "--help"]) == 0
    assert "bumps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["demo", "bumps", "--locality", "nowhere"])
