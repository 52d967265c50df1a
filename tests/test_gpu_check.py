"""benchmarks/gpu_check.sh, the prepared GPU check, in its smoke mode: every section on CPU under the Triton
interpreter at tiny sizes (FASTCOMP_GPU_SMOKE=1), so the script a GPU machine runs once, with no network and
little time, has run here first: its sections, its budgets, the files it leaves in $OUT."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPECTED = {"check.log", "pytest.txt", "junit.xml", "bench.json", "bench.txt", "profile.txt", "triton_meta.json"}


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, FASTCOMP_GPU_SMOKE="1", OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    log = (out / "check.log").read_text() if (out / "check.log").exists() else ""
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{log[-3000:]}"

    # at most 8 flat files: what the device tool brings back
    files = sorted(p.name for p in out.iterdir())
    assert set(files) == EXPECTED and all((out / f).is_file() for f in files), files
    assert len(files) <= 8

    for section in ("install", "build", "info", "tests", "env", "lca", "ddn", "flex", "profile", "bench"):
        assert f"] {section}:" in log, f"section {section} missing from check.log:\n{log[-2000:]}"
    suite = ET.parse(out / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    assert int(suite.get("tests")) >= 1 and int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0

    bench = json.loads((out / "bench.json").read_text())
    assert "errors" not in bench, bench.get("errors")
    assert bench["env"]["smoke"] is True
    lca = bench["lca"]
    assert set(lca["rel_rms_vs_fp32_reference"]) == {"out", "dq", "dk", "dv", "dcond_k", "dcond_v"}
    assert all(e["ok"] for e in lca["rel_rms_vs_fp32_reference"].values()), lca["rel_rms_vs_fp32_reference"]
    times = dict(lca["times"], **bench["flex"]["times"])
    for key in ("ours fwd", "ours fwd+bwd", "reference_masked_sdpa fwd", "reference_masked_sdpa fwd+bwd",
                "sdpa_unmasked_all_keys fwd", "flex_rowmajor fwd", "flex_tiled4x4 fwd"):
        assert "ms" in times.get(key, {}), (key, times.get(key), bench["flex"])
    # the peer computes our function, in either token order
    assert bench["flex"]["flex_rowmajor_rel_rms_vs_ours"] < 2e-2
    assert bench["flex"]["flex_tiled4x4_rel_rms_vs_ours"] < 2e-2
    for cin in ("Cin64", "Cin128"):
        ddn = bench["ddn"][cin]
        assert ddn["triton"]["index_mismatches"] == 0, ddn["triton"]
        assert "skip" in ddn["cuda"]  # no CUDA here: skipped with its reason, not failed
        assert {"triton distances kernel", "reference fwd+bwd", "triton fwd", "triton fwd+bwd"} <= set(ddn["times"])
    assert "ddn_select" in (out / "profile.txt").read_text() or "ddn" in (out / "profile.txt").read_text()
    assert json.loads((out / "triton_meta.json").read_text()) == []  # interpreted: nothing compiled
    # the short table comes last, where a remote run's output tail shows it
    assert "LCA B1 8x8" in proc.stdout and "DDN B2" in proc.stdout
