"""The training noise-level choice shared by the diffusion demos (`--sigma-dist`, `--sigma-loc`, `--sigma-scale`).

Laplace(0, 1) in log-SNR is the demos' default: it concentrates training on the middle noise levels where an
object's place is decided. On the bumps demo it took held-out accuracy from 0.16 (EDM's log-normal, p_mean -1.2)
to 0.99 in the same 1000 steps.
"""

from __future__ import annotations

# (loc, scale) per distribution when the command line gives none
SIGMA_PARAMS = {"lognormal": (-1.2, 1.2), "laplace": (0.0, 1.0)}


def add_arguments(p, default: str = "laplace") -> None:
    p.add_argument("--sigma-dist", choices=tuple(SIGMA_PARAMS), default=None,
                   help=f"training noise-level distribution (default {default}): EDM's log-normal in sigma, or "
                        "Laplace in log-SNR (concentrates on the middle noise levels, where an object's place is "
                        "decided)")
    p.add_argument("--sigma-loc", type=float, default=None,
                   help="its location: log-normal p_mean, or Laplace mu (log-SNR = -2 ln sigma)")
    p.add_argument("--sigma-scale", type=float, default=None, help="its spread: p_std, or the Laplace scale")


def resolve(settings: dict, args) -> dict:
    """Fill settings' sigma_loc / sigma_scale from the command line or the chosen distribution's defaults."""
    loc, scale = SIGMA_PARAMS[settings["sigma_dist"]]
    settings["sigma_loc"] = loc if getattr(args, "sigma_loc", None) is None else args.sigma_loc
    settings["sigma_scale"] = scale if getattr(args, "sigma_scale", None) is None else args.sigma_scale
    return settings


def distribution(settings: dict):
    """The sigma distribution object the settings name (fastcomp.models.LaplaceLogSNR or LogNormalSigma)."""
    from fastcomp.models import LaplaceLogSNR, LogNormalSigma

    if settings["sigma_dist"] == "laplace":
        return LaplaceLogSNR(mu=settings["sigma_loc"], scale=settings["sigma_scale"])
    return LogNormalSigma(p_mean=settings["sigma_loc"], p_std=settings["sigma_scale"])
