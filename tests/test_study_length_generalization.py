"""`fastcomp study length-generalization`: the --quick pipeline (every design x labelling x intervention:
train, sample 0..4 objects, score, recall, extras, probes, correlation, tables, figures), its cache (a
second run trains nothing), and the statistics. Pipeline only: a 4-step model generates nothing."""

from __future__ import annotations

import json
import math

import pytest

from fastcomp import cli
from fastcomp.study import length_generalization as study

pytest.importorskip("matplotlib", reason="the study draws its figure and sample grids with matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


def test_study_quick_pipeline_then_resumes_from_its_cache(tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    assert cli.main(["study", "length-generalization", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in results["models"]]
    assert names == [s.name for s in study.plan(study.DEFAULT_VARIANTS, 1)] and len(names) == 17
    for row in ("| tokens-rope/one | tokens-rope | one |", "| tokens-rope+local-cond/one | tokens-rope+local-cond |",
                "| unet+local-cond/all |", "| vector/one |", "| local/one | local | one |"):
        assert row in printed
    K = results["settings"]["max_objects_eval"]
    for m in results["models"]:
        assert sorted(m["counts"], key=int) == [str(k) for k in range(K + 1)]
        for k, c in m["counts"].items():
            assert 0.0 <= c["score"] <= 1.0 and c["extras"] >= 0.0
            assert (c["recall"] is None) == (k == "0")  # no requests, no recall
        assert len(m["probes"]["pixel"]) == len(results["probe_settings"]["sigmas"])
        assert 0.0 <= m["probes"]["cond_inside_fraction"] <= 1.0
        assert set(m["timings"]) == {"train", "sample", "probe"} and m["timings"]["train"]["cpu"] > 0
    # the local model and the token interventions see only the conditioners near each token
    by_name = {m["name"]: m for m in results["models"]}
    assert by_name["local/one"]["probes"]["cond_inside_fraction"] > 0.99
    assert set(results["correlation"]) == {"all models", "one-label models"}
    assert results["time"]["cpu_seconds"] > 0 and results["models_cached"] == 0
    md = (out / "results.md").read_text()
    assert "Spearman rho" in md and "### Recall" in md and "### Extras" in md
    for png in ["generalization-vs-locality.png"] + [f"samples-{v}.png" for v in study.DEFAULT_VARIANTS]:
        assert (out / png).read_bytes()[:8] == PNG
    assert (out / "cache" / ".gitignore").read_text().strip().endswith("*")

    # a second run (here of one design) finds every model in the cache and trains nothing, and keeps the notes
    (out / "results.md").write_text(md + "\n## Notes (written after the run)\n\n- kept\n")
    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(study, "train_model", no_training)
    assert cli.main(["study", "length-generalization", "--quick", "--out", str(out), "--variants", "unet",
                     "--no-progress"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["models_cached"] == 4 and [m["name"] for m in again["models"]] == names[8:12]
    assert again["models"][0]["counts"] == by_name["unet/all"]["counts"]
    md = (out / "results.md").read_text()
    assert md.endswith("## Notes (written after the run)\n\n- kept\n") and "| unet/all |" in md
    assert "| vector/one |" not in md


def test_study_plan_seeds_repeat_the_one_label_rows():
    specs = study.plan(study.DEFAULT_VARIANTS, 2)
    assert len(specs) == 17 + 9
    assert {s.seed for s in specs if s.labelling == "all"} == {0}
    assert sum(s.seed == 1 for s in specs) == 9 and len({s.slug for s in specs}) == len(specs)


def test_study_rejects_bad_options(capsys):
    assert cli.main(["study", "length-generalization", "--variants", "mlp", "--no-progress"]) == 2
    assert "mlp" in capsys.readouterr().err
    assert cli.main(["study", "length-generalization", "--seeds", "0", "--no-progress"]) == 2
    assert cli.main(["study", "length-generalization", "--jobs", "0", "--no-progress"]) == 2
    assert cli.main(["study", "nonesuch"]) == 2


def test_spearman_and_its_bootstrap_interval():
    assert study.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert study.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert study._ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    # ties averaged: the Pearson correlation of the ranks (1, 2, 3.5, 3.5) and (1, 2, 3, 4)
    assert study.spearman([1, 2, 5, 5], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(study.spearman([1, 1, 1], [1, 2, 3]))
    x = [0.1, 0.2, 0.3, 0.5, 0.6, 0.8, 0.9, 1.0]
    y = [0.0, 0.1, 0.05, 0.3, 0.2, 0.6, 0.7, 0.65]
    c = study.correlation(x, y, n_boot=500)
    assert c["low"] <= c["rho"] <= c["high"] <= 1.0 and c["n"] == 8 and 0 < c["used"] <= 500


def test_study_jobs_train_in_helper_processes_and_give_the_same_results(tmp_path):
    """--jobs 2: a helper process trains models into the shared cache from the middle of the list while the
    main one starts at the top; the results equal a one-process run's (training is seeded per model)."""
    common = ["study", "length-generalization", "--quick", "--variants", "local,vector", "--no-progress"]
    assert cli.main(common + ["--out", str(tmp_path / "one")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert [m["name"] for m in one["models"]] == [m["name"] for m in two["models"]]
    assert [m["counts"] for m in one["models"]] == [m["counts"] for m in two["models"]]
