"""How fastcomp.kernels launch: on the tensors' device, with checked int32 offsets, explicit FMA contraction
and the float32 dot precision PyTorch's matmul setting asks for. No GPU needed: the launchers run on meta
tensors (shapes and strides, no memory) with the launch recorded instead of run (kernels/_aot.py capture),
or on tiny CPU tensors through the interpreter."""

from __future__ import annotations

import ast
import contextlib
import pathlib

import pytest
import torch

pytest.importorskip("triton")

KERNELS_DIR = pathlib.Path(__file__).resolve().parents[1] / "kernels"


def _mods():
    from fastcomp.kernels import _aot, _launch, attention, ddn, disk_mask, probe_demux

    return _aot, _launch, attention, ddn, probe_demux, disk_mask


def _meta(*shape, dtype=torch.float32, stride=None):
    if stride is not None:
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    return torch.empty(*shape, dtype=dtype, device="meta")


def _attention_meta(D=32, dtype=torch.float32, M=3):
    q, k, v, do, out = (_meta(2, 9, 11, 2, D, dtype=dtype) for _ in range(5))
    ck, cv = _meta(2, M, 2, D, dtype=dtype), _meta(2, M, 2, D, dtype=dtype)
    mask = torch.empty(2, M, 9, 11, dtype=torch.bool, device="meta")
    lse = _meta(2, 2, 9, 11)
    return q, k, v, ck, cv, mask, do, out, lse


def _all_launches_on_meta():
    """Every launcher of fastcomp.kernels once, on meta tensors, launches recorded."""
    aot, _, la, ddn, probe, dm = _mods()
    q, k, v, ck, cv, mask, do, out, lse = _attention_meta()
    found = aot.capture(lambda: la.lca_forward(q, k, v, ck, cv, mask, (3, 3), 0.2), "fwd")
    found += aot.capture(lambda: la.lca_backward(do, q, k, v, ck, cv, mask, out, lse, (3, 3), 0.2), "bwd")
    found += aot.capture(lambda: la.lca_jvp(q, k, v, ck, cv, mask, out, lse, q, k, v, ck, cv, (3, 3), 0.2), "jvp")
    f, w, b = _meta(2, 5, 4, 4), _meta(6, 3, 5), _meta(6, 3)
    r, t = _meta(2, 3, 4, 4), _meta(2, 3, 4, 4)
    index = torch.empty(2, dtype=torch.int64, device="meta")
    found += aot.capture(lambda: ddn.ddn_distances_triton(f, w, t, b, r, "l2"), "ddn")
    found += aot.capture(lambda: ddn.ddn_gather_forward_triton(f, w, index, b, r), "ddn")
    sums, counts = (torch.empty(4, 9, dtype=torch.float64, device="meta") for _ in range(2))
    outside = torch.empty(4, dtype=torch.float64, device="meta")
    found += aot.capture(lambda: probe.probe_demux_triton(_meta(4, 1, 2, 5, 5), torch.empty(
        4, 2, dtype=torch.int64, device="meta"), 3, 1, False, sums, counts, outside), "probe")
    found += aot.capture(lambda: dm.disk_mask_triton(_meta(1, 2, 2, dtype=torch.float64), 2.0, 5, 6), "disk")
    return found


# --- the device a launch runs on ----------------------------------------------------------------------

def test_every_kernel_launch_goes_through_launch():
    """kernel[grid](...) outside kernels/_launch.py would skip the device guard: no kernel file may do it."""
    offenders = []
    for path in sorted(KERNELS_DIR.glob("*.py")):
        if path.name == "_launch.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"launch kernels through kernels/_launch.py launch(), not kernel[grid](): {offenders}"


