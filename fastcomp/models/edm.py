"""EDM training: noise-level distributions and the loss (Karras et al. 2022, arXiv 2206.00364).

The noise-level sampling distribution is a choice (background.md section 5):
- LogNormalSigma: EDM's ln(sigma) ~ N(p_mean, p_std^2);
- LaplaceLogSNR: log-SNR lambda = -2 ln(sigma) ~ Laplace(mu, scale), the importance sampling of
  "Improved Noise Schedule for Diffusion Training" (arXiv 2407.03297): most draws land on the middle
  noise levels, where the denoising task is hardest, instead of re-weighting the loss there.
Both keep EDM's loss weighting lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, which
makes the effective target of F unit-variance at every sigma.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops._checks import is_int

def _generator_device(generator: Optional[torch.Generator], device) -> torch.device:
    return torch.device(device) if generator is None else generator.device


def randn_like_on(shape, generator: Optional[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """torch.randn drawn on the generator's device (so a CPU generator gives the same numbers whatever
    the target device), then moved to `device`."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    z = torch.randn(shape, generator=generator, device=_generator_device(generator, device), dtype=dtype)
    return z.to(device)


def _rand(n: int, generator, device) -> torch.Tensor:
    device = torch.device(device) if device is not None else torch.device("cpu")
    u = torch.rand(n, generator=generator, device=_generator_device(generator, device), dtype=torch.float64)
    return u.to(device)


def _check_n(name: str, n) -> int:
    if not is_int(n) or n < 0:
        raise ValueError(f"{name}.sample: n must be an int >= 0 (how many noise levels), got {n!r}")
    return int(n)


class LogNormalSigma:
    """EDM's training distribution: ln(sigma) ~ N(p_mean, p_std^2). .sample(n) -> sigma [n] float32."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        if not p_std > 0:
            raise ValueError(f"LogNormalSigma: p_std must be > 0, got {p_std!r}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def sample(self, n: int, *, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        n = _check_n("LogNormalSigma", n)
        z = randn_like_on((n,), generator, device, dtype=torch.float64)
        return (self.p_mean + self.p_std * z).exp().float()

    def __repr__(self) -> str:
        return f"LogNormalSigma(p_mean={self.p_mean}, p_std={self.p_std})"


class LaplaceLogSNR:
    """log-SNR lambda = -2 ln(sigma) ~ Laplace(mu, scale) (density exp(-|lambda - mu| / scale) / (2 scale)),
    i.e. sigma = exp(-lambda / 2): half the draws have |lambda - mu| < scale ln 2. .sample(n) -> sigma [n]
    float32."""

    def __init__(self, mu: float = 0.0, scale: float = 0.5):
        if not scale > 0:
            raise ValueError(f"LaplaceLogSNR: scale must be > 0, got {scale!r}")
        self.mu, self.scale = float(mu), float(scale)

    def sample(self, n: int, *, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        n = _check_n("LaplaceLogSNR", n)
        u = _rand(n, generator, device) - 0.5  # [-0.5, 0.5)
        # inverse CDF; the clamp keeps u = -0.5 (probability 2^-53) finite
        log_snr = self.mu - self.scale * u.sign() * torch.log1p(-2 * u.abs()).clamp(min=-700.0)
        return (-log_snr / 2).exp().float()

    def __repr__(self) -> str:
        return f"LaplaceLogSNR(mu={self.mu}, scale={self.scale})"


def edm_loss(model, batch, sigma_dist=None, *, generator: Optional[torch.Generator] = None,
             cond_dropout: float = 0.0) -> torch.Tensor:
    """EDM denoising loss of a ConditionalDenoiser on a SceneBatch (images [n, C, S, S], points [n, M, 2],
    valid [n, M]): mean over samples of lambda(sigma) * mean over pixels of (D(y + sigma n) - y)^2, with
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 and sigma ~ sigma_dist
    (default LogNormalSigma()). cond_dropout: probability of dropping all of a sample's conditioners (marks
    them invalid), which teaches the unconditional D(x | none) that composed_sample needs. Returns a
    scalar; noise and sigma come from `generator` (drawn on its device).
    """
    sigma_dist = LogNormalSigma() if sigma_dist is None else sigma_dist
    images, points, valid = batch.images, batch.points, batch.valid
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("edm_loss: batch.images must be a [n, C, S, S] tensor")
    n, device = images.shape[0], images.device
    sigma = sigma_dist.sample(n, generator=generator, device=device).to(images.dtype)  # [n]
    noise = randn_like_on(images.shape, generator, device, dtype=images.dtype)
    if cond_dropout > 0:
        keep = _rand(n, generator, device) >= cond_dropout  # [n]
        valid = valid & keep[:, None]
    denoised = model(images + sigma[:, None, None, None] * noise, sigma, points, valid)
    core = getattr(model, "module", getattr(model, "_orig_mod", model))  # unwrap DDP / torch.compile
    sd = float(getattr(core, "sigma_data", 0.5))
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2  # [n]
    per_sample = (denoised - images).square().flatten(1).mean(dim=1)
    return (weight * per_sample).mean()
