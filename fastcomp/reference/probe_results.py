"""Result types of the locality probes: what the spec (fastcomp.reference.probe) and the fast path
(fastcomp.probe) both return. They live beside the spec, which imports nothing of the fast path, so the
dependency runs one way: fastcomp.probe -> fastcomp.reference. fastcomp.probe re-exports them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class PixelLocality:
    """How far fn's output at a pixel depends on input pixels.

    profile: [2R+1, 2R+1] float64, profile[R + di, R + dj] = mean |d fn(x)[b, c', p] / d x[b, c, p + delta]|
             over b, c, c' and output pixels p with p + delta inside the image (delta = (di, dj)).
    leakage: fraction of the total |J| mass at offsets outside the radius (0 for a radius-local fn); NaN
             for method "colored" (it cannot see beyond R); for "auto", the estimate from sampled exact rows.
             A Jacobian with NaN or inf entries gives a NaN profile, NaN leakage and NaN mass radii.
    """

    profile: torch.Tensor
    radius: int
    leakage: float
    method: str
    # method="auto": what the sampled exact check saw (pixels [n, 3] (channel, row, col), sampled_leakage,
    # aliased_fraction, tolerance, fell_back); None otherwise.
    check: Optional[dict] = None

    def mass_radius(self, q: float) -> Union[int, float]:
        """Smallest r whose centred (2r+1)^2 square of the profile holds fraction q of its mass; NaN when
        the profile is not finite (a NaN or inf Jacobian measures no radius)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"mass_radius: q must be a fraction in [0, 1], got {q}")
        profile = self.profile.to(torch.float64)
        total = float(profile.sum())
        if not math.isfinite(total):
            return math.nan
        if total == 0.0:
            return 0  # fn does not depend on x at all: every square holds all (zero) mass
        R = self.radius
        for r in range(R + 1):
            inside = float(profile[R - r:R + r + 1, R - r:R + r + 1].sum())
            # Relative slack: zeros outside the square sum exactly, but summation order differs.
            if inside >= q * total * (1.0 - 1e-9):
                return r
        return R

    def plot(self, ax=None, title: str = "pixel locality profile"):
        """Heatmap of the profile (needs matplotlib: pip install 'fastcomp[plot]')."""
        import matplotlib.pyplot as plt  # optional (fastcomp[plot]): imported only to plot

        ax = ax or plt.figure(figsize=(4, 3.4)).gca()
        R = self.radius
        im = ax.imshow(self.profile.cpu().numpy(), extent=(-R - 0.5, R + 0.5, R + 0.5, -R - 0.5),
                       cmap="magma")
        ax.set_xlabel("column offset")
        ax.set_ylabel("row offset")
        ax.set_title(f"{title}\nleakage {self.leakage:.2e}")
        ax.figure.colorbar(im, ax=ax, label="mean |dy/dx|")
        return ax


@dataclass(frozen=True)
class ConditionerLocality:
    """How fn's output at each pixel depends on each conditioner.

    attribution: [B, M, H, W] float64, sum over output channels c' and conditioner features of
                 |d fn(x, cond)[b, c', p] / d cond[b, m]|.
    inside_fraction: [B, M] float64, attribution mass inside cond_mask[b, m] / total; NaN where a
                 conditioner has no attribution at all (e.g. padding the model ignores).
    """

    attribution: torch.Tensor
    inside_fraction: torch.Tensor

    def plot(self, b: int = 0, cond_mask: Optional[torch.Tensor] = None, axes=None, max_panels: int = 8,
             title: str = "conditioner attribution"):
        """Heatmaps of attribution[b, m] over the image, one panel per conditioner (at most max_panels),
        with cond_mask[b, m] ([B, M, H, W] bool) outlined when given. Needs matplotlib (fastcomp[plot])."""
        import matplotlib.pyplot as plt  # optional (fastcomp[plot]): imported only to plot

        M = min(self.attribution.shape[1], max_panels)
        if axes is None:
            fig, axes = plt.subplots(1, M, figsize=(2.6 * M, 2.6), squeeze=False)
            axes = axes[0]
        for m in range(M):
            ax = axes[m]
            ax.imshow(self.attribution[b, m].cpu().numpy(), cmap="viridis")
            if cond_mask is not None:
                ax.contour(cond_mask[b, m].cpu().numpy().astype(float), levels=[0.5], colors="w", linewidths=0.8)
            ax.set_title(f"m={m}: inside {float(self.inside_fraction[b, m]):.3f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0].figure.suptitle(title)
        return axes
