"""Deterministic EDM samplers (Karras et al. 2022, algorithm 1 without churn) and the projective-composition
sampler (Bradley et al., arXiv 2502.04549).

Noise levels: sigma_i = (sigma_max^(1/rho) + i/(steps-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
i = 0..steps-1, then sigma_steps = 0. The ODE dx/dsigma = (x - D(x; sigma)) / sigma is integrated by
Euler or Heun (2nd order; the last step, to sigma = 0, is Euler).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .edm import randn_like_on
from ..ops._checks import is_int

SOLVERS = ("heun", "euler")


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               device=None) -> torch.Tensor:
    """[steps + 1] float64 noise levels, decreasing from sigma_max to sigma_min, then 0."""
    if not is_int(steps) or steps < 1:
        raise ValueError(f"sample: steps must be an int >= 1, got {steps!r}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"sample: need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"sample: rho must be > 0, got {rho}")
    i = torch.arange(steps, dtype=torch.float64)
    frac = i / max(steps - 1, 1)
    sigmas = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)


def _core(model):
    return getattr(model, "module", getattr(model, "_orig_mod", model))


def _check_points(name: str, points, valid):
    if not isinstance(points, torch.Tensor) or points.dim() != 3 or points.shape[-1] != 2:
        got = list(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise ValueError(f"{name}: points must be a [n, M, 2] tensor of (row, col) pixel coordinates, got {got}")
    if valid is None:
        valid = torch.ones(points.shape[:2], dtype=torch.bool, device=points.device)
    elif not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != points.shape[:2]:
        got = (f"{list(valid.shape)} {valid.dtype}" if isinstance(valid, torch.Tensor) else type(valid).__name__)
        raise ValueError(f"{name}: valid must be a bool tensor [n, M] = {list(points.shape[:2])} matching points "
                         f"(False = padding row), got {got}")
    return points, valid


def _integrate(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape, device, dtype, *, steps,
               solver, sigma_min, sigma_max, rho, generator, progress, desc) -> torch.Tensor:
    """Run the ODE from x ~ N(0, sigma_max^2) with denoise(x [n, C, S, S], sigma [n]) -> [n, C, S, S]."""
    if solver not in SOLVERS:
        raise ValueError(f"{desc}: solver must be one of {SOLVERS}, got {solver!r}")
    sigmas = edm_sigmas(steps, sigma_min, sigma_max, rho)
    n = shape[0]
    x = randn_like_on(shape, generator, device, dtype=torch.float64).to(dtype) * float(sigmas[0])
    with torch.no_grad():
        for i in tqdm(range(steps), desc=desc, unit="step", disable=None if progress is None else not progress):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            d = (x - denoise(x, x.new_full((n,), s))) / s
            x_next = x + (s_next - s) * d
            if solver == "heun" and s_next > 0:
                d_next = (x_next - denoise(x_next, x.new_full((n,), s_next))) / s_next
                x_next = x + (s_next - s) * (d + d_next) / 2
            x = x_next
    return x


def sample(model, points: torch.Tensor, valid: Optional[torch.Tensor] = None, *, steps: int = 18,
           solver: str = "heun", sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
           generator: Optional[torch.Generator] = None, progress: Optional[bool] = None) -> torch.Tensor:
    """Generate images conditioned on all valid points at once.

    model: a ConditionalDenoiser; points [n, M, 2] (row, col); valid [n, M] bool or None (all valid).
    The initial noise comes from `generator` (drawn on its device); the solver is deterministic, so the
    same generator seed gives the same images. progress: tqdm bar (None: on a terminal).
    Returns images [n, C, S, S] in the model's dtype on points' device (not clamped).
    """
    points, valid = _check_points("sample", points, valid)
    core = _core(model)
    dtype = next(core.parameters()).dtype
    shape = (points.shape[0], core.img_channels, core.image_size, core.image_size)
    return _integrate(lambda x, s: model(x, s, points, valid), shape, points.device, dtype, steps=steps,
                      solver=solver, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, generator=generator,
                      progress=progress, desc="sample")


def composed_sample(model, points: torch.Tensor, valid: Optional[torch.Tensor] = None, *, steps: int = 18,
                    solver: str = "heun", sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    generator: Optional[torch.Generator] = None, progress: Optional[bool] = None) -> torch.Tensor:
    """Projective composition: at every noise level the denoiser is
    D(x) = sum_i D(x | c_i) - (k - 1) D(x | no conditioner) over the k valid conditioners of each sample
    (k = 0 gives the unconditional D). The k + 1 evaluations of all samples run as one batched model call
    per solver stage. Same arguments and result as :func:`sample`.
    """
    points, valid = _check_points("composed_sample", points, valid)
    core = _core(model)
    dtype = next(core.parameters()).dtype
    n, M = valid.shape
    device = points.device
    b_idx, m_idx = valid.nonzero(as_tuple=True)  # one single-conditioner row per valid (b, m)
    owner = torch.cat([b_idx, torch.arange(n, device=device)])  # [n_valid + n]: sample of each row
    row_points = torch.cat([points[b_idx, m_idx], points.new_zeros(n, 2)])[:, None, :]  # [rows, 1, 2]
    row_valid = torch.cat([torch.ones_like(b_idx, dtype=torch.bool),
                           torch.zeros(n, dtype=torch.bool, device=device)])[:, None]  # [rows, 1]
    k = valid.sum(dim=1)  # [n]
    coeff = torch.cat([torch.ones_like(b_idx), 1 - k]).to(dtype)  # +1 per conditioner, -(k-1) background

    def denoise(x, sigma):
        d = model(x[owner], sigma[owner], row_points, row_valid)  # [rows, C, S, S]
        out = torch.zeros_like(x)
        return out.index_add_(0, owner, d * coeff[:, None, None, None].to(d.dtype))

    shape = (n, core.img_channels, core.image_size, core.image_size)
    return _integrate(denoise, shape, device, dtype, steps=steps, solver=solver, sigma_min=sigma_min,
                      sigma_max=sigma_max, rho=rho, generator=generator, progress=progress, desc="composed_sample")
