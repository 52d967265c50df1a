"""`fastcomp bench`: the CLI writes valid JSON/CSV, lists its cases, refuses bad options; the harness
measures sensible times and memory. Fast (a few seconds): only the disk_mask quick case is run."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch

from helpers import assert_close

from fastcomp.bench import cases, harness
from fastcomp.cli import main


def test_bench_quick_disk_mask_writes_json_and_csv(tmp_path, capsys):
    rc = main(["bench", "--quick", "--op", "disk_mask", "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    jsons = list(tmp_path.glob("bench-*.json"))
    csvs = list(tmp_path.glob("bench-*.csv"))
    assert len(jsons) == 1 and len(csvs) == 1
    assert not list(tmp_path.glob("*.png"))  # --no-plot
    assert jsons[0].stem == csvs[0].stem

    data = json.loads(jsons[0].read_text())
    for key in ("device", "torch", "triton", "commit", "timestamp_utc"):
        assert data["environment"][key]
    rows = data["results"]
    ref = [r for r in rows if r["provider"] == "reference"]
    assert len(ref) == 1 and ref[0]["op"] == "disk_mask" and ref[0]["mode"] == "fwd"
    assert ref[0]["speedup_vs_reference"] == pytest.approx(1.0)
    for r in rows:
        assert set(harness.COLUMNS) <= set(r)
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    # Every registered backend is accounted for: measured, or skipped with a reason.
    skipped = {s["provider"]: s["reason"] for s in data["skipped"]}
    assert all(reason for reason in skipped.values())
    from fastcomp import backends

    assert {b.name for b in backends.backends("disk_mask")} == {r["provider"] for r in rows} | set(skipped)

    with csvs[0].open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == harness.COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows)
    assert float(next(r for r in csv_rows if r["provider"] == "reference")["median_ms"]) > 0

    out = capsys.readouterr().out
    assert "median ms" in out and "p20-p80" in out and "disk_mask" in out
    assert str(jsons[0]) in out and str(csvs[0]) in out


def test_bench_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for op in cases.OPS:
        assert op in out
    assert "fwd+bwd" in out and "reference" in out


def test_bench_list_quick_one_op(capsys):
    assert main(["bench", "--list", "--quick", "--op", "ddn_select,ddn_gather"]) == 0
    out = capsys.readouterr().out
    assert "ddn_select" in out and "ddn_gather" in out and "disk_mask" not in out


def test_bench_bad_op_is_a_clear_error(tmp_path, capsys):
    rc = main(["bench", "--op", "flash_attention", "--out", str(tmp_path)])
    assert rc != 0
    err = capsys.readouterr().err
    assert "flash_attention" in err and "local_conditional_attention" in err  # names the valid choices
    assert not list(tmp_path.iterdir())


def test_bench_bad_option_returns_nonzero(capsys):
    assert main(["bench", "--dtype", "int8"]) != 0
    assert "int8" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_bench_cuda_without_gpu_is_a_clear_error(capsys):
    assert main(["bench", "--device", "cuda", "--op", "disk_mask"]) != 0
    assert "--device cpu" in capsys.readouterr().err


def test_time_fn_orders_percentiles_and_adapts_repeats():
    def sleepy():
        time.sleep(0.002)

    t = harness.time_fn(sleepy, budget_s=0.05)
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms
    assert 1.5 <= t.median_ms < 50
    assert 3 <= t.repeats <= 30  # ~0.05 s / 2 ms, clamped below by min_repeats

    tiny = harness.time_fn(lambda: None, budget_s=0.01)
    assert tiny.repeats > t.repeats  # a cheap call gets more samples in a smaller budget

    fixed = harness.time_fn(sleepy, repeats=4)
    assert fixed.repeats == 4


def test_percentile():
    assert harness.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert harness.percentile([1.0, 2.0], 0) == 1.0
    assert harness.percentile([1.0, 2.0], 100) == 2.0
    assert harness.percentile([0.0, 10.0], 20) == pytest.approx(2.0)


def test_cpu_peak_memory_sees_an_allocation():
    peak = harness.peak_memory_mb(lambda: torch.ones(1_000_000), "cpu")  # 4 MB of float32
    assert peak is not None and peak >= 4e6 / 2**20

    def temporary():  # freed before returning: still counted at its peak
        x = torch.ones(2_000_000)
        return float(x.sum())

    assert harness.peak_memory_mb(temporary, "cpu") >= 8e6 / 2**20


def test_speedups_and_table():
    rs = [harness.Result("op", "reference", "s", "float32", "fwd", 10.0, 9.0, 11.0, 1.0),
          harness.Result("op", "cpu", "s", "float32", "fwd", 2.0, 1.9, 2.1, None),
          harness.Result("op", "triton", "s", "float32", "fwd", note="no CUDA device")]
    harness.fill_speedups(rs)
    assert rs[0].speedup_vs_reference == pytest.approx(1.0)
    assert rs[1].speedup_vs_reference == pytest.approx(5.0)
    assert rs[2].speedup_vs_reference is None
    table = harness.format_table(rs)
    assert "5.00x" in table and "no CUDA device" in table


def test_device_slug_and_commit(tmp_path):
    assert harness.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.slug("AMD EPYC (2 threads)") == "amd-epyc"
    assert harness.git_commit(str(tmp_path)) == "unknown"  # not a repository
    assert harness.git_commit()  # the fastcomp sources: a short hash, or "unknown" outside a checkout


def test_a_failing_provider_is_reported_not_fatal():
    from fastcomp.bench import runner

    def broken_build():
        def fn():
            raise RuntimeError("peer exploded\nlong traceback text")
        return fn

    case = cases.Case(
        "disk_mask", "fake", "fwd",
        make_inputs=lambda device, dtype: {},
        make_providers=lambda inp, options: [
            cases.Provider("reference", build=lambda: (lambda: torch.zeros(10))),
            cases.Provider("peer", build=broken_build),
            cases.Provider("missing", skip="not installed"),
        ],
        provider_names=lambda: ["reference", "peer", "missing"])
    rs = runner.run_case(case, torch.device("cpu"), torch.float32, cases.Options(), budget_s=0.01, repeats=None)
    by = {r.provider: r for r in rs}
    assert by["reference"].measured
    assert not by["peer"].measured and by["peer"].note == "failed: RuntimeError: peer exploded"
    assert by["missing"].note == "not installed"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("tile", [None, (4, 8)], ids=["row-major", "tiled4x8"])
def test_flex_attention_peer_computes_the_same_attention_as_the_reference(tile):
    """The peer must compute our op, or the benchmark compares different work: eager flex_attention with the
    benchmark's block mask equals the float64 reference, borders, conditioners and padding included, in
    row-major and in tile-major token order (gpu_check's NATTEN-style peer)."""
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
    import fastcomp
    from fastcomp.reference import local_conditional_attention_reference

    B, H, W, heads, D, M, kernel = 2, 13, 17, 2, 16, 5, 5
    if tile is not None:
        H, W = 12, 16
    q, k, v = (torch.randn(B, H, W, heads, D, dtype=torch.float64) for _ in range(3))
    cond_k, cond_v = (torch.randn(B, M, heads, D, dtype=torch.float64) for _ in range(2))
    cond_mask = fastcomp.disk_mask(torch.rand(B, M, 2) * torch.tensor([H, W]), 4.0, H, W)
    cond_mask[1, 2:] = False  # item 1 has fewer real conditioners
    order = None if tile is None else cases.tile_major_order(H, W, tile)
    block_mask = cases.flex_block_mask(cond_mask, H, W, kernel, device="cpu", order=order)
    out = cases.flex_local_conditional_attention(flex_attention, q, k, v, cond_k, cond_v, block_mask, order)
    ref = local_conditional_attention_reference(q, k, v, (kernel, kernel), cond_k, cond_v, cond_mask)
    assert_close(out, ref)


@pytest.mark.parametrize("device, size, compiled", [("cuda", 8, True), ("cpu", 8, False), ("cpu", 128, True)])
def test_flex_block_mask_is_compiled_where_its_dense_build_is_large(monkeypatch, device, size, compiled):
    """Uncompiled, create_block_mask holds int64 intermediates of B * N * (N + M) elements (~8.6 GB each at
    B4 128x128): built with _compile=True on CUDA, and on CPU once they would pass 1 GiB."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    seen = {}

    def fake_create_block_mask(mask_mod, B, H, Q, KV, device=None, _compile=False, **kw):
        seen.update(B=B, Q=Q, KV=KV, device=str(device), compile=_compile)
        return "block mask"

    monkeypatch.setattr(fa, "create_block_mask", fake_create_block_mask)
    cond_mask = torch.zeros(4, 16, size, size, dtype=torch.bool)  # built on CPU; only its shape matters here
    assert cases.flex_block_mask(cond_mask, size, size, 3, device=device) == "block mask"
    assert seen == dict(B=4, Q=size * size, KV=size * size + 16, device=device, compile=compiled)


def test_attention_share_uses_the_better_matmul_sample_and_says_when_the_load_changed(monkeypatch):
    """A matmul sample taken in a loaded second would double every share: the report takes the higher of
    the samples before and after the cases, and says so when they are far apart."""
    from types import SimpleNamespace

    from fastcomp.bench import attention_extras

    size = cases.AttnSize(2, 64, 64, 4, 32, 7, 8)
    case = SimpleNamespace(op=attention_extras.OP, size=size, name=f"{attention_extras.OP} [{size.label}] fwd")
    result = harness.Result(attention_extras.OP, "cpu", size.label, "float32", "fwd", median_ms=10.0)
    monkeypatch.setattr(attention_extras, "matmul_gflops", lambda device: 50.0)
    monkeypatch.setattr(attention_extras, "memory_scaling", lambda device: None)
    out, lines = attention_extras.report([case], [result], torch.device("cpu"), matmul_before=100.0)
    assert out["matmul_float32_gflops"] == 100.0 and out["matmul_samples_gflops"] == [100.0, 50.0]
    share = attention_extras.attention_flops(size, "fwd") / 1e-2 / 1e9 / 100.0
    assert out["providers"][0]["fraction_of_matmul"] == round(share, 4)
    assert any("load changed" in line for line in lines)
    _, quiet = attention_extras.report([case], [result], torch.device("cpu"), matmul_before=52.0)
    assert not any("load changed" in line for line in quiet)
