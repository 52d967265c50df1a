"""Reference disk masks: a broadcast comparison in float64, the executable spec of disk_mask."""

from __future__ import annotations

import torch


def disk_mask_reference(points: torch.Tensor, radius: float, H: int, W: int) -> torch.Tensor:
    """[B, M, H, W] bool: (i - row)^2 + (j - col)^2 <= radius^2, evaluated in float64."""
    p = points.to(torch.float64)
    i = torch.arange(H, dtype=torch.float64, device=points.device)
    j = torch.arange(W, dtype=torch.float64, device=points.device)
    di = i[None, None, :, None] - p[..., 0, None, None]  # [B, M, H, 1]
    dj = j[None, None, None, :] - p[..., 1, None, None]  # [B, M, 1, W]
    radius = float(radius)
    return di * di + dj * dj <= radius * radius  # not radius ** 2: that raises OverflowError past 1.3e154
