"""Triton kernels for fastcomp.ddn_select and ddn_gather: no B x K x Cout x H x W candidates.

Select: one program per (sample b, block of BLOCK_K candidates). For each output channel o and block of
BLOCK_P pixels it forms the candidate block [BLOCK_K, BLOCK_P] = W[k, o, :] @ features[b, :, p] with
tl.dot over Cin in BLOCK_C steps (in registers only), adds bias and residual, subtracts the target and
accumulates (.)^2 or |.| into one distance per k. The candidate is rounded to the input dtype after each
addition, exactly where the reference's einsum + bias + residual rounds, so low-precision inputs rank
candidates as the reference does. Distances are written to the [B, K] float32 output, which the op
returns anyway; the argmin over it is torch.argmin (B * K reads, nothing next to the B*K*Cout*Cin*HW
multiply-adds of the kernel; a fused argmin would need a cross-program reduction for no gain).

Gather: one program per (b, block of pixels), the chosen candidate only. Both backwards are torch
(ChosenCandidate of fastcomp/ops/ddn/library.py over pytorch.py's kernels): two bmm and two index_add over
[B, Cout, Cin]-sized tensors, already single GEMM calls; a Triton kernel would not beat cuBLAS there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_int32_count, fp32_dot_precision, launch


@triton.jit
def _ddn_distances_kernel(
    p_features,  # [B, Cin, HW]
    p_weight,  # [K, Cout, Cin]
    p_bias,  # [K, Cout] (unused unless HAS_BIAS)
    p_residual,  # [B, Cout, HW] (unused unless HAS_RESIDUAL)
    p_target,  # [B, Cout, HW]
    p_dist,  # [B, K] float32 (float64 when ACC_F64)
    K,
    Cout,
    Cin,
    HW,
    inv_n,  # 1 / (Cout * HW)
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    L1: tl.constexpr,
    ACC_F64: tl.constexpr,
    IEEE: tl.constexpr,  # exact float32/float64 products in tl.dot (no TF32): float64, and float32 by default
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_kb = tl.program_id(1)
    acc_t = tl.float64 if ACC_F64 else tl.float32
    in_t = p_features.dtype.element_ty
    o_k = i_kb * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    m_k = o_k < K
    b_dist = tl.zeros([BLOCK_K], dtype=acc_t)
    for o in range(0, Cout):
        if HAS_BIAS:
            b_bias = tl.load(p_bias + o_k * Cout + o, mask=m_k, other=0.0)  # [BLOCK_K]
        for p0 in range(0, HW, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)  # [BLOCK_P]
            m_p = o_p < HW
            b_cand = tl.zeros([BLOCK_K, BLOCK_P], dtype=acc_t)
            for c0 in range(0, Cin, BLOCK_C):
                o_c = c0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
                m_c = o_c < Cin
                b_w = tl.load(p_weight + (o_k[:, None] * Cout + o) * Cin + o_c[None, :],
                              mask=m_k[:, None] & m_c[None, :], other=0.0)  # [BLOCK_K, BLOCK_C]
                b_f = tl.load(p_features + (i_b * Cin + o_c[:, None]) * HW + o_p[None, :],
                              mask=m_c[:, None] & m_p[None, :], other=0.0)  # [BLOCK_C, BLOCK_P]
                if IEEE:
                    b_cand += tl.dot(b_w, b_f, input_precision="ieee", out_dtype=acc_t)
                else:
                    b_cand += tl.dot(b_w, b_f, out_dtype=acc_t)
            # Round where the reference rounds: einsum result, + bias, + residual, all in the input dtype.
            b_cand = b_cand.to(in_t)
            if HAS_BIAS:
                b_cand = b_cand + b_bias[:, None]
            if HAS_RESIDUAL:
                b_res = tl.load(p_residual + (i_b * Cout + o) * HW + o_p, mask=m_p, other=0.0)  # [BLOCK_P]
                b_cand = b_cand + b_res[None, :]
            b_t = tl.load(p_target + (i_b * Cout + o) * HW + o_p, mask=m_p, other=0.0)  # [BLOCK_P]
            b_diff = b_cand.to(acc_t) - b_t.to(acc_t)[None, :]  # [BLOCK_K, BLOCK_P]
            b_err = tl.abs(b_diff) if L1 else b_diff * b_diff
            b_err = tl.where(m_p[None, :], b_err, 0.0)
            b_dist += tl.sum(b_err, axis=1)
    tl.store(p_dist + i_b * K + o_k, b_dist * inv_n, mask=m_k)


@triton.jit
def _ddn_gather_kernel(
    p_features,  # [B, Cin, HW]
    p_weight,  # [K, Cout, Cin]
    p_bias,  # [K, Cout]
    p_residual,  # [B, Cout, HW]
    p_index,  # [B] int64
    p_out,  # [B, Cout, HW]
    Cout,
    Cin,
    HW,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACC_F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_pb = tl.program_id(1)
    acc_t = tl.float64 if ACC_F64 else tl.float32
    in_t = p_features.dtype.element_ty
    i_k = tl.load(p_index + i_b)
    o_p = i_pb * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    m_p = o_p < HW
    for o in range(0, Cout):
        b_acc = tl.zeros([BLOCK_P], dtype=acc_t)
        for c0 in range(0, Cin, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
            m_c = o_c < Cin
            b_w = tl.load(p_weight + (i_k * Cout + o) * Cin + o_c, mask=m_c, other=0.0).to(acc_t)  # [BLOCK_C]
            b_f = tl.load(p_features + (i_b * Cin + o_c[:, None]) * HW + o_p[None, :],
                          mask=m_c[:, None] & m_p[None, :], other=0.0).to(acc_t)  # [BLOCK_C, BLOCK_P]
            b_acc += tl.sum(b_w[:, None] * b_f, axis=0)
        b_out = b_acc.to(in_t)
        if HAS_BIAS:
            b_out = b_out + tl.load(p_bias + i_k * Cout + o)
        if HAS_RESIDUAL:
            b_out = b_out + tl.load(p_residual + (i_b * Cout + o) * HW + o_p, mask=m_p, other=0.0)
        tl.store(p_out + (i_b * Cout + o) * HW + o_p, b_out, mask=m_p)


def _flat(t, B, C, HW):
    return None if t is None else t.detach().reshape(B, C, HW).contiguous()


def ddn_distances_triton(features, weight, target, bias, residual, metric) -> torch.Tensor:
    """distances [B, K] in the accumulation dtype (float32, float64 for float64 inputs)."""
    B, Cin, H, W = features.shape
    K, Cout, _ = weight.shape
    HW = H * W
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = _flat(features, B, Cin, HW)
    w = weight.detach().contiguous()
    b = None if bias is None else bias.detach().contiguous()
    r = _flat(residual, B, Cout, HW)
    t = _flat(target, B, Cout, HW)
    # The weight offset (k * Cout + o) * Cin + c is int32 (the sample offsets are int64).
    check_int32_count("fastcomp.kernels.ddn.ddn_distances_triton", "weight [K, Cout, Cin]", w.numel(),
                      "split the K candidates into several calls")
    dist = torch.empty(B, K, dtype=acc, device=features.device)
    block_k = 64 if K > 32 else 16  # tl.dot needs every block side >= 16
    block_p = 64 if HW > 32 else 16
    block_c = 32 if Cin > 16 else 16
    grid = (B, triton.cdiv(K, block_k))
    # float32 products follow PyTorch's float32 matmul setting, as the reference's einsum does on CUDA.
    ieee = features.dtype == torch.float64 or (features.dtype == torch.float32 and fp32_dot_precision() == "ieee")
    launch(
        _ddn_distances_kernel, grid, features.device,
        f, w, b if b is not None else w, r if r is not None else t, t, dist, K, Cout, Cin, HW, 1.0 / (Cout * HW),
        HAS_BIAS=b is not None, HAS_RESIDUAL=r is not None, L1=metric == "l1", ACC_F64=acc == torch.float64,
        IEEE=ieee, BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_P=block_p, enable_fp_fusion=True)
    return dist


def ddn_gather_forward_triton(features, weight, index, bias, residual) -> torch.Tensor:
    """The chosen candidates [B, Cout, H, W] (no autograd: the caller wraps it in ChosenCandidate)."""
    B, Cin, H, W = features.shape
    K, Cout, _ = weight.shape
    HW = H * W
    f = _flat(features, B, Cin, HW)
    w = weight.detach().contiguous()
    b = None if bias is None else bias.detach().contiguous()
    r = _flat(residual, B, Cout, HW)
    out = torch.empty(B, Cout, H, W, dtype=features.dtype, device=features.device)
    block_p = min(triton.next_power_of_2(HW), 256)
    block_c = min(triton.next_power_of_2(Cin), 32)
    if triton.cdiv(HW, block_p) > 65535:  # grid axis 1 holds the pixel blocks; CUDA caps it at 65535
        raise ValueError(f"fastcomp.kernels.ddn.ddn_gather_forward_triton: H * W = {HW} pixels need more than "
                         f"65535 blocks of {block_p}; split the image into tiles")
    launch(
        _ddn_gather_kernel, (B, triton.cdiv(HW, block_p)), features.device,
        f, w, b if b is not None else w, r if r is not None else f, index.contiguous(), out, Cout, Cin, HW,
        HAS_BIAS=b is not None, HAS_RESIDUAL=r is not None, ACC_F64=features.dtype == torch.float64,
        BLOCK_C=block_c, BLOCK_P=block_p, enable_fp_fusion=True)
    return out

