"""Reference local conditional attention: dense masked attention, the executable spec.

Every image token (i, j) attends, in ONE softmax, to
  - the kh x kw window of image tokens whose top-left corner is
    (clamp(i - kh//2, 0, H - kh), clamp(j - kw//2, 0, W - kw)) - NATTEN's na2d semantics, dilation 1:
    the window is shifted inward at the borders so every query sees exactly kh*kw image keys;
  - the conditioner tokens m with cond_mask[b, m, i, j] true.

This builds the full [H*W, H*W + M] boolean mask and calls scaled_dot_product_attention, so it costs
O((H*W)^2) time and memory: it is the baseline the fused kernels are measured against, not a fast path.
"""

from __future__ import annotations

import math

from typing import Optional

import torch
import torch.nn.functional as F


def window_starts(size: int, kernel: int, device=None) -> torch.Tensor:
    """First key index of each query's window along one axis: clamp(i - kernel//2, 0, size - kernel)."""
    i = torch.arange(size, device=device)
    return (i - kernel // 2).clamp(0, size - kernel)


def window_mask(H: int, W: int, kh: int, kw: int, device=None) -> torch.Tensor:
    """[H*W, H*W] bool: may query pixel (row-major index) attend image key pixel?"""
    rows = torch.arange(H, device=device)
    cols = torch.arange(W, device=device)
    r0 = window_starts(H, kh, device)  # [H]
    c0 = window_starts(W, kw, device)  # [W]
    row_ok = (rows[None, :] >= r0[:, None]) & (rows[None, :] < r0[:, None] + kh)  # [H(query), H(key)]
    col_ok = (cols[None, :] >= c0[:, None]) & (cols[None, :] < c0[:, None] + kw)  # [W(query), W(key)]
    # query (qi, qj) x key (ki, kj) -> [H, W, H, W] -> [H*W, H*W]
    return (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape(H * W, H * W)


def screen_conditioners(cond_k: Optional[torch.Tensor], cond_v: Optional[torch.Tensor],
                        cond_mask: Optional[torch.Tensor], H: int, W: int):
    """The masking rule, the same for every backend: a conditioner only affects the pixels that see it.

    Softmax kernels give a masked key probability 0, but 0 * inf and 0 * NaN are NaN: one non-finite
    conditioner (a NaN-padded point's token, an inf in a masked-out row) would poison pixels that may not
    see it, through the P @ V product of every pixel sharing a tile or a row with one that does. So
    conditioner rows holding a non-finite key or value entry are replaced by zeros before any kernel runs
    (zero gradient flows to them), and the pixels that do see one are returned in `poisoned`, so that
    :func:`propagate_poison` makes exactly their outputs NaN, as the arithmetic says they are. (A finite
    row no pixel sees needs nothing: 0 times a finite value is 0.)

    cond_k, cond_v: [B, M, heads, D] or None; cond_mask: [B, M, H, W] bool or None (every pixel sees all).
    Returns (cond_k, cond_v, poisoned [B, H, W] bool, or None when nothing can be poisoned). Syncs with
    the host only on the CPU (where it is free), to skip both passes when every conditioner is finite.
    """
    if cond_k is None or cond_k.shape[1] == 0:
        return cond_k, cond_v, None
    if _can_branch_on(cond_k) and _all_finite(cond_k, cond_v):
        return cond_k, cond_v, None  # the common case: nothing to screen
    finite = torch.isfinite(cond_k).flatten(2).all(2) & torch.isfinite(cond_v).flatten(2).all(2)  # [B, M]
    B = cond_k.shape[0]
    if cond_mask is None:
        poisoned = (~finite).any(1)[:, None, None].expand(B, H, W)
    else:
        poisoned = (cond_mask & ~finite[:, :, None, None]).any(1)  # [B, H, W]
    keep = finite[:, :, None, None]
    zero = cond_k.new_zeros(())
    return torch.where(keep, cond_k, zero), torch.where(keep, cond_v, zero), poisoned


def _all_finite(*ts: torch.Tensor) -> bool:
    """True only if every entry is finite: the sum of all entries is (a NaN or inf anywhere makes it NaN or
    inf). One reduction per tensor instead of the per-row isfinite masks, ~60 us less per eager call;
    finite entries whose sum overflows read as False, and the caller then screens row by row."""
    acc = torch.float64 if ts[0].dtype == torch.float64 else torch.float32  # fp16 sums would overflow
    return math.isfinite(sum(float(t.detach().sum(dtype=acc)) for t in ts))


def _can_branch_on(t: torch.Tensor) -> bool:
    """Whether Python may read t's values: an eager CPU tensor (no device sync), not traced by
    torch.compile nor batched by torch.func (vmap, jvp), where data-dependent branches cannot run."""
    return (t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def propagate_poison(out: torch.Tensor, poisoned: Optional[torch.Tensor]) -> torch.Tensor:
    """out [B, H, W, heads, D] with NaN at the pixels screen_conditioners found seeing a non-finite token."""
    if poisoned is None:
        return out
    return out.masked_fill(poisoned[:, :, :, None, None], float("nan"))


def local_conditional_attention_reference(
    q: torch.Tensor,  # [B, H, W, heads, D]
    k: torch.Tensor,  # [B, H, W, heads, D]
    v: torch.Tensor,  # [B, H, W, heads, D]
    kernel_size: tuple[int, int],
    cond_k: Optional[torch.Tensor] = None,  # [B, M, heads, D]
    cond_v: Optional[torch.Tensor] = None,  # [B, M, heads, D]
    cond_mask: Optional[torch.Tensor] = None,  # [B, M, H, W] bool; None = every pixel sees every m
    scale: Optional[float] = None,
) -> torch.Tensor:  # [B, H, W, heads, D]
    B, H, W, heads, D = q.shape
    kh, kw = kernel_size
    N = H * W
    scale = D ** -0.5 if scale is None else scale

    # heads-last [B, H, W, heads, D] -> [B, heads, N, D]
    def tokens(x):
        return x.reshape(B, N, heads, D).transpose(1, 2)

    cond_k, cond_v, poisoned = screen_conditioners(cond_k, cond_v, cond_mask, H, W)
    keys, values = tokens(k), tokens(v)
    mask = window_mask(H, W, kh, kw, q.device).expand(B, N, N)  # [B, N, N]
    if cond_k is not None:
        M = cond_k.shape[1]
        keys = torch.cat([keys, cond_k.transpose(1, 2)], dim=2)  # [B, heads, N + M, D]
        values = torch.cat([values, cond_v.transpose(1, 2)], dim=2)
        if cond_mask is None:
            allowed = torch.ones(B, N, M, dtype=torch.bool, device=q.device)
        else:
            allowed = cond_mask.reshape(B, M, N).transpose(1, 2)  # [B, N, M]
        mask = torch.cat([mask, allowed], dim=2)  # [B, N, N + M]

    # Every row has kh*kw >= 1 allowed keys, so no softmax row is empty.
    out = F.scaled_dot_product_attention(tokens(q), keys, values, attn_mask=mask[:, None], scale=scale)
    return propagate_poison(out.transpose(1, 2).reshape(B, H, W, heads, D), poisoned)