def test_launch_makes_the_tensors_device_current(monkeypatch):
    """A cuda:1 tensor launches with cuda:1 current (Triton takes the current device and its stream), and the
    previous device is current again afterwards; CPU and meta tensors need no CUDA call at all."""
    _, launch_mod, *_ = _mods()
    current = ["cuda:0"]

    @contextlib.contextmanager
    def fake_device(device):
        previous, current[0] = current[0], str(device)
        try:
            yield
        finally:
            current[0] = previous

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    seen = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append((current[0], grid, args, meta))

    launch_mod.launch(FakeKernel(), (3, 1), torch.device("cuda", 1), "a", BLOCK=16)
    assert seen == [("cuda:1", (3, 1), ("a",), {"BLOCK": 16})]
    assert current[0] == "cuda:0"

    def no_cuda(device):
        raise AssertionError("torch.cuda.device called for a non-CUDA tensor")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    launch_mod.launch(FakeKernel(), (1,), torch.device("cpu"))
    launch_mod.launch(FakeKernel(), (1,), torch.device("meta"))


def test_every_launcher_passes_its_inputs_device():
    launches = _all_launches_on_meta()
    names = {x.name for x in launches}
    aot = _mods()[0]
    assert names == set(aot.all_kernels()), "a kernel was not launched by the launchers exercised here"
    assert all(x.device == torch.device("meta") for x in launches), [(x.name, x.device) for x in launches]


