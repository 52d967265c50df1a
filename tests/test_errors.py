"""Bad input fails loudly, naming the argument, what was expected and what was given."""

from __future__ import annotations

import pytest
import torch

import fastcomp
from fastcomp import backends

attn = fastcomp.local_conditional_attention


def qkv(B=2, H=5, W=7, heads=2, D=4, dtype=torch.float32):
    return [torch.randn(B, H, W, heads, D, dtype=dtype) for _ in range(3)]


def cond(B=2, M=3, heads=2, D=4, dtype=torch.float32):
    return torch.randn(B, M, heads, D, dtype=dtype), torch.randn(B, M, heads, D, dtype=dtype)


# --- local conditional attention -----------------------------------------------------------------

@pytest.mark.parametrize("kernel_size, match", [
    (4, r"odd.*kh = 4"),
    ((3, 2), r"odd.*kw = 2"),
    (0, r"odd and >= 1"),
    (7, r"kh = 7 is larger than the image side H = 5; use a kernel of at most 5"),
    ((5, 9), r"kw = 9 is larger than the image side W = 7"),
])
def test_bad_kernel_size(kernel_size, match):
    with pytest.raises(ValueError, match=match):
        attn(*qkv(), kernel_size)


@pytest.mark.parametrize("kernel_size", [3.0, (3, 3, 3), "3", True, None])
def test_kernel_size_of_wrong_type(kernel_size):
    with pytest.raises(TypeError, match="kernel_size must be an odd int or a pair"):
        attn(*qkv(), kernel_size)


def test_kernel_as_large_as_the_image_is_fine():
    assert attn(*qkv(H=5, W=7), (5, 7)).shape == (2, 5, 7, 2, 4)


def test_q_of_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have shape \[B, H, W, heads, D\] \(5 dims\), got \[2, 5, 7, 8\]"):
        attn(q.flatten(3), k, v, 3)


def test_mismatched_heads_and_head_dims():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k must have shape .* = \[2, 5, 7, 2, 4\] \(must match q\), got \[2, 5, 7, 1, 4\]"):
        attn(q, k[..., :1, :], v, 3)
    with pytest.raises(ValueError, match=r"v must have shape .*got \[2, 5, 7, 2, 3\]"):
        attn(q, k, v[..., :3], 3)
    ck, cv = cond(heads=3)
    with pytest.raises(ValueError, match=r"cond_k must have shape \[B, M, heads, D\] = \[2, 3, 2, 4\].*got \[2, 3, 3, 4\]"):
        attn(q, k, v, 3, cond_k=ck, cond_v=cv)
    ck, cv = cond(D=8)
    with pytest.raises(ValueError, match=r"cond_k must have shape .*got \[2, 3, 2, 8\]"):
        attn(q, k, v, 3, cond_k=ck, cond_v=cv)
    ck, cv = cond()
    with pytest.raises(ValueError, match=r"cond_v must have shape .*\(must match cond_k\)"):
        attn(q, k, v, 3, cond_k=ck, cond_v=cv[:, :2])


def test_conditioner_tokens_come_in_pairs():
    q, k, v = qkv()
    ck, cv = cond()
    with pytest.raises(ValueError, match="cond_k was given without cond_v"):
        attn(q, k, v, 3, cond_k=ck)
    with pytest.raises(ValueError, match="cond_v was given without cond_k"):
        attn(q, k, v, 3, cond_v=cv)
    with pytest.raises(ValueError, match="cond_mask was given without cond_k/cond_v"):
        attn(q, k, v, 3, cond_mask=torch.ones(2, 3, 5, 7, dtype=torch.bool))


