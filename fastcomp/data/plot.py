"""Image grids with the requested locations marked (needs matplotlib: pip install 'fastcomp[plot]')."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def plot_grid(images: Tensor, points: Optional[Tensor] = None, valid: Optional[Tensor] = None,
              path=None, ncol: int = 8, *, titles=None):
    """Draw images [n, C, S, S] in [-1, 1] (C = 1 grey, C = 3 RGB) in a grid of `ncol` columns, with the
    requested locations points [n, M, 2] (row, col) marked by red crosses where valid [n, M] (None = all).
    Saves to `path` when given (PNG etc. by extension). Returns the matplotlib Figure."""
    import matplotlib  # noqa: PLC0415  (lazy: plotting is optional)

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"plot_grid: images must be [n, 1 or 3, S, S], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if isinstance(ncol, bool) or not isinstance(ncol, int) or ncol < 1:
        raise ValueError(f"plot_grid: ncol must be a positive int, got {ncol!r}")
    n = images.shape[0]
    if points is not None:
        if points.dim() != 3 or points.shape[0] != n or points.shape[2] != 2:
            raise ValueError(f"plot_grid: points must be [n, M, 2] with n = {n}, got {tuple(points.shape)}")
        if valid is None:
            valid = torch.ones(points.shape[:2], dtype=torch.bool)
        points, valid = points.detach().float().cpu(), valid.detach().cpu()
    imgs = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    cols = max(1, min(ncol, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        if imgs.shape[1] == 1:
            ax.imshow(imgs[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(imgs[i].permute(1, 2, 0).numpy())
        if points is not None:
            p = points[i][valid[i]]
            # a white cross under the red one keeps the mark visible on red objects
            ax.scatter(p[:, 1].numpy(), p[:, 0].numpy(), marker="x", c="white", s=36, linewidths=2.6)
            ax.scatter(p[:, 1].numpy(), p[:, 0].numpy(), marker="x", c="red", s=30, linewidths=1.2)
        if titles is not None and i < len(titles):
            ax.set_title(str(titles[i]), fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
