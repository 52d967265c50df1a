"""Triton kernel for fastcomp's probe_demux: structured Jacobian probes -> per-offset |J| sums.

One program per probe n reads its result g[n] ([B, K, H, W]) once, row by row in BLOCK_W column tiles,
sums |g| over (b, k) and scatters each column's mass into the probe's [(2R+1), (2R+1)] offset tile with
one-hot reductions (no atomics: every program owns its output row, so the result is deterministic).
Mass whose nearest probe pixel is out of range or outside the image goes to outside[n]. Semantics:
fastcomp.ops.probe_demux.reference.probe_demux_reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_int32_count, launch


@triton.jit
def _probe_demux_kernel(
    p_g,  # [N, BK, H, W] float32/float64
    p_origins,  # [N, 2] int64 (row, col) of each probe's first pixel
    p_sums,  # [N, S2] float64
    p_counts,  # [N, S2] float64
    p_outside,  # [N] float64
    BK,
    H,
    W,
    STRIDE,
    R: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    BLOCK_S: tl.constexpr,  # >= 2R+1, a power of two
    BLOCK_W: tl.constexpr,
):
    i_n = tl.program_id(0)
    s: tl.constexpr = 2 * R + 1
    b_o_row = tl.load(p_origins + i_n * 2)
    b_o_col = tl.load(p_origins + i_n * 2 + 1)
    o_s = tl.arange(0, BLOCK_S)  # [BLOCK_S] slot index along one axis
    b_sums = tl.zeros([BLOCK_S, BLOCK_S], dtype=tl.float64)
    b_counts = tl.zeros([BLOCK_S, BLOCK_S], dtype=tl.float64)
    b_outside = tl.zeros([BLOCK_W], dtype=tl.float64)
    p_g_n = p_g + i_n.to(tl.int64) * BK * H * W
    for i in range(0, H):
        # origin < STRIDE, so adding STRIDE keeps the dividend non-negative (C-style % on negatives).
        d_row = (i - b_o_row + R + STRIDE) % STRIDE - R
        row_ok = (d_row <= R) & (i - d_row >= 0) & (i - d_row < H)
        if TRANSPOSE:
            row_slot = R - d_row
        else:
            row_slot = R + d_row
        for j0 in range(0, W, BLOCK_W):
            o_j = j0 + tl.arange(0, BLOCK_W)  # [BLOCK_W]
            m_j = o_j < W
            b_mass = tl.zeros([BLOCK_W], dtype=tl.float64)
            for c in range(0, BK):
                b_g = tl.load(p_g_n + (c * H + i) * W + o_j, mask=m_j, other=0.0)  # [BLOCK_W]
                b_mass += tl.abs(b_g.to(tl.float64))
            d_col = (o_j - b_o_col + R + STRIDE) % STRIDE - R  # [BLOCK_W]
            m_ok = m_j & row_ok & (d_col <= R) & (o_j - d_col >= 0) & (o_j - d_col < W)
            if TRANSPOSE:
                col_slot = R - d_col
            else:
                col_slot = R + d_col
            b_outside += tl.where(m_j & (~m_ok), b_mass, 0.0)
            # [BLOCK_S, BLOCK_W] one-hot of each column's slot, then the row's contribution per slot.
            m_hit = (o_s[:, None] == col_slot[None, :]) & m_ok[None, :]
            b_row_sums = tl.sum(tl.where(m_hit, b_mass[None, :], 0.0), axis=1)  # [BLOCK_S]
            b_row_counts = tl.sum(tl.where(m_hit, 1.0, 0.0).to(tl.float64), axis=1)  # [BLOCK_S]
            m_row = o_s[:, None] == row_slot  # [BLOCK_S, 1]
            b_sums += tl.where(m_row, b_row_sums[None, :], 0.0)
            b_counts += tl.where(m_row, b_row_counts[None, :], 0.0)
    o_slot = o_s[:, None] * s + o_s[None, :]  # [BLOCK_S, BLOCK_S]
    m_slot = (o_s[:, None] < s) & (o_s[None, :] < s)
    tl.store(p_sums + i_n * s * s + o_slot, b_sums, mask=m_slot)
    tl.store(p_counts + i_n * s * s + o_slot, b_counts * BK, mask=m_slot)
    tl.store(p_outside + i_n, tl.sum(b_outside, axis=0))


def probe_demux_triton(g: torch.Tensor, origins: torch.Tensor, stride: int, radius: int, transpose: bool,
                       sums: torch.Tensor, counts: torch.Tensor, outside: torch.Tensor) -> None:
    """g: [N, B, K, H, W]; origins: [N, 2] int64; writes sums, counts [N, (2R+1)^2], outside [N] float64."""
    N, B, K, H, W = g.shape
    if N == 0:
        return
    g = g.contiguous()
    # A probe's offset (c * H + i) * W + j is int32 (the probe offset is int64).
    check_int32_count("fastcomp.kernels.probe_demux.probe_demux_triton", "one probe's result [B, K, H, W]",
                      B * K * H * W, "probe fewer samples or output channels per call")
    block_s = triton.next_power_of_2(2 * radius + 1)
    block_w = min(triton.next_power_of_2(W), 128)
    launch(_probe_demux_kernel, (N,), g.device, g, origins.contiguous(), sums, counts, outside, B * K, H, W, stride,
           R=radius, TRANSPOSE=bool(transpose), BLOCK_S=block_s, BLOCK_W=block_w, enable_fp_fusion=True)