def test_mask_of_wrong_shape_or_dtype():
    q, k, v = qkv()
    ck, cv = cond()
    with pytest.raises(ValueError, match=r"cond_mask must have shape \[B, M, H, W\] = \[2, 3, 5, 7\].*got \[2, 3, 7, 5\]"):
        attn(q, k, v, 3, cond_k=ck, cond_v=cv, cond_mask=torch.ones(2, 3, 7, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cond_mask must have shape \[B, M, H, W\] \(4 dims\)"):
        attn(q, k, v, 3, cond_k=ck, cond_v=cv, cond_mask=torch.ones(3, 5, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="cond_mask must be a bool tensor, got float32"):
        attn(q, k, v, 3, cond_k=ck, cond_v=cv, cond_mask=torch.ones(2, 3, 5, 7))


def test_dtype_and_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"k has dtype float64 but q has float32"):
        attn(q, k.double(), v, 3)
    with pytest.raises(TypeError, match="floating dtype"):
        attn(q.int(), k.int(), v.int(), 3)
    with pytest.raises(ValueError, match=r"k is on meta but q is on cpu"):
        attn(q, k.to("meta"), v, 3)


def test_not_a_tensor():
    _, k, v = qkv()
    with pytest.raises(TypeError, match="q must be a torch.Tensor.*got list"):
        attn([1, 2], k, v, 3)


def test_empty_batch_and_no_conditioners_are_handled():
    q, k, v = qkv(B=0)
    ck, cv = cond(B=0)
    out = attn(q, k, v, 3, cond_k=ck, cond_v=cv, cond_mask=torch.zeros(0, 3, 5, 7, dtype=torch.bool))
    assert out.shape == (0, 5, 7, 2, 4)
    q, k, v = qkv()
    ck, cv = cond(M=0)
    assert attn(q, k, v, 3, cond_k=ck, cond_v=cv).shape == q.shape


def test_unknown_or_unavailable_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend must be None or one of: (\w+, )*reference; got 'fast'"):
        attn(q, k, v, 3, backend="fast")
    with pytest.raises(ValueError, match="has no 'cuda' backend yet"):
        attn(q, k, v, 3, backend="cuda")


def test_backend_that_cannot_run_says_why_and_auto_skips_it():
    op = "_test_registry_op"
    backends.register(op, "reference", priority=0)(lambda x: "reference")
    backends.register(op, "cuda", priority=20, machine_check=lambda: "no CUDA device (test)")(lambda x: "cuda")
    backends.register(op, "cpu", priority=10,
                      input_check=lambda x: None if x.dtype == torch.float32 else "dtype float64 unsupported")(
        lambda x: "cpu")
    try:
        x32, x64 = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
        assert backends.select(op, None, x32).name == "cpu"
        assert backends.select(op, None, x64).name == "reference"
        with pytest.raises(backends.BackendUnavailable, match="backend 'cuda' cannot run: no CUDA device"):
            backends.select(op, "cuda", x32)
        with pytest.raises(backends.BackendUnavailable, match="backend 'cpu' cannot run: dtype float64"):
            backends.select(op, "cpu", x64)
    finally:
        del backends._REGISTRY[op]


def test_triton_needs_cuda_tensors_unless_interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "needs CUDA tensors" in backends.triton_input_problem(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.triton_input_problem(torch.zeros(1)) is None


# --- disk masks ----------------------------------------------------------------------------------

def test_disk_mask_bad_inputs():
    with pytest.raises(ValueError, match=r"points must have shape \[B, M, 2\].*got \[1, 2, 3\]"):
        fastcomp.disk_mask(torch.rand(1, 2, 3), 1.0, 4, 4)
    with pytest.raises(ValueError, match="radius must be >= 0, got -1"):
        fastcomp.disk_mask(torch.rand(1, 2, 2), -1, 4, 4)
    with pytest.raises(ValueError, match="radius must be >= 0, got nan"):
        fastcomp.disk_mask(torch.rand(1, 2, 2), float("nan"), 4, 4)
    with pytest.raises(ValueError, match="H must be >= 1, got 0"):
        fastcomp.disk_mask(torch.rand(1, 2, 2), 1.0, 0, 4)
    with pytest.raises(TypeError, match="W must be an int"):
        fastcomp.disk_mask(torch.rand(1, 2, 2), 1.0, 4, 4.5)


# --- DDN -----------------------------------------------------------------------------------------

def ddn(B=2, Cin=4, Cout=3, K=5, H=7, W=9):
    return (torch.randn(B, Cin, H, W), torch.randn(K, Cout, Cin), torch.randn(B, Cout, H, W))


def test_ddn_conv_weight_and_bias_get_a_reshape_hint():
    f, w, t = ddn()
    with pytest.raises(ValueError, match=r"got a conv1x1 weight \[15, 4, 1, 1\]: pass weight.view\(K, Cout, Cin\)"):
        fastcomp.ddn_select(f, w.reshape(15, 4, 1, 1), t)
    with pytest.raises(ValueError, match=r"got a conv bias \[15\]: pass bias.view\(K, Cout\)"):
        fastcomp.ddn_select(f, w, t, bias=torch.randn(15))


def test_ddn_k_cout_mismatches():
    f, w, t = ddn()
    with pytest.raises(ValueError, match=r"bias must have shape \[K, Cout\] = \[5, 3\].*got \[3, 5\]"):
        fastcomp.ddn_select(f, w, t, bias=torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"target must have shape \[B, Cout, H, W\] = \[2, 3, 7, 9\].*got \[2, 1, 7, 9\]"):
        fastcomp.ddn_select(f, w, t[:, :1])
    with pytest.raises(ValueError, match=r"residual must have shape \[B, Cout, H, W\] = \[2, 3, 7, 9\]"):
        fastcomp.ddn_select(f, w, t, residual=torch.randn(2, 3, 9, 7))
    with pytest.raises(ValueError, match=r"has Cin = 4 but features .* has Cin = 6"):
        fastcomp.ddn_select(torch.randn(2, 6, 7, 9), w, t)
    with pytest.raises(ValueError, match="needs K >= 1"):
        fastcomp.ddn_select(f, w[:0], t)


def test_ddn_metric_and_dtypes():
    f, w, t = ddn()
    with pytest.raises(ValueError, match=r"metric must be one of \('l2', 'l1'\), got 'cosine'"):
        fastcomp.ddn_select(f, w, t, metric="cosine")
    with pytest.raises(TypeError, match="target has dtype float64 but features has float32"):
        fastcomp.ddn_select(f, w, t.double())


def test_ddn_gather_index_checks():
    f, w, _ = ddn()
    with pytest.raises(ValueError, match=r"index values must lie in \[0, K\) = \[0, 5\), got \[5\] at positions \[1\]"):
        fastcomp.ddn_gather(f, w, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"got \[-1\] at positions \[0\]"):
        fastcomp.ddn_gather(f, w, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="index must be int64.*got int32; call index.long"):
        fastcomp.ddn_gather(f, w, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"index must have shape \[B\] = \[2\]"):
        fastcomp.ddn_gather(f, w, torch.tensor([0, 1, 2]))


def test_ddn_empty_batch_is_handled():
    f, w, t = ddn(B=0)
    out, index, dist = fastcomp.ddn_select(f, w, t)
    assert out.shape == (0, 3, 7, 9) and index.shape == (0,) and dist.shape == (0, 5)
    assert index.dtype == torch.int64 and dist.dtype == torch.float32
    assert fastcomp.ddn_gather(f, w, torch.zeros(0, dtype=torch.int64)).shape == (0, 3, 7, 9)


# --- probes --------------------------------------------------------------------------------------

def test_probe_bad_inputs():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"fn must return \[B, C', H, W\] = \[1, C', 5, 6\].*got \[1, 2, 6, 5\]"):
        fastcomp.probe.pixel_locality(lambda t: t.transpose(2, 3), x, radius=1)
    with pytest.raises(ValueError, match="radius must be >= 0, got -1"):
        fastcomp.probe.pixel_locality(lambda t: t, x, radius=-1)
    with pytest.raises(ValueError, match="method must be one of"):
        fastcomp.probe.pixel_locality(lambda t: t, x, radius=1, method="fast")
    with pytest.raises(ValueError, match="empty batch"):
        fastcomp.probe.pixel_locality(lambda t: t, x[:0], radius=1)
    cond, mask = torch.randn(1, 3, 4, dtype=torch.float64), torch.ones(1, 3, 5, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"cond_mask must have shape \[B, M, H, W\] = \[1, 3, 5, 6\]"):
        fastcomp.probe.conditioner_locality(lambda a, c: a, x, cond, mask[:, :2])
    with pytest.raises(TypeError, match="cond_mask must be bool"):
        fastcomp.probe.conditioner_locality(lambda a, c: a, x, cond, mask.float())
    with pytest.raises(ValueError, match=r"cond must have shape \[B, M, Dc\] with B = 1"):
        fastcomp.probe.conditioner_locality(lambda a, c: a, x, cond.expand(2, 3, 4), mask)


def test_auto_mode_falls_back_with_a_warning_when_an_extension_fails_to_build():
    from fastcomp._build import BuildError

    op = "_test_build_failure_op"

    def broken(x):
        raise BuildError("fastcomp: building 'cpu' failed: error: expected ';'")

    backends.register(op, "reference", priority=0)(lambda x: "reference")
    backends.register(op, "cpu", priority=10)(broken)
    try:
        with pytest.warns(RuntimeWarning, match=r"backend 'cpu' is unavailable, falling back.*expected ';'"):
            assert backends.dispatch(op, None, (torch.zeros(1),), (torch.zeros(1),)) == "reference"
        with pytest.raises(BuildError, match="expected ';'"):
            backends.dispatch(op, "cpu", (torch.zeros(1),), (torch.zeros(1),))
    finally:
        del backends._REGISTRY[op]
