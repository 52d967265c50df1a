"""pixel_locality: the |J| profile of a model's output at a pixel over input offsets, by batched probes.

Exact probes (one per output or input element) or coloured ones (one per channel and colour, exact for a
radius-local fn), evaluated by fastcomp.probe._engine and reduced by the fused probe_demux op. The spec is
fastcomp.reference.probe (pixel_locality_reference, pixel_locality_colored_reference).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ..ops import _checks as check
from ..reference.probe import check_batch_independent
from ..reference.probe_results import PixelLocality
from ._engine import MODES, PixelProber, check_chunk_size, check_output

METHODS = ("auto", "exact", "colored")
ON_LEAKAGE = ("fallback", "report", "raise")


class LeakageWarning(UserWarning):
    """The coloured probe's sampled check found |J| mass beyond the radius: fn is not radius-local."""


def _colored_probes(R: int, H: int, W: int):
    """Colours (a, b) with a < min(2R+1, H), b < min(2R+1, W), once per probe channel; stride 2R+1."""
    s = 2 * R + 1
    ab = torch.cartesian_prod(torch.arange(min(s, H)), torch.arange(min(s, W))).reshape(-1, 2)

    def make(K: int):
        channels = torch.arange(K).repeat_interleave(ab.shape[0])
        return channels, ab.repeat(K, 1)

    return make


def _pixel_probes(H: int, W: int, pixels: Optional[torch.Tensor] = None):
    """One probe per (channel, pixel): every pixel, or the given [n, 3] (channel, row, col) triples (whose
    channel is taken modulo the probe channels K). Their stride exceeds the image, so each probe covers
    one pixel and everything beyond the radius counts as outside."""
    def make(K: int):
        if pixels is not None:
            return pixels[:, 0] % K, pixels[:, 1:]
        ij = torch.cartesian_prod(torch.arange(H), torch.arange(W)).reshape(-1, 2)
        return torch.arange(K).repeat_interleave(ij.shape[0]), ij.repeat(K, 1)

    return make


class NonFiniteJacobianWarning(UserWarning):
    """fn's Jacobian at x has NaN or inf entries: the profile, leakage and mass radii are NaN."""


def _finite_mass(op: str, *parts) -> bool:
    """False (with a warning) when the probes' |J| mass is not finite: nothing can be measured from it."""
    total = float(sum(p.sum() for p in parts))
    if math.isfinite(total):
        return True
    warnings.warn(f"{op}: fn's Jacobian at x has non-finite entries (|J| mass {total}): the profile, leakage "
                  f"and mass radii are NaN; check fn(x) for NaN/inf (e.g. try a lower noise level or other "
                  f"inputs)", NonFiniteJacobianWarning, stacklevel=3)
    return False


def _locality(sums, counts, outside, R: int, method: str, leakage=None, check=None) -> PixelLocality:
    profile = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    total = float(sums.sum() + outside)
    if not math.isfinite(total):
        leakage = math.nan  # never an estimate from a NaN Jacobian (it compares false with everything)
    elif leakage is None:
        leakage = float(outside) / total if total > 0 else 0.0
    return PixelLocality(profile=profile, radius=R, leakage=leakage, method=method, check=check)


