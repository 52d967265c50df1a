"""`fastcomp demo length-generalization --quick`: the whole pipeline (train exp1-3, sample 0..k objects with
both samplers, score, probe locality, table, JSON, figures) in well under 2 minutes. Pipeline only: a
12-step model is not expected to generate anything."""

from __future__ import annotations

import json

import pytest

from fastcomp import cli

pytest.importorskip("matplotlib", reason="the demo draws its sample grids with matplotlib")


def test_demo_length_generalization_quick_pipeline(tmp_path, capsys):
    out = tmp_path / "lg"
    assert cli.main(["demo", "length-generalization", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for row in ("| exp1 | global | all | heun |", "| exp2 | global | one | heun |", "| exp3 | local | one | heun |",
                "| exp3+composed | local | one | composed |"):
        assert row in printed
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["settings"]["steps"] == 12
    assert results["settings"]["global_rope"] is True
    assert set(results["scores"]) == {"exp1", "exp2", "exp2+composed", "exp3", "exp3+composed"}
    for scores in results["scores"].values():
        assert sorted(scores, key=int) == [str(k) for k in range(results["settings"]["max_objects_eval"] + 1)]
        assert all(0.0 <= c["score"] <= 1.0 for c in scores.values())
    for name in ("exp1", "exp2", "exp3"):
        probe = results["probes"][name]
        assert len(probe["pixel"]) == len(results["probe_settings"]["sigmas"])
        assert 0.0 <= probe["cond_inside_fraction"] <= 1.0
    assert "| experiment |" in (out / "results.md").read_text()
    for png in ("samples.png", "locality.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_length_generalization_rejects_unknown_experiments(capsys):
    assert cli.main(["demo", "length-generalization", "--experiments", "exp9", "--no-progress"]) == 2
    assert "exp9" in capsys.readouterr().err


def test_demo_length_generalization_without_global_rope(tmp_path, monkeypatch):
    """--no-global-rope builds the global models with ConditionalDenoiser(rope=False) and says so."""
    from fastcomp.models import ConditionalDenoiser

    built = []
    original_init = ConditionalDenoiser.__init__

    def recording_init(self, **kwargs):
        built.append(kwargs)
        original_init(self, **kwargs)

    monkeypatch.setattr(ConditionalDenoiser, "__init__", recording_init)
    out = tmp_path / "lg"
    assert cli.main(["demo", "length-generalization", "--quick", "--experiments", "exp1", "--no-global-rope",
                     "--no-probes", "--no-composed", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["global_rope"] is False
    assert [kw["rope"] for kw in built if kw.get("locality") == "global"] == [False]
    assert "without a 2-D rotary position embedding" in (out / "results.md").read_text()
