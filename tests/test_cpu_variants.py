"""The C++ kernels on every CPU target, not just the one the suite was built for.

The rest of the suite runs the extensions built for FASTCOMP_MARCH (native by default). Kernels whose
vector width and register tiles follow the instruction set (csrc/simd.h) can break on a target nobody
builds: a 64-byte vector pinned to an AVX register does not compile for AVX2, tiles sized for 32
registers spill on 16, std::fma without FMA hardware is a software call. So here every op family is also
built for x86-64-v3 (AVX2 + FMA) and for the compiler's default target (SSE2 on x86-64), plus x86-64-v4
when the suite's own build is not AVX-512 already, and each build runs the C++ backends against the
float64 reference: attention forward and all five gradients on the odd-size grid of
test_attention_backends.py, every DDN kernel on the sizes of test_ddn_cpu_kernels.py (that module is
parametrized over the same variants), probe_demux and disk_mask. The dispatch build (one library per
variant, the best one picked at load time) and the per-family failure isolation are tested at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastcomp
from fastcomp import _build
from fastcomp import backends as _b
from helpers import assert_close, extra_cpu_variants
from test_attention_backends import CASES, _compare, _problem

FAMILIES = ("attention", "ddn", "probe_demux", "disk_mask")
needs_compiler = pytest.mark.skipif(_build.compiler_problem() is not None,
                                    reason=f"cannot compile C++ here: {_build.compiler_problem()}")


VARIANTS = extra_cpu_variants()


@contextlib.contextmanager
def loaded(modules: dict):
    """The public ops' cpu backends use these extension modules (one per family) inside the block."""
    saved = {name: _build._loaded.get(name) for name in modules}
    _build._loaded.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                _build._loaded.pop(name, None)
            else:
                _build._loaded[name] = module


@pytest.fixture(scope="module", params=VARIANTS, ids=[v.name for v in VARIANTS])
def variant(request):
    """(variant, {family: module}) for each extra target; a target this CPU cannot run is compiled only."""
    if _build.compiler_problem() is not None:
        pytest.skip(f"cannot compile C++ here: {_build.compiler_problem()}")
    v = request.param
    return v, {name: _build.build(name, variant=v) for name in FAMILIES}


@pytest.fixture
def runnable(variant):
    v, modules = variant
    problem = _build.cpu_problem(v)
    if problem:
        pytest.skip(f"built, but this CPU cannot run {v.name} code: {problem}")
    with loaded(modules):
        yield v, modules


def test_each_build_is_for_its_target(variant):
    v, modules = variant
    if _build.cpu_problem(v):
        # compiled, but none of its code may run on this CPU (build_info would die of SIGILL, as it did on an
        # AVX2 machine): check what its compile was asked for instead
        for name, module in modules.items():
            stamp = json.loads((Path(module.__file__).parent / "fastcomp-build.json").read_text())
            assert all(f in stamp["flags"]["extra_cflags"] for f in v.flags), (name, stamp["flags"])
        return
    expected_bytes = {"x86-64-v3": 32, "x86-64-v4": 64, "default": 16 if _build._is_x86_64() else None}[v.name]
    for name, module in modules.items():
        info = module.build_info()
        assert info["variant"] == v.ident, (name, info)
        if expected_bytes is not None:
            assert info["vector_bytes"] == expected_bytes, (name, info)
        if v.name == "default" and _build._is_x86_64():
            assert "AVX" not in info["simd"] and "FMA" not in info["simd"], (name, info)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_{}x{}_h{}_d{}_k{}x{}_M{}".format(*c[:5], *c[5], c[6]))
def test_attention_matches_reference_float64(runnable, case):
    B, H, W, heads, D, kernel, M = case
    calls = []
    module = runnable[1]["attention"]
    forward = module.local_attention_forward_cpu

    def counting(*args):
        calls.append(1)
        return forward(*args)

    with _patched_attr(module, "local_attention_forward_cpu", counting):
        _compare(_problem(B, H, W, heads, D, M=M, cond=M > 0), kernel, "cpu", torch.float64)
    assert calls, "the variant's kernel did not run"


@pytest.mark.parametrize("D", [16, 32, 13])
def test_attention_float32(runnable, D):
    # whole register transposes (D a multiple of the lanes) and their edges, a row wider than two vectors
    _compare(_problem(2, 11, 37, 2, D, M=5), (5, 7), "cpu", torch.float32)