def pixel_locality(fn, x: torch.Tensor, *, radius: int, method: str = "auto", chunk_size: Optional[int] = None,
                   mode: Optional[str] = None, on_leakage: str = "fallback", n_check: int = 8,
                   tolerance: float = 1e-6, seed: int = 0, backend: Optional[str] = None,
                   progress: Optional[bool] = None) -> PixelLocality:
    """Profile of mean |d fn(x)[b, c', p] / d x[b, c, p + delta]| over offsets |delta| <= radius.

    fn: [B, C, H, W] -> [B, C', H, W], treating batch items independently (call model.eval()).
    method:
      "exact"   every Jacobian entry: one probe per output element (reverse mode) or input element
                (forward mode), batched; measures .leakage exactly.
      "colored" one probe per channel and colour (i mod s, j mod s), s = 2R+1: (2R+1)^2 probes per channel
                whatever the image size; exact when fn is radius-local, blind beyond R (.leakage NaN).
      "auto"    coloured, then exact rows at n_check random pixels: if their mass beyond the radius
                exceeds `tolerance` (a fraction of their total), fn is not radius-local and the coloured
                profile would be aliased: warn (LeakageWarning) and, per on_leakage, "fallback" to exact,
                "report" the coloured profile with .leakage = the sampled estimate, or "raise" ValueError.
    chunk_size: probes per batched pass (memory grows linearly with it); None picks one from the sizes.
    mode: "forward" (Jacobian-vector products over input channels), "reverse" (vector-Jacobian products
      over output channels) or None (forward when C <= C', else reverse; falls back to reverse when fn
      does not support forward-mode AD).
    backend: the probe_demux backend (None: fastest available). progress: tqdm bar (None: on a terminal).
    Returns PixelLocality (.profile [2R+1, 2R+1] float64, .mass_radius(q), .leakage, .method, .check).
    """
    op = "pixel_locality"
    check.tensor(op, "x", x, ndim=4, layout="[B, C, H, W]")
    check.floating(op, "x", x)
    if not callable(fn):
        raise TypeError(f"{op}: fn must be callable ([B, C, H, W] -> [B, C', H, W]), got {type(fn).__name__}")
    radius = check.positive_int(op, "radius", radius, minimum=0)
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS}, got {method!r}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"{op}: mode must be None or one of {MODES}, got {mode!r}")
    if on_leakage not in ON_LEAKAGE:
        raise ValueError(f"{op}: on_leakage must be one of {ON_LEAKAGE}, got {on_leakage!r}")
    n_check = check.positive_int(op, "n_check", n_check)
    chunk_size = check_chunk_size(op, chunk_size)
    B, _, H, W = x.shape
    if B == 0:
        raise ValueError(f"{op}: x has an empty batch ({check.fmt_shape(x.shape)}); the profile is a mean "
                         f"over batch items, so pass at least one")
    check_output(op, fn, (x,), B, H, W)
    x = x.detach()
    xg = x.clone().requires_grad_(True)
    y = fn(xg)
    R = radius
    if not y.requires_grad:  # fn ignores x: every Jacobian entry is 0
        return PixelLocality(profile=torch.zeros(2 * R + 1, 2 * R + 1, dtype=torch.float64, device=x.device),
                             radius=R, leakage=0.0, method=method if method != "auto" else "colored")
    check_batch_independent(op, y, xg, "pixels")
    C_out = y.shape[1]
    del y, xg
    prober = PixelProber(op, fn, x, C_out, mode, chunk_size, backend, progress)
    big_stride = max(H, W) + 2 * R + 1

    def exact():
        sums, counts, outside = prober.run(_pixel_probes(H, W), big_stride, R, f"{op} exact")
        _finite_mass(op, sums, outside)
        return _locality(sums, counts, outside, R, "exact")

    if method == "exact":
        return exact()
    sums, counts, aliased = prober.run(_colored_probes(R, H, W), 2 * R + 1, R, f"{op} colored")
    if not _finite_mass(op, sums, aliased) or method == "colored":  # a NaN Jacobian has nothing to check
        return _locality(sums, counts, aliased, R, "colored", leakage=float("nan"))

    # auto: exact rows (or columns, in forward mode) at a few random pixels decide whether fn is R-local.
    g = torch.Generator().manual_seed(seed)
    n = min(n_check, H * W * prober.channels)
    picks = torch.randperm(H * W * prober.channels, generator=g)[:n]
    pixels = torch.stack([picks // (H * W), (picks % (H * W)) // W, picks % W], dim=1)
    s_sums, _, s_out = prober.run(_pixel_probes(H, W, pixels), big_stride, R, f"{op} check")
    s_total = float(s_sums.sum() + s_out)
    sampled = float(s_out) / s_total if s_total > 0 else 0.0 if s_total == 0 else math.nan
    c_total = float(sums.sum() + aliased)
    aliased_fraction = float(aliased) / c_total if c_total > 0 else 0.0
    info = dict(pixels=pixels, sampled_leakage=sampled, aliased_fraction=aliased_fraction, tolerance=tolerance,
                fell_back=False)
    if sampled <= tolerance and aliased_fraction <= tolerance:
        return _locality(sums, counts, aliased, R, "colored", leakage=sampled, check=info)
    message = (f"{op}: fn is not radius-local at radius {R}: exact rows at {n} random pixels put "
               f"{sampled:.3g} of their |J| mass beyond the radius (tolerance {tolerance:g}), so the coloured "
               f"probe aliases it onto wrong offsets")
    if on_leakage == "raise":
        raise ValueError(message + "; use a larger radius or method='exact'")
    if on_leakage == "report":
        warnings.warn(message + "; returning the coloured profile with the sampled leakage "
                      "(on_leakage='report')", LeakageWarning, stacklevel=2)
        return _locality(sums, counts, aliased, R, "colored", leakage=sampled, check=info)
    warnings.warn(message + "; falling back to the exact probe (on_leakage='fallback')", LeakageWarning,
                  stacklevel=2)
    result = exact()
    info["fell_back"] = True
    return PixelLocality(profile=result.profile, radius=R, leakage=result.leakage, method="exact", check=info)
