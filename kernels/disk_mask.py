"""Triton kernel for fastcomp.disk_mask: [B, M, H, W] bool, (i - row)^2 + (j - col)^2 <= radius^2.

One program per (b, m, image row) writes the row in BLOCK_W chunks. The test runs in float64, as the
reference does, so every backend agrees exactly on pixels that lie on a disk's boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import GRID_YZ_LIMIT, launch


@triton.jit
def _disk_mask_kernel(
    p_points,  # [B*M, 2] float64 (row, col)
    p_radius_sq,  # [1] float64: a Python float argument would arrive as float32 and move the boundary
    p_out,  # [B*M, H, W] bool
    H,
    W,
    BLOCK_W: tl.constexpr,
):
    i_bm = tl.program_id(0)
    i_row = tl.program_id(1)
    b_row = tl.load(p_points + i_bm * 2)
    b_col = tl.load(p_points + i_bm * 2 + 1)
    b_radius_sq = tl.load(p_radius_sq)
    b_di = i_row.to(tl.float64) - b_row
    p_out_row = p_out + (i_bm.to(tl.int64) * H + i_row) * W
    for j0 in range(0, W, BLOCK_W):
        o_j = j0 + tl.arange(0, BLOCK_W)  # [BLOCK_W]
        m_j = o_j < W
        b_dj = o_j.to(tl.float64) - b_col  # [BLOCK_W]
        b_inside = b_di * b_di + b_dj * b_dj <= b_radius_sq
        tl.store(p_out_row + o_j, b_inside, mask=m_j)


def disk_mask_triton(points: torch.Tensor, radius: float, H: int, W: int) -> torch.Tensor:
    B, M, _ = points.shape
    out = torch.empty(B, M, H, W, dtype=torch.bool, device=points.device)
    if out.numel() == 0:
        return out
    pts = points.to(torch.float64).contiguous()
    radius_sq = torch.tensor([float(radius) ** 2], dtype=torch.float64, device=points.device)
    block_w = min(triton.next_power_of_2(W), 1024)
    # No FMA contraction: di*di + dj*dj must round like the float64 reference (two roundings), or pixels
    # lying exactly on a boundary flip.
    if H > GRID_YZ_LIMIT:  # grid axis 1 holds the rows
        raise ValueError(f"fastcomp.kernels.disk_mask.disk_mask_triton: H = {H} rows exceed the {GRID_YZ_LIMIT} a "
                         f"launch grid holds; build the mask in horizontal strips")
    launch(_disk_mask_kernel, (B * M, H), points.device, pts, radius_sq, out, H, W, BLOCK_W=block_w,
           enable_fp_fusion=False)
    return out