def test_ddn_select_and_gather(runnable):
    from fastcomp.reference import ddn_gather_reference, ddn_select_reference

    g = torch.Generator().manual_seed(3)
    # fused small-K path (Cin 10: 3x3 tiles leave one row, 4x4 tiles two) and the batched path (K Cin^2/2 > 2^18)
    for B, Cin, Cout, K, H, W in ((3, 10, 3, 5, 7, 9), (2, 64, 3, 140, 3, 5)):
        for dtype in (torch.float64, torch.float32):
            f = torch.randn(B, Cin, H, W, generator=g, dtype=dtype)
            w = torch.randn(K, Cout, Cin, generator=g, dtype=dtype) * Cin ** -0.5
            bias = torch.randn(K, Cout, generator=g, dtype=dtype) * 0.3
            r, t = (torch.randn(B, Cout, H, W, generator=g, dtype=dtype) for _ in range(2))
            leaves = [x.clone().requires_grad_() for x in (f, w, bias)]
            got = fastcomp.ddn_select(*leaves[:2], t, bias=leaves[2], residual=r, backend="cpu")
            ref = ddn_select_reference(f.double(), w.double(), t.double(), bias.double(), r.double(), "l2")
            assert torch.equal(got.index, ref[1]), (B, Cin, K, dtype)
            assert_close(got.output, ref[0], name=f"ddn_select output {dtype}")
            d_out = torch.randn(got.output.shape, generator=g, dtype=dtype)
            grads = torch.autograd.grad(got.output, leaves, d_out)
            ref_leaves = [x.double().requires_grad_() for x in (f, w, bias)]
            ref_out = ddn_gather_reference(*ref_leaves[:2], got.index, ref_leaves[2], r.double())
            ref_grads = torch.autograd.grad(ref_out, ref_leaves, d_out.double())
            for name, a, b in zip(("features", "weight", "bias"), grads, ref_grads):
                assert_close(a, b, ratio=3e-5 if dtype == torch.float32 else None, name=f"d {name} {dtype}")
            gathered = fastcomp.ddn_gather(f, w, got.index, bias=bias, residual=r, backend="cpu")
            assert_close(gathered, ref_out, name=f"ddn_gather {dtype}")


def test_probe_demux(runnable):
    from fastcomp.ops.probe_demux import probe_demux

    g = torch.Generator().manual_seed(4)
    radius, stride = 2, 5
    for dtype in (torch.float64, torch.float32):
        probes = torch.randn(6, 2, 3, 13, 17, generator=g, dtype=dtype)
        origins = torch.tensor([[i % stride, (2 * i) % stride] for i in range(6)], dtype=torch.int64)
        for transpose in (False, True):
            got = probe_demux(probes, origins, stride=stride, radius=radius, transpose=transpose,
                                     backend="cpu")
            ref = probe_demux(probes, origins, stride=stride, radius=radius, transpose=transpose,
                                     backend="reference")
            for a, b in zip(got, ref):
                assert_close(a, b, ratio=1e-12)


def test_disk_mask(runnable):
    g = torch.Generator().manual_seed(5)
    points = torch.rand(3, 4, 2, generator=g, dtype=torch.float64) * 20 - 2
    points[0, 0] = torch.tensor([5.0, 5.0])  # radius 3: (5, 8) lies exactly on the boundary
    for radius in (0.0, 3.0, 7.5):
        got = fastcomp.disk_mask(points, radius, 13, 17, backend="cpu")
        ref = fastcomp.disk_mask(points, radius, 13, 17, backend="reference")
        assert torch.equal(got, ref), radius


@contextlib.contextmanager
def _patched_attr(obj, name, value):
    """Set obj.name = value inside the block (pybind11 modules take new attributes like any module)."""
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


# --- the dispatch build and failure isolation ---------------------------------------------------------

@needs_compiler
@pytest.mark.skipif(not _build._is_x86_64(), reason="the dispatch build has x86-64 variants only")
def test_dispatch_build_loads_the_best_variant_this_cpu_runs(monkeypatch):
    monkeypatch.setenv("FASTCOMP_MARCH", "dispatch")
    monkeypatch.delenv("FASTCOMP_CPU_VARIANT", raising=False)
    names = [v.name for v in _build.variants()]
    assert names == ["x86-64-v4", "x86-64-v3", "default"]
    best = next(v for v in _build.variants() if _build.cpu_problem(v) is None)
    monkeypatch.setattr(_build, "_loaded", {})
    module = _build.load("disk_mask")
    assert module.build_info()["variant"] == best.ident
    states = {s.variant: s for s in _build.status("disk_mask")}
    assert all(s.state == "built" for s in states.values()), states  # every variant, for other CPUs too
    assert states[best.name].selected

    # FASTCOMP_CPU_VARIANT picks one; a variant this CPU cannot run is refused, never loaded
    monkeypatch.setenv("FASTCOMP_CPU_VARIANT", "default")
    monkeypatch.setattr(_build, "_loaded", {})
    assert _build.load("disk_mask").build_info()["variant"] == "default"
    monkeypatch.setenv("FASTCOMP_CPU_VARIANT", "x86-64-v9")
    with pytest.raises(_build.BuildError, match="not a variant of this build"):
        _build.select_variant("disk_mask")


