"""disk_mask's triton backend: kernels/disk_mask.py, imported on first use (TRITON_INTERPRET is read then)."""

from __future__ import annotations


def compute(points, radius, H, W):
    from ...kernels.disk_mask import disk_mask_triton

    return disk_mask_triton(points, radius, H, W)
