"""How a denoiser's locality changes with the noise level (the statistic of Niedoba et al., 2411.19339).

At each level sigma, x = x0 + sigma * eps for n_noise draws of eps, the |J| profile of x -> denoiser(x, sigma)
is averaged over the draws (their gradient-sensitivity map G), and the statistic is the radius r of the
smallest centred (2r+1) x (2r+1) square holding 50 / 75 / 95 % of its mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..ops._checks import is_int
from ..reference.probe_results import PixelLocality
from .pixel import pixel_locality


@dataclass(frozen=True)
class NoiseLocality:
    """Per noise level: sigmas [L], profiles [L, 2R+1, 2R+1] float64 (mean over noise draws), leakage [L],
    radii {q: [L] ints}: the q-mass radius per level (side of the square = 2r + 1)."""

    sigmas: tuple
    quantiles: tuple
    radius: int
    profiles: torch.Tensor
    leakage: tuple
    radii: dict
    method: str

    def rows(self) -> list[dict]:
        """One dict per level: sigma, radius_50 / radius_75 / ... (per quantile), the side of each square,
        and the leakage (NaN where the method cannot measure it, and everything NaN at a level whose
        Jacobian was not finite)."""
        out = []
        for i, sigma in enumerate(self.sigmas):
            row = {"sigma": float(sigma)}
            for q in self.quantiles:
                tag = f"{100 * q:g}"
                r = self.radii[q][i]
                measured = math.isfinite(r)  # NaN: the Jacobian at this level was not finite
                row[f"radius_{tag}"] = int(r) if measured else math.nan
                row[f"side_{tag}"] = 2 * int(r) + 1 if measured else math.nan
            row["leakage"] = float(self.leakage[i])
            out.append(row)
        return out

    def plot(self, ax=None, title: str = "locality vs noise level"):
        """Mass radius against sigma (log axis), one line per quantile (needs matplotlib: fastcomp[plot])."""
        import matplotlib.pyplot as plt  # optional (fastcomp[plot]): imported only to plot

        ax = ax or plt.figure(figsize=(4.5, 3.4)).gca()
        for q in self.quantiles:
            ax.plot(self.sigmas, self.radii[q], marker="o", label=f"{100 * q:g}% mass")
        if len(self.sigmas) > 1 and min(self.sigmas) > 0:
            ax.set_xscale("log")
        ax.set_xlabel("noise level sigma")
        ax.set_ylabel("radius r (square side 2r+1)")
        ax.set_ylim(-0.3, self.radius + 0.3)
        ax.set_title(title)
        ax.legend()
        return ax


def locality_vs_noise(denoiser, x0: torch.Tensor, sigmas: Sequence[float], *, radius: int,
                      quantiles: Sequence[float] = (0.5, 0.75, 0.95), n_noise: int = 1, method: str = "auto",
                      seed: int = 0, chunk_size: Optional[int] = None, progress: Optional[bool] = None,
                      **probe_kwargs) -> NoiseLocality:
    """Mass radii of denoiser's Jacobian profile at each noise level.

    denoiser(x [B, C, H, W], sigma: float) -> [B, C', H, W]; x0: [B, C, H, W] clean images; sigmas: noise
    levels. At each level the profile of x -> denoiser(x, sigma) is averaged over n_noise noised copies
    x0 + sigma * eps (eps drawn from a generator seeded with `seed`), with pixel_locality(method=...,
    **probe_kwargs). Returns NoiseLocality (.radii {q: [L]}, .profiles, .rows(), .plot()).
    """
    op = "locality_vs_noise"
    if not callable(denoiser):
        raise TypeError(f"{op}: denoiser must be callable as denoiser(x, sigma), got {type(denoiser).__name__}")
    sigmas = tuple(float(s) for s in sigmas)
    if not sigmas or any(not s >= 0 for s in sigmas):
        raise ValueError(f"{op}: sigmas must be a non-empty sequence of noise levels >= 0, got {sigmas}")
    quantiles = tuple(float(q) for q in quantiles)
    if not quantiles or any(not 0 <= q <= 1 for q in quantiles):
        raise ValueError(f"{op}: quantiles must be fractions in [0, 1], got {quantiles}")
    if not is_int(n_noise) or n_noise < 1:
        raise ValueError(f"{op}: n_noise must be a positive int (noise draws per level), got {n_noise!r}")
    n_noise = int(n_noise)
    if not isinstance(x0, torch.Tensor) or x0.dim() != 4 or not x0.is_floating_point():
        raise ValueError(f"{op}: x0 must be a floating [B, C, H, W] tensor")
    gen = torch.Generator().manual_seed(seed)
    profiles, leakage = [], []
    methods = set()
    for sigma in tqdm(sigmas, desc=op, unit="level", disable=None if progress is None else not progress):
        acc, leak = None, 0.0
        for _ in range(n_noise):
            eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(device=x0.device, dtype=x0.dtype)
            x = x0 + sigma * eps
            res = pixel_locality(lambda t, s=sigma: denoiser(t, s), x, radius=radius, method=method,
                                 chunk_size=chunk_size, progress=False, **probe_kwargs)
            acc = res.profile if acc is None else acc + res.profile
            leak += res.leakage / n_noise
            methods.add(res.method)
        profiles.append(acc / n_noise)
        leakage.append(leak)
    stacked = torch.stack(profiles)
    radii = {q: tuple(PixelLocality(profile=p, radius=radius, leakage=0.0, method="").mass_radius(q)
                      for p in stacked) for q in quantiles}
    return NoiseLocality(sigmas=sigmas, quantiles=quantiles, radius=radius, profiles=stacked,
                         leakage=tuple(leakage), radii=radii, method="+".join(sorted(methods)))
