"""conditioner_locality: how much each output pixel depends on each conditioner, and how much of that
lies inside the conditioner's mask. Exact, by forward-mode JVPs per conditioner feature (vmapped in chunks)
or batched VJPs per output element. The spec is fastcomp.reference.probe.conditioner_locality_reference.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch.func import jvp, vmap

from ..ops import _checks as check
from ..reference.probe import check_batch_independent
from ..reference.probe_results import ConditionerLocality
from ._engine import _progress, batched_vjp, check_chunk_size, check_output, default_chunk, math_attention

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
    check_output(op, fn, (x, cond), B, H, W)
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
