"""Reference Jacobian probes: exact Jacobians, one backward pass per output element (c', i, j).

A pass for output element (c', i, j) back-propagates the sum over the batch of fn(x)[:, c', i, j]. That
yields d fn[b, c', i, j] / d x[b] for every b at once *provided fn treats batch items independently*
(every denoiser in eval mode does; BatchNorm in train mode does not). `check_batch_independent` verifies
that with one extra pass and refuses a batch-mixing fn instead of returning a silently wrong answer.

Cost: C' * H * W backward passes. This is the spec and the baseline, not the fast path.
"""

from __future__ import annotations

import torch

from ..probe.results import ConditionerLocality, PixelLocality


def check_batch_independent(op: str, y: torch.Tensor, inp: torch.Tensor, name: str) -> None:
    """Raise if y[0] depends on inp[1:] (a random cotangent on item 0 must give zero gradient elsewhere)."""
    if y.shape[0] < 2:
        return
    cotangent = torch.zeros_like(y)
    cotangent[0] = torch.randn_like(y[0])
    (g,) = torch.autograd.grad(y, inp, cotangent, retain_graph=True, allow_unused=True)
    if g is not None and bool(g[1:].abs().sum() > 0):
        raise ValueError(f"{op}: fn mixes batch items (its output for item 0 depends on {name} of other "
                         f"items), so per-item Jacobians are undefined; call model.eval() (BatchNorm in "
                         f"train mode does this) or probe one item at a time")


def _output_rows(y: torch.Tensor):
    """Yield (c', i, j, scalar) for each output element, summed over the batch."""
    _, C_out, H, W = y.shape
    for c in range(C_out):
        for i in range(H):
            for j in range(W):
                yield c, i, j, y[:, c, i, j].sum()


def pixel_locality_reference(fn, x: torch.Tensor, radius: int) -> PixelLocality:
    """x: [B, C, H, W]; fn(x): [B, C', H, W]."""
    B, C, H, W = x.shape
    R = radius
    x = x.detach().requires_grad_(True)
    y = fn(x)
    check_batch_independent("pixel_locality", y, x, "pixels")
    C_out = y.shape[1]

    profile_sum = torch.zeros(2 * R + 1, 2 * R + 1, dtype=torch.float64, device=x.device)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    inside = torch.zeros((), dtype=torch.float64, device=x.device)
    for _, i, j, scalar in _output_rows(y):
        (g,) = torch.autograd.grad(scalar, x, retain_graph=True, allow_unused=True)
        if g is None:  # fn ignores x entirely
            continue
        a = g.abs().to(torch.float64).sum(dim=(0, 1))  # [H, W]: summed over b and input channels c
        total += a.sum()
        i0, i1 = max(i - R, 0), min(i + R + 1, H)
        j0, j1 = max(j - R, 0), min(j + R + 1, W)
        patch = a[i0:i1, j0:j1]
        inside += patch.sum()
        profile_sum[i0 - i + R:i1 - i + R, j0 - j + R:j1 - j + R] += patch

    # Number of (b, c, c', p) terms averaged at each offset: p + delta must stay inside the image.
    offsets = torch.arange(-R, R + 1, device=x.device)
    valid_rows = (H - offsets.abs()).clamp(min=0).to(torch.float64)
    valid_cols = (W - offsets.abs()).clamp(min=0).to(torch.float64)
    count = B * C * C_out * valid_rows[:, None] * valid_cols[None, :]
    profile = torch.where(count > 0, profile_sum / count.clamp(min=1), torch.zeros_like(profile_sum))
    leakage = float((total - inside) / total) if float(total) > 0 else 0.0
    return PixelLocality(profile=profile, radius=R, leakage=max(leakage, 0.0), method="exact")


def conditioner_locality_reference(fn, x: torch.Tensor, cond: torch.Tensor,
                                   cond_mask: torch.Tensor) -> ConditionerLocality:
    """x: [B, C, H, W]; cond: [B, M, Dc]; cond_mask: [B, M, H, W] bool; fn(x, cond): [B, C', H, W]."""
    B, M, _ = cond.shape
    H, W = x.shape[-2:]
    cond = cond.detach().requires_grad_(True)
    y = fn(x.detach(), cond)
    check_batch_independent("conditioner_locality", y, cond, "conditioners")

    attribution = torch.zeros(B, M, H, W, dtype=torch.float64, device=x.device)
    for _, i, j, scalar in _output_rows(y):
        (g,) = torch.autograd.grad(scalar, cond, retain_graph=True, allow_unused=True)
        if g is not None:
            attribution[:, :, i, j] += g.abs().to(torch.float64).sum(dim=2)  # sum over features

    total = attribution.sum(dim=(2, 3))  # [B, M]
    inside = (attribution * cond_mask).sum(dim=(2, 3))
    inside_fraction = torch.where(total > 0, inside / total.clamp(min=torch.finfo(torch.float64).tiny),
                                  torch.full_like(total, float("nan")))
    return ConditionerLocality(attribution=attribution, inside_fraction=inside_fraction)
