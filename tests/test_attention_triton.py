"""The Triton local conditional attention kernels (fastcomp.kernels.attention) against the reference.

lca_forward / lca_backward are called directly (fastcomp/ops/attention/triton.py wraps them); the output
and all five gradients are compared with the float64 reference differentiated by autograd. Without CUDA the
kernels run under TRITON_INTERPRET=1 on CPU tensors (set by tests/conftest.py), so those cases use tiny
images; the `gpu` cases use the sizes the kernels are built for (D = 64/128, kernels 13 and 31, M = 256).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastcomp.bench.cases import plain_attention as _plain_torch  # the low-precision baseline
from fastcomp.reference import local_conditional_attention_reference
from helpers import assert_close, assert_low_precision_close

pytestmark = pytest.mark.triton

GRAD_NAMES = ("dq", "dk", "dv", "dcond_k", "dcond_v")


def _lca():
    from fastcomp.kernels import attention as local_attention  # lazily: after conftest has chosen the interpreter

    return local_attention


def _inputs(B, H, W, heads, D, M, *, device, mask="random", density=0.4, generator=None):
    """Random q, k, v, cond_k, cond_v (float32) and cond_mask.

    mask: "random" (per-item real conditioner counts differ: item b keeps the first M - 2*b conditioners,
    the rest are padding with an all-false mask, and conditioner 0 of item 0 is all false too), "none"
    (cond_mask None) or "nocond" (no conditioners at all).
    """
    g = generator or torch.Generator().manual_seed(1234)
    q, k, v = (torch.randn(B, H, W, heads, D, generator=g) for _ in range(3))
    if mask == "nocond":
        return q.to(device), k.to(device), v.to(device), None, None, None
    cond_k, cond_v = (torch.randn(B, M, heads, D, generator=g) for _ in range(2))
    cond_mask = None
    if mask == "random":
        cond_mask = torch.rand(B, M, H, W, generator=g) < density
        for b in range(B):
            cond_mask[b, max(M - 2 * b, 0):] = False  # padding conditioners
        if M > 1:
            cond_mask[0, 0] = False
    to = (lambda t: None if t is None else t.to(device))
    return to(q), to(k), to(v), to(cond_k), to(cond_v), to(cond_mask)


def _reference(q, k, v, cond_k, cond_v, cond_mask, kernel_size, scale, grad_out, dtype=torch.float64,
               fn=local_conditional_attention_reference):
    """Reference output and gradients, computed in `dtype` by autograd."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (q, k, v, cond_k, cond_v)]
    if fn is _plain_torch:
        out = fn(*leaves, cond_mask, kernel_size, scale)
    else:
        out = fn(leaves[0], leaves[1], leaves[2], kernel_size, cond_k=leaves[3], cond_v=leaves[4],
                 cond_mask=cond_mask, scale=scale)
    out.backward(grad_out.to(dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _run(q, k, v, cond_k, cond_v, cond_mask, kernel_size, scale=None, dtype=torch.float32):
    """(out, grads) from the Triton kernels, (out, grads) of the float64 reference, and grad_out."""
    lca = _lca()
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    cast = (lambda t: None if t is None else t.to(dtype))
    args = [cast(t) for t in (q, k, v, cond_k, cond_v)]
    out, lse = lca.lca_forward(*args, cond_mask, kernel_size, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(device=q.device, dtype=dtype)
    grads = lca.lca_backward(grad_out, *args, cond_mask, out, lse, kernel_size, scale)
    ref_out, ref_grads = _reference(*args, cond_mask, kernel_size, scale, grad_out)
    return (out, grads), (ref_out, ref_grads), (args, grad_out, scale)


def _check_fp32(got, ref):
    (out, grads), (ref_out, ref_grads) = got, ref
    assert_close(out, ref_out, name="out", dtype=torch.float32)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        if r is None:
            assert g is None, f"{name} should be None without conditioners"
            continue
        assert g.dtype == torch.float32 and g.shape == r.shape, (name, g.dtype, g.shape)
        assert_close(g, r, name=name, dtype=torch.float32)


# --- float32 on odd sizes (interpreter on CPU, native on CUDA) --------------------------------------

CASES_FP32 = {
    # name: (B, H, W, heads, D, kernel_size, M, mask)
    "7x9 k5x3 M7 padded": (2, 7, 9, 2, 16, (5, 3), 7, "random"),
    "13x17 k3x3 M0": (1, 13, 17, 1, 16, (3, 3), 0, "random"),
    "7x9 k3x5 M1 mask None": (2, 7, 9, 1, 16, (3, 5), 1, "none"),
    "9x7 k7x7 no cond D24": (1, 9, 7, 2, 24, (7, 7), 0, "nocond"),
    "6x5 k5x5 M40 two words": (2, 6, 5, 1, 16, (5, 5), 40, "random"),
}


@pytest.mark.parametrize("case", list(CASES_FP32))
def test_float32_matches_reference(case, triton_device):
    B, H, W, heads, D, ks, M, mask = CASES_FP32[case]
    # dense masks (density 0.6) set bit 31 of the mask words somewhere: the sign bit of the int32 packing
    inputs = _inputs(B, H, W, heads, D, M, device=triton_device, mask=mask, density=0.6 if M > 32 else 0.4)
    got, ref, _ = _run(*inputs, ks)
    _check_fp32(got, ref)


def test_custom_scale(triton_device):
    inputs = _inputs(1, 7, 9, 1, 16, 3, device=triton_device)
    got, ref, _ = _run(*inputs, (3, 3), scale=0.9)
    _check_fp32(got, ref)


def test_non_contiguous_inputs(triton_device):
    """q, k, v as strided views of one fused qkv tensor, cond_k/cond_v from a heads-major buffer, and a
    v whose D axis is not unit-stride (copied by the launcher)."""
    B, H, W, heads, D, M = 2, 7, 9, 2, 16, 5
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, H, W, 3, heads, D, generator=g).to(triton_device)
    q, k, _ = qkv.unbind(3)  # [B, H, W, heads, D] with stride 3*heads*D along W
    v = torch.randn(B, H, W, heads, D, generator=g).to(triton_device).transpose(-1, -2).contiguous()
    v = v.transpose(-1, -2)  # [B, H, W, heads, D] with D stride = heads (not 1)
    assert not q.is_contiguous() and v.stride(-1) != 1
    ckv = torch.randn(B, heads, 2, M, D, generator=g).to(triton_device)
    cond_k, cond_v = ckv[:, :, 0].transpose(1, 2), ckv[:, :, 1].transpose(1, 2)  # [B, M, heads, D] views
    assert not cond_k.is_contiguous()
    cond_mask = (torch.rand(B, M, H, W, generator=g) < 0.5).to(triton_device)
    got, ref, _ = _run(q, k, v, cond_k, cond_v, cond_mask, (5, 3))
    _check_fp32(got, ref)


# --- half precision: error at most ~2x plain PyTorch's in the same dtype ----------------------------


def _check_low_precision(inputs, ks, dtype):
    got, ref64, (args, grad_out, scale) = _run(*inputs, ks, dtype=dtype)
    (out, grads), (ref_out, ref_grads) = got, ref64
    same_out, same_grads = _reference(*args, inputs[5], ks, scale, grad_out, dtype=dtype, fn=_plain_torch)
    # The triton 3.9 interpreter truncates float32 -> bfloat16 instead of rounding to nearest (compiled
    # kernels round), which alone costs up to ~2x the error: allow 3x there, the usual 2x everywhere else.
    factor = 3.0 if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else 2.0
    assert_low_precision_close(out, ref_out, same_out, name=f"out {dtype}", factor=factor)
    for name, g, r, s in zip(GRAD_NAMES, grads, ref_grads, same_grads):
        if r is None:
            continue
        assert g.dtype == dtype, (name, g.dtype)
        assert_low_precision_close(g, r, s, name=f"{name} {dtype}", factor=factor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_reference(dtype, triton_device):
    inputs = _inputs(2, 7, 9, 2, 16, 7, device=triton_device)
    _check_low_precision(inputs, (5, 3), dtype)


# --- launcher input checks ---------------------------------------------------------------------------


def test_launcher_refuses_what_the_kernels_cannot_run(triton_device):
    """The launchers check only the kernels' own limits (kernels/limits.py): the user-facing checks of shapes,
    kernel size and conditioners are the public function's (tests/test_errors.py), made once."""
    lca = _lca()
    q, k, v, *_ = _inputs(1, 7, 9, 1, 16, 3, device=triton_device)
    s = 0.25
    with pytest.raises(TypeError, match="float64"):
        lca.lca_forward(q.double(), k.double(), v.double(), None, None, None, (3, 3), s)
    with pytest.raises(ValueError, match="head dim"):
        lca.lca_forward(q[..., :8], k[..., :8], v[..., :8], None, None, None, (3, 3), s)


def test_triton_backend_declines_what_its_kernels_cannot_run():
    """The same limits, read by the backend's input check: backend=None never picks a kernel that refuses."""
    from fastcomp.kernels import limits
    from fastcomp.ops.attention import triton

    assert "head dim D = 8 is outside the 16..128" in triton.head_dim_problem(torch.zeros(1, 5, 5, 1, 8))
    assert triton.head_dim_problem(torch.zeros(1, 5, 5, 1, 16)) is None
    assert triton.DTYPES is limits.ATTENTION_DTYPES and torch.float64 not in triton.DTYPES


# --- GPU: the sizes the kernels are built for ---------------------------------------------------------

GPU_CASES = {
    # name: (B, H, W, heads, D, kernel_size, M)
    "32x40 D64 k13 M256": (2, 32, 40, 2, 64, (13, 13), 256),
    "33x37 D128 k31x13 M16": (1, 33, 37, 2, 128, (31, 13), 16),
    "40x31 D32 k31 M0": (1, 40, 31, 3, 32, (31, 31), 0),
    "24x24 D80 k7 M33": (2, 24, 24, 1, 80, (7, 7), 33),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_float32(case):
    B, H, W, heads, D, ks, M = GPU_CASES[case]
    inputs = _inputs(B, H, W, heads, D, M, device="cuda", density=0.2)
    got, ref, _ = _run(*inputs, ks)
    _check_fp32(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_half_precision(case, dtype):
    B, H, W, heads, D, ks, M = GPU_CASES[case]
    inputs = _inputs(B, H, W, heads, D, M, device="cuda", density=0.2)
    _check_low_precision(inputs, ks, dtype)
