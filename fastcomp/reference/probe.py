"""Reference Jacobian probes: exact Jacobians, one backward pass per output element (c', i, j).

A pass for output element (c', i, j) back-propagates the sum over the batch of fn(x)[:, c', i, j]. That
yields d fn[b, c', i, j] / d x[b] for every b at once *provided fn treats batch items independently*
(every denoiser in eval mode does; BatchNorm in train mode does not). `check_batch_independent` verifies
that with one extra pass and refuses a batch-mixing fn instead of returning a silently wrong answer.

Cost: C' * H * W backward passes. This is the spec and the baseline, not the fast path.
"""

from __future__ import annotations

import torch

from .probe_results import ConditionerLocality, PixelLocality


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
    outside = torch.zeros((), dtype=torch.float64, device=x.device)
    for _, i, j, scalar in _output_rows(y):
        (g,) = torch.autograd.grad(scalar, x, retain_graph=True, allow_unused=True)
        if g is None:  # fn ignores x entirely
            continue
        a = g.abs().to(torch.float64).sum(dim=(0, 1))  # [H, W]: summed over b and input channels c
        total += a.sum()
        i0, i1 = max(i - R, 0), min(i + R + 1, H)
        j0, j1 = max(j - R, 0), min(j + R + 1, W)
        profile_sum[i0 - i + R:i1 - i + R, j0 - j + R:j1 - j + R] += a[i0:i1, j0:j1]
        # Sum the outside directly (not total - inside), so a local fn has leakage exactly 0.
        a[i0:i1, j0:j1] = 0
        outside += a.sum()

    profile = _mean_per_offset(profile_sum, B, C, C_out, H, W, R)
    leakage = float(outside / total) if float(total) > 0 else 0.0
    return PixelLocality(profile=profile, radius=R, leakage=leakage, method="exact")


def pixel_locality_colored_reference(fn, x: torch.Tensor, radius: int) -> PixelLocality:
    """Structured probes (Curtis-Powell-Reid colouring): one backward pass per (output channel, colour).

    Output pixels p whose rows agree mod s = 2R+1 and whose columns agree mod s form one colour. When fn is
    R-local, every input pixel q lies within distance R (max norm) of at most one pixel of a colour, so
    the colour's vector-Jacobian product at q IS that pixel's Jacobian entry J[p, q]: demultiplex it to the
    offset delta = q - p. Exact for R-local fn, at C' * s^2 passes instead of C' * H * W. It cannot see
    dependence beyond R (that would alias onto wrong offsets), so it reports leakage as NaN: use "exact"
    to measure leakage.
    """
    B, C, H, W = x.shape
    R = radius
    s = 2 * R + 1
    x = x.detach().requires_grad_(True)
    y = fn(x)
    check_batch_independent("pixel_locality", y, x, "pixels")
    C_out = y.shape[1]

    rows = torch.arange(H, device=x.device)
    cols = torch.arange(W, device=x.device)
    profile_sum = torch.zeros(s * s, dtype=torch.float64, device=x.device)
    for a in range(min(s, H)):
        for b in range(min(s, W)):
            # The colour's output pixel nearest q (within R) is p = q - delta with delta in [-R, R]; this
            # geometry depends on the colour only, so it serves every output channel.
            d_row = (rows - a + R) % s - R  # [H]
            d_col = (cols - b + R) % s - R  # [W]
            p_row, p_col = rows - d_row, cols - d_col
            p_ok = ((p_row >= 0) & (p_row < H))[:, None] & ((p_col >= 0) & (p_col < W))[None, :]
            slot = ((d_row + R)[:, None] * s + (d_col + R)[None, :])[p_ok]  # profile index per valid q
            for c in range(C_out):
                cotangent = torch.zeros_like(y)
                cotangent[:, c, a::s, b::s] = 1.0
                (g,) = torch.autograd.grad(y, x, cotangent, retain_graph=True, allow_unused=True)
                if g is None:
                    continue
                mass = g.abs().to(torch.float64).sum(dim=(0, 1))  # [H, W] over b and input channels
                profile_sum.index_add_(0, slot, mass[p_ok])
    return PixelLocality(profile=_mean_per_offset(profile_sum.view(s, s), B, C, C_out, H, W, R),
                         radius=R, leakage=float("nan"), method="colored")


def _mean_per_offset(profile_sum, B, C, C_out, H, W, R):
    """Divide the |J| sums per offset by the number of (b, c, c', p) terms with p + delta inside the image."""
    offsets = torch.arange(-R, R + 1, device=profile_sum.device)
    valid_rows = (H - offsets.abs()).clamp(min=0).to(torch.float64)
    valid_cols = (W - offsets.abs()).clamp(min=0).to(torch.float64)
    count = B * C * C_out * valid_rows[:, None] * valid_cols[None, :]
    return torch.where(count > 0, profile_sum / count.clamp(min=1), torch.zeros_like(profile_sum))


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