@pytest.mark.gpu
def test_second_gpu_while_first_is_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    import fastcomp

    q, k, v = (torch.randn(1, 9, 9, 2, 32, device="cuda:1") for _ in range(3))
    with torch.cuda.device(0):
        out = fastcomp.local_conditional_attention(q, k, v, 3, backend="triton")
        ref = fastcomp.local_conditional_attention(q, k, v, 3, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# --- launch options ------------------------------------------------------------------------------------

def test_performance_kernels_pass_fp_fusion_explicitly():
    """Triton 3.9 warns when enable_fp_fusion is left to its default, and a later Triton flips it: the
    performance kernels ask for FMA contraction; disk_mask refuses it (boundary pixels must round like the
    float64 reference)."""
    for x in _all_launches_on_meta():
        assert "enable_fp_fusion" in x.meta, f"{x.name} leaves enable_fp_fusion to Triton's default"
        assert x.meta["enable_fp_fusion"] is (x.name != "_disk_mask_kernel"), x.name


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("setting", ["default", "set_float32_matmul_precision", "allow_tf32", "fp32_precision"])
def test_float32_dots_follow_torch_matmul_precision(setting, restore_matmul_precision):
    aot, launch_mod, la, ddn, *_ = _mods()
    torch.set_float32_matmul_precision("highest")
    if setting == "set_float32_matmul_precision":
        torch.set_float32_matmul_precision("high")
    elif setting == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif setting == "fp32_precision":
        if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            pytest.skip(f"torch {torch.__version__} has no fp32_precision setting")
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    want = "ieee" if setting == "default" else "tf32"
    assert launch_mod.fp32_dot_precision() == want
    q, k, v, ck, cv, mask, do, out, lse = _attention_meta()
    for x in aot.capture(lambda: la.lca_backward(do, q, k, v, ck, cv, mask, out, lse, (3, 3), 0.2), "bwd"):
        if "PRECISION" in x.meta:
            assert x.meta["PRECISION"] == want, x.name
    f, w, t = _meta(2, 5, 4, 4), _meta(6, 3, 5), _meta(2, 3, 4, 4)
    (dist,) = aot.capture(lambda: ddn.ddn_distances_triton(f, w, t, None, None, "l2"), "ddn")
    assert dist.meta["IEEE"] is (want == "ieee")
    # half precision and float64 do not depend on it
    q16 = _meta(2, 9, 11, 2, 32, dtype=torch.float16)
    (fwd,) = aot.capture(lambda: la.lca_forward(q16, q16, q16, None, None, None, (3, 3), 0.2), "fwd")
    assert fwd.meta["PRECISION"] == "tf32"
    f64, w64, t64 = (x.double() for x in (f, w, t))
    (dist64,) = aot.capture(lambda: ddn.ddn_distances_triton(f64, w64, t64, None, None, "l2"), "ddn")
    assert dist64.meta["IEEE"] is True


# --- int32 offsets ---------------------------------------------------------------------------------------

HUGE = 2**31  # one stride this large along an indexed axis wraps an int32 offset


@pytest.fixture
def meta_inputs_accepted(monkeypatch):
    """The launchers' input checks want CUDA tensors (or the interpreter): let meta tensors through to the
    int32 checks (as on a GPU machine, where these tests run compiled)."""
    monkeypatch.setattr(_mods()[2], "_check_inputs", lambda *a, **k: None)


@pytest.mark.parametrize("name", ["q", "k", "v", "cond_k", "cond_v"])
def test_forward_checks_int32_offsets_of_every_input(name, meta_inputs_accepted):
    _, _, la, *_ = _mods()
    q, k, v, ck, cv, mask, *_ = _attention_meta()
    args = dict(q=q, k=k, v=v, cond_k=ck, cond_v=cv)
    t = args[name]
    args[name] = _meta(*t.shape, stride=(HUGE * 4, HUGE, *t.stride()[2:]) if t.dim() == 4
                       else (HUGE * 16, 11 * 64, HUGE // 8, 32, 1))
    with pytest.raises(ValueError, match=rf"lca_forward: {name} .*int32"):
        la.lca_forward(args["q"], args["k"], args["v"], args["cond_k"], args["cond_v"], mask, (3, 3), 0.2)


@pytest.mark.parametrize("name", ["grad_out", "out", "q"])
def test_backward_checks_int32_offsets_of_grad_out_and_out(name, meta_inputs_accepted):
    _, _, la, *_ = _mods()
    q, k, v, ck, cv, mask, do, out, lse = _attention_meta()
    args = dict(grad_out=do, out=out, q=q)
    args[name] = _meta(2, 9, 11, 2, 32, stride=(HUGE * 8, HUGE // 8, 64, 32, 1))
    with pytest.raises(ValueError, match=rf"lca_backward: {name} .*int32"):
        la.lca_backward(args["grad_out"], args["q"], k, v, ck, cv, mask, args["out"], lse, (3, 3), 0.2)


def test_ddn_and_probe_check_int32_offsets():
    _, _, _, ddn, probe, _ = _mods()
    f, w, t = _meta(1, 1024, 2, 2), _meta(2**20 + 1, 2, 1024), _meta(1, 2, 2, 2)  # weight: > 2**31 elements
    with pytest.raises(ValueError, match="weight .*int32"):
        ddn.ddn_distances_triton(f, w, t, None, None, "l2")
    g = _meta(2, 4, 2, 2**14, 2**14)  # one probe: 2**31 elements
    sums = torch.empty(2, 9, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="probe_demux_triton: one probe.*int32"):
        probe.probe_demux_triton(g, torch.empty(2, 2, dtype=torch.int64, device="meta"), 3, 1, False, sums, sums,
                                 torch.empty(2, dtype=torch.float64, device="meta"))


def test_contiguous_inputs_pass_the_int32_checks():
    _, launch_mod, *_ = _mods()
    launch_mod.check_int32_extent("f", "x", _meta(4, 128, 128, 8, 128), (1, 2, 3))  # 16.7M per item: fine
    with pytest.raises(ValueError, match="Split the call"):
        launch_mod.check_int32_extent("f", "x", _meta(1, 2**16, 2**15), (1,))


def test_block_sizes_follow_the_gpu_generation():
    """Before Hopper (mma.sync, sm_80/86/89) the forward and dq kernels take half the key block they take on
    sm_90, where 64 keys spill no registers (tests/test_triton_aot.py compiles both)."""
    aot, _, la, *_ = _mods()
    q, k, v, ck, cv, mask, do, out, lse = (t.to(torch.bfloat16) if t.is_floating_point() and t.dim() == 5
                                           and t.shape[-1] == 32 else t for t in _attention_meta())
    ck, cv = ck.to(torch.bfloat16), cv.to(torch.bfloat16)
    block_n = {}
    for arch in (80, 86, 90):
        (fwd,) = aot.capture(lambda: la.lca_forward(q, k, v, ck, cv, mask, (3, 3), 0.2), "fwd", arch=arch)
        block_n[arch] = fwd.meta["BLOCK_N"]
    assert block_n == {80: 32, 86: 32, 90: 64}
