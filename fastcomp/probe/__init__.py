"""Jacobian locality probes: how far a score model's output at a pixel depends on other pixels and on
each conditioner.

    pixel_locality(fn, x, *, radius, method="auto") -> PixelLocality
    conditioner_locality(fn, x, cond, cond_mask)    -> ConditionerLocality
    locality_vs_noise(denoiser, x0, sigmas, *, radius) -> NoiseLocality

The probes run batched and chunked (fastcomp.probe._engine) and are reduced to the profile by the fused
probe_demux op (C++ on CPU, Triton on CUDA; fastcomp.probe._demux).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ..ops import _checks as check
from ..reference.probe import check_batch_independent
from ..ops.probe_demux import Demuxed, probe_demux  # noqa: F401  (Demuxed: probe_demux's result type)
from ._engine import MODES, PixelProber, check_chunk_size
from .noise import NoiseLocality, locality_vs_noise
from .results import ConditionerLocality, PixelLocality

__all__ = ["pixel_locality", "conditioner_locality", "locality_vs_noise", "PixelLocality", "ConditionerLocality",
           "NoiseLocality", "LeakageWarning", "NonFiniteJacobianWarning", "probe_demux", "METHODS"]

METHODS = ("auto", "exact", "colored")


def _output_of(op: str, fn, args, B: int, H: int, W: int) -> None:
    """Evaluate fn once without grad to check the output shape before the expensive passes."""
    with torch.no_grad():
        y = fn(*args)
    if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[0] != B or tuple(y.shape[2:]) != (H, W):
        got = check.fmt_shape(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{op}: fn must return [B, C', H, W] = [{B}, C', {H}, {W}] (same batch and image "
                         f"size as x), got {got}")
    if not y.is_floating_point():
        raise TypeError(f"{op}: fn must return a floating tensor, got {check.dtype_name(y.dtype)}")


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
    _output_of(op, fn, (x,), B, H, W)
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


COND_METHODS = ("auto", "forward", "reverse")


def conditioner_locality(fn, x: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor, *,
                         method: str = "auto", chunk_size: Optional[int] = None,
                         progress: Optional[bool] = None) -> ConditionerLocality:
    """Attribution of each output pixel to each conditioner, and the fraction inside each one's mask.

    fn(x, cond) -> [B, C', H, W]; x: [B, C, H, W]; cond: [B, M, Dc]; cond_mask: [B, M, H, W] bool.
    method: "forward" (one Jacobian-vector product per conditioner feature (m, f), M * Dc in all, vmapped
    in chunks of chunk_size), "reverse" (one batched vector-Jacobian product per output element, C' * H * W)
    or "auto" (forward, falling back to reverse when fn does not support forward-mode AD). Both are exact.
    Returns ConditionerLocality(.attribution [B, M, H, W], .inside_fraction [B, M]).
    """
    op = "conditioner_locality"
    check.tensor(op, "x", x, ndim=4, layout="[B, C, H, W]")
    check.floating(op, "x", x)
    check.tensor(op, "cond", cond, ndim=3, layout="[B, M, Dc]")
    check.floating(op, "cond", cond)
    if not callable(fn):
        raise TypeError(f"{op}: fn must be callable (fn(x, cond) -> [B, C', H, W]), got {type(fn).__name__}")
    if method not in COND_METHODS:
        raise ValueError(f"{op}: method must be one of {COND_METHODS}, got {method!r}")
    chunk_size = check_chunk_size(op, chunk_size)
    B, _, H, W = x.shape
    M = cond.shape[1]
    if cond.shape[0] != B:
        raise ValueError(f"{op}: cond must have shape [B, M, Dc] with B = {B} from x, "
                         f"got {check.fmt_shape(cond.shape)}")
    check.tensor(op, "cond_mask", cond_mask, ndim=4, layout="[B, M, H, W]")
    if cond_mask.dtype != torch.bool:
        raise TypeError(f"{op}: cond_mask must be bool, got {check.dtype_name(cond_mask.dtype)}")
    check.shape(op, "cond_mask", cond_mask, (B, M, H, W), "[B, M, H, W]", "B, H, W from x, M from cond")
    check.same_device(op, "x", x, cond=cond, cond_mask=cond_mask)
    if B == 0:
        raise ValueError(f"{op}: x has an empty batch ({check.fmt_shape(x.shape)}); pass at least one item")
    _output_of(op, fn, (x, cond), B, H, W)
    x, cond = x.detach(), cond.detach()
    cg = cond.clone().requires_grad_(True)
    y = fn(x, cg)
    check_batch_independent(op, y, cg, "conditioners")
    C_out = y.shape[1]
    del y, cg
    attribution = None
    if method in ("auto", "forward"):
        try:
            attribution = _conditioner_forward(fn, x, cond, C_out, chunk_size, progress)
        except (RuntimeError, NotImplementedError) as e:
            if method == "forward":
                raise
            warnings.warn(f"{op}: forward-mode probes are not supported by this fn "
                          f"({str(e).splitlines()[0][:200]}); using reverse mode", RuntimeWarning, stacklevel=2)
    if attribution is None:
        attribution = _conditioner_reverse(fn, x, cond, chunk_size, progress)
    total = attribution.sum(dim=(2, 3))  # [B, M]
    inside = (attribution * cond_mask).sum(dim=(2, 3))
    inside_fraction = torch.where(total > 0, inside / total.clamp(min=torch.finfo(torch.float64).tiny),
                                  torch.full_like(total, float("nan")))
    return ConditionerLocality(attribution=attribution, inside_fraction=inside_fraction)


def _conditioner_forward(fn, x, cond, C_out, chunk_size, progress) -> torch.Tensor:
    """[B, M, H, W] float64: one JVP per conditioner feature (m, f), tangent 1 at cond[:, m, f] for all b."""
    from torch.func import jvp, vmap

    from ._engine import _progress, default_chunk, math_attention

    B, M, Dc = cond.shape
    H, W = x.shape[-2:]
    n = M * Dc
    chunk = chunk_size or default_chunk(B * max(C_out, x.shape[1]) * H * W, n)
    attribution = torch.zeros(B, M, H, W, dtype=torch.float64, device=x.device)
    eye = torch.eye(n, dtype=cond.dtype, device=cond.device).view(n, 1, M, Dc)
    with _progress(n, "conditioner_locality forward", progress) as bar, math_attention():
        for start in range(0, n, chunk):
            tangents = eye[start:start + chunk].expand(-1, B, -1, -1).contiguous()  # [n, B, M, Dc]
            out = vmap(lambda t: jvp(lambda c: fn(x, c), (cond,), (t,))[1])(tangents)  # [n, B, C', H, W]
            mass = out.detach().abs().to(torch.float64).sum(dim=2)  # [n, B, H, W]
            m_of = torch.arange(start, start + tangents.shape[0], device=x.device) // Dc
            attribution.index_add_(1, m_of, mass.transpose(0, 1))
            bar.update(tangents.shape[0])
    return attribution


def _conditioner_reverse(fn, x, cond, chunk_size, progress) -> torch.Tensor:
    """[B, M, H, W] float64: one batched VJP per output element (c', i, j), cotangent 1 at all b."""
    from ._engine import _progress, batched_vjp, default_chunk

    B, M, Dc = cond.shape
    H, W = x.shape[-2:]
    batched = True
    cg = cond.clone().requires_grad_(True)
    y = fn(x, cg)
    C_out = y.shape[1]
    n = C_out * H * W
    chunk = chunk_size or default_chunk(B * max(C_out, x.shape[1]) * H * W, n)
    attribution = torch.zeros(B, M, H * W, dtype=torch.float64, device=x.device)
    with _progress(n, "conditioner_locality reverse", progress) as bar:
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            onehot = torch.zeros(k, n, dtype=y.dtype, device=y.device)  # rows start..start+k of the identity
            onehot[torch.arange(k), torch.arange(start, start + k)] = 1
            cot = onehot.view(k, 1, C_out, H, W).expand(-1, B, -1, -1, -1)  # [k, B, C', H, W]
            g, batched = batched_vjp("conditioner_locality", y, cg, cot, batched)
            mass = g.abs().to(torch.float64).sum(dim=3)  # [n, B, M]
            pix = torch.arange(start, start + cot.shape[0], device=x.device) % (H * W)
            attribution.index_add_(2, pix, mass.permute(1, 2, 0))
            bar.update(cot.shape[0])
    return attribution.view(B, M, H, W)
