"""Jacobian locality probes: how far a score model's output at a pixel depends on other pixels and on
each conditioner.

    pixel_locality(fn, x, *, radius, method="auto") -> PixelLocality
    conditioner_locality(fn, x, cond, cond_mask)    -> ConditionerLocality
"""

from __future__ import annotations

import torch

from ..ops import _checks as check
from ..reference.probe import (
    conditioner_locality_reference,
    pixel_locality_colored_reference,
    pixel_locality_reference,
)
from .results import ConditionerLocality, PixelLocality

__all__ = ["pixel_locality", "conditioner_locality", "PixelLocality", "ConditionerLocality"]

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


def pixel_locality(fn, x: torch.Tensor, *, radius: int, method: str = "auto") -> PixelLocality:
    """Profile of mean |d fn(x)[b, c', p] / d x[b, c, p + delta]| over offsets |delta| <= radius.

    fn: [B, C, H, W] -> [B, C', H, W], treating batch items independently (call model.eval()).
    method: "exact" (one backward pass per output element), "colored" (one pass per output channel and
    colour, (2R+1)^2 colours; exact when fn is radius-local, leakage NaN since it cannot see beyond R),
    "auto" (currently "exact"). Returns PixelLocality (.profile, .mass_radius(q),
    .leakage).
    """
    op = "pixel_locality"
    check.tensor(op, "x", x, ndim=4, layout="[B, C, H, W]")
    check.floating(op, "x", x)
    if not callable(fn):
        raise TypeError(f"{op}: fn must be callable ([B, C, H, W] -> [B, C', H, W]), got {type(fn).__name__}")
    check.positive_int(op, "radius", radius, minimum=0)
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS}, got {method!r}")
    B, _, H, W = x.shape
    if B == 0:
        raise ValueError(f"{op}: x has an empty batch ({check.fmt_shape(x.shape)}); the profile is a mean "
                         f"over batch items, so pass at least one")
    _output_of(op, fn, (x,), B, H, W)
    if method == "colored":
        return pixel_locality_colored_reference(fn, x, radius)
    # "auto" is exact until the coloured probe can verify itself against sampled exact rows.
    return pixel_locality_reference(fn, x, radius)


def conditioner_locality(fn, x: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor
                         ) -> ConditionerLocality:
    """Attribution of each output pixel to each conditioner, and the fraction inside each one's mask.

    fn(x, cond) -> [B, C', H, W]; x: [B, C, H, W]; cond: [B, M, Dc]; cond_mask: [B, M, H, W] bool.
    Returns ConditionerLocality(.attribution [B, M, H, W], .inside_fraction [B, M]).
    """
    op = "conditioner_locality"
    check.tensor(op, "x", x, ndim=4, layout="[B, C, H, W]")
    check.floating(op, "x", x)
    check.tensor(op, "cond", cond, ndim=3, layout="[B, M, Dc]")
    check.floating(op, "cond", cond)
    if not callable(fn):
        raise TypeError(f"{op}: fn must be callable (fn(x, cond) -> [B, C', H, W]), got {type(fn).__name__}")
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
    return conditioner_locality_reference(fn, x, cond, cond_mask)