@needs_compiler
def test_a_variant_this_cpu_cannot_run_is_compiled_but_never_imported(monkeypatch, tmp_path):
    """Importing a library built for instructions this CPU lacks can die of SIGILL in its module's own
    initialization (x86-64-v4 on an AVX2 machine did), so such a build is compiled and linked only, fresh
    or cached, and handed back as a NotLoaded naming the library."""
    monkeypatch.setattr(_build, "cpu_problem", lambda v: "pretend it lacks AVX2" if v == _build.X86_64_V3 else None)
    fresh = _build.build("disk_mask", variant=_build.X86_64_V3, cache=tmp_path)
    cached = _build.build("disk_mask", variant=_build.X86_64_V3, cache=tmp_path)
    for got in (fresh, cached):
        assert isinstance(got, _build.NotLoaded) and os.path.isfile(got.__file__), got.__dict__
    assert fresh.__file__ == cached.__file__ and fresh.__name__ == "fastcomp_disk_mask_x86_64_v3"


def test_variants_follow_fastcomp_march(monkeypatch):
    for setting, expected in (("native", ["native"]), ("", ["default"]), ("x86-64-v3", ["x86-64-v3"]),
                              ("znver3", ["znver3"])):
        monkeypatch.setenv("FASTCOMP_MARCH", setting)
        assert [v.name for v in _build.variants()] == expected, setting
    monkeypatch.delenv("FASTCOMP_MARCH")
    assert _build.variants() == (_build.NATIVE,)
    assert "-march=x86-64-v3" in _build._flags(False, _build.X86_64_V3)["extra_cflags"]
    assert not any(f.startswith("-march") for f in _build._flags(False, _build.DEFAULT)["extra_cflags"])


def test_a_variant_the_cpu_lacks_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(_build, "_is_x86_64", lambda: True)
    monkeypatch.setattr(_build, "_cpu_flags", lambda: frozenset(_build._X86_LEVELS["x86-64-v3"]))
    assert _build.cpu_problem(_build.X86_64_V3) is None
    problem = _build.cpu_problem(_build.X86_64_V4)
    assert "avx512f" in problem and "SIGILL" in problem
    monkeypatch.setenv("FASTCOMP_MARCH", "x86-64-v4")
    with pytest.raises(_build.BuildError, match="no variant .* runs on this CPU.*avx512f"):
        _build.select_variant("ddn")
    monkeypatch.setenv("FASTCOMP_MARCH", "dispatch")
    assert _build.select_variant("ddn")[0] == _build.X86_64_V3  # an AVX2 machine takes the AVX2 variant


@needs_compiler
def test_a_family_that_fails_to_build_takes_out_only_its_own_op(tmp_path):
    """A broken ddn source: ddn_select falls back with ONE RuntimeWarning carrying the compiler's first
    error, disk_mask's C++ backend still runs, and `fastcomp info` says which failed and why."""
    src = tmp_path / "csrc"
    shutil.copytree(_build.source_dir(), src)
    with open(src / "ddn" / "ddn_cpu.cpp", "a") as f:
        f.write("\nint fastcomp_broken_on_purpose() { return undeclared_name_in_ddn; }\n")
    script = textwrap.dedent(f"""
        import warnings
        from pathlib import Path
        import torch
        import fastcomp
        from fastcomp import _build, backends, info
        _build.source_dir = lambda: Path({str(src)!r})
        f, w, t = torch.randn(2, 4, 3, 5), torch.randn(6, 3, 4), torch.randn(2, 3, 3, 5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = fastcomp.ddn_select(f, w, t)
            b = fastcomp.ddn_select(f, w, t)
        ref = fastcomp.ddn_select(f, w, t, backend="reference")
        assert torch.equal(a.index, ref.index) and torch.equal(b.index, ref.index)
        runtime = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
        assert len(runtime) == 1, runtime
        assert "undeclared_name_in_ddn" in runtime[0] and "error" in runtime[0], runtime[0]
        assert backends.select("disk_mask", None, torch.zeros(1, 1, 2)).name == "cpu"
        mask = fastcomp.disk_mask(torch.tensor([[[2.0, 2.0]]]), 1.5, 5, 5)
        assert torch.equal(mask, fastcomp.disk_mask(torch.tensor([[[2.0, 2.0]]]), 1.5, 5, 5, backend="reference"))
        assert _build.load("disk_mask") is not None
        lines = info.extension_lines()
        ddn = [l for l in lines if l.startswith("ddn")]
        assert ddn and "failed" in ddn[0] and "undeclared_name_in_ddn" in ddn[0], lines
        assert any(l.startswith("disk_mask") and ": built" in l for l in lines), lines
        print("ok")
    """)
    env = dict(os.environ, FASTCOMP_CACHE_DIR=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr
