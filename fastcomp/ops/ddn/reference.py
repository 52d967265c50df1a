"""Reference DDN K-way selection: materializes all K candidates, as the original DDN code does.

candidate_k = einsum(weight[k], features) + bias[k] + residual      # [B, K, Cout, H, W]
distances[b, k] = mean over (c, y, x) of (candidate_k - target)^2   (metric "l1": |candidate_k - target|)
index[b] = argmin_k distances[b, k], ties -> smallest k
output[b] = candidate_{index[b]}

Memory is O(B * K * Cout * H * W): the baseline the fused paths are measured against.
"""

from __future__ import annotations

from typing import Optional

import torch


def ddn_candidates(
    features: torch.Tensor,  # [B, Cin, H, W]
    weight: torch.Tensor,  # [K, Cout, Cin]
    bias: Optional[torch.Tensor] = None,  # [K, Cout]
    residual: Optional[torch.Tensor] = None,  # [B, Cout, H, W]
) -> torch.Tensor:  # [B, K, Cout, H, W]
    cand = torch.einsum("koc,bchw->bkohw", weight, features)
    if bias is not None:
        cand = cand + bias[None, :, :, None, None]
    if residual is not None:
        cand = cand + residual[:, None]
    return cand


def ddn_select_reference(features, weight, target, bias=None, residual=None, metric="l2"):
    """Returns (output [B, Cout, H, W], index int64 [B], distances float32 [B, K])."""
    cand = ddn_candidates(features, weight, bias, residual)  # [B, K, Cout, H, W]
    with torch.no_grad():
        # Distances accumulate in at least float32 (float64 stays float64, so tests compare exactly).
        acc = torch.promote_types(cand.dtype, torch.float32)
        diff = cand.to(acc) - target[:, None].to(acc)
        per_elem = diff.square() if metric == "l2" else diff.abs()
        distances = per_elem.flatten(2).mean(dim=2)  # [B, K]
        # torch.argmin returns the first minimal index, which is the tie rule of the spec.
        index = distances.argmin(dim=1)
    output = cand[torch.arange(cand.shape[0], device=cand.device), index]
    return output, index, distances.float()


def ddn_gather_reference(features, weight, index, bias=None, residual=None):
    """The chosen candidate per sample: output [B, Cout, H, W] = candidate_{index[b]}."""
    cand = ddn_candidates(features, weight, bias, residual)
    return cand[torch.arange(cand.shape[0], device=cand.device), index]
