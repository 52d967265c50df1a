"""The DDN "cpu" backend: the C++ kernels of csrc/ddn/ for the l2 expansion of pytorch.py, the exact
re-ranking, and the chosen candidate's forward and backward.

For float32/float64 CPU tensors the heavy passes are C++ (csrc/ddn/ddn_cpu.cpp): the per-sample statistics
(Gram upper triangles in register tiles, 3 x 4 on AVX2 / SSE2 and 4 x 4 on AVX-512, half the flops of x @ x^T,
with M_b, s_b and the e sums in the same call), the weight Gram upper triangles (A is then one GEMM over
Cin (Cin + 1) / 2 instead of Cin^2 terms), the expanded distances + bound + re-ranking threshold (one pass
over B x K instead of ~30 small torch ops), the exact re-ranking of each sample's own near-best set (which
also writes the chosen candidate, so the forward forms it once), and the chosen candidate's
forward/backward. For small K
(K Cin (Cin + 1) / 2 <= _FUSED_ELEMENTS, e.g. K=64 at Cin=64) all of the forward runs per sample in one
C++ task (ddn_l2_select_cpu) while that sample's features are still in cache. The backend
takes float32/float64 CPU tensors only and needs the extension: for anything else, or when the extension
cannot be built, it declines with the reason and auto mode runs the "torch" backend (pytorch.py), whose
bound and margins are the same.

Measurements: benchmarks/results/ddn-cpu-notes.md.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import pytorch

# The C++ kernels' dtypes (csrc/ddn/ddn_cpu.cpp); the backend declines the others (the torch backend runs them).
DTYPES = (torch.float32, torch.float64)
# The fused per-sample l2 selection (ddn_l2_select_cpu) reads the K weight Gram triangles once per sample:
# worth it while they stay in cache (K <= 126 at Cin = 64); larger K takes the batched GEMM.
_FUSED_ELEMENTS = 1 << 18


def extension():
    """The compiled extension; the registry has built it (the backend's prepare) before any call here."""
    from ... import _build

    return _build.load("ddn")


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().contiguous()


def chosen_forward(features, weight, index, bias, residual):
    """[B, Cout, H, W] = einsum(weight[index[b]], features[b]) + bias[index[b]] + residual[b] in C++, in the
    input dtype, added in the reference's order."""
    B, _, H, W = features.shape
    out = torch.empty(B, weight.shape[1], H, W, dtype=features.dtype)
    extension().ddn_chosen_forward_cpu(_contiguous(features), _contiguous(weight), _contiguous(bias),
                                       _contiguous(residual), index.contiguous(), out)
    return out


def chosen_backward(d_out, features, weight, index, has_bias: bool):
    """pytorch.chosen_backward in one C++ pass: d features and the per-sample d weight rows summed into
    the K rows (d weight [k] has non-zero rows only for chosen k)."""
    B, Cin, H, W = features.shape
    K, Cout, _ = weight.shape
    d_features = torch.empty(B, Cin, H, W, dtype=features.dtype)
    d_weight = torch.empty(K, Cout, Cin, dtype=features.dtype)
    d_bias = torch.empty(K, Cout, dtype=features.dtype) if has_bias else None
    extension().ddn_chosen_backward_cpu(features.contiguous(), weight.contiguous(), index.contiguous(),
                                        d_out.to(features.dtype).contiguous(), d_features, d_weight, d_bias)
    return d_features, d_weight, d_bias


@functools.lru_cache(maxsize=16)
def _diagonal_positions(cin: int) -> torch.Tensor:
    """Positions [Cin] of the diagonal entries in a Cin x Cin upper triangle stored row by row."""
    i = torch.arange(cin)
    return i * cin - i * (i - 1) // 2


def _gram_terms_cpu(ext, features, weight, target, residual):
    """The C++ passes of the expansion for float32/float64 CPU tensors: one pass over the features
    (csrc/ddn/ddn_cpu.cpp ddn_l2_stats_cpu) gives the Gram matrices' upper triangles and the sums; A is then
    one GEMM against the upper triangles of W_k^T W_k with doubled off-diagonal entries
    (ddn_weight_gram_cpu): half the flops of <W_k^T W_k, G_b> over full matrices.

    Returns (A [B, K] in the input dtype, gram [B, Cin (Cin + 1) / 2] in the input dtype, M_b float64
    [B, Cout, Cin], s_b float64 [B, Cin], sum_p e_p float64 [B, Cout], sum_p ||e_p||^2 float64 [B])."""
    B, Cin, _, _ = features.shape
    K, Cout, _ = weight.shape
    f64 = torch.float64
    cd = features.dtype  # float32 or float64: A accumulates in the input dtype, as _l2_terms_torch
    n_tri = Cin * (Cin + 1) // 2
    gram = torch.empty(B, n_tri, dtype=cd)
    m_fe = torch.empty(B, Cout, Cin, dtype=f64)
    s_f = torch.empty(B, Cin, dtype=f64)
    e_sum = torch.empty(B, Cout, dtype=f64)
    e_sq = torch.empty(B, dtype=f64)
    ext.ddn_l2_stats_cpu(_contiguous(features), _contiguous(residual), _contiguous(target), gram, m_fe, s_f,
                         e_sum, e_sq)
    w = _contiguous(weight)
    step = max(1, pytorch.EXPANSION_ELEMENTS // n_tri)
    if step >= K:
        p_tri = torch.empty(K, n_tri, dtype=cd)
        ext.ddn_weight_gram_cpu(w, p_tri)
        a = torch.mm(gram, p_tri.t())
    else:
        a = torch.empty(B, K, dtype=cd)
        for k0 in range(0, K, step):  # chunks of K: at most EXPANSION_ELEMENTS weight Gram entries at once
            w_k = w[k0:k0 + step]  # [k, Cout, Cin], contiguous
            p_tri = torch.empty(w_k.shape[0], n_tri, dtype=cd)
            ext.ddn_weight_gram_cpu(w_k, p_tri)
            a[:, k0:k0 + w_k.shape[0]] = torch.mm(gram, p_tri.t())
    return a, gram, m_fe, s_f, e_sum, e_sq


def l2_threshold(ext, features, weight, target, bias, residual):
    """(est float64 [B, K], bound float64 [B, K], thresh float64 [B]) for float32/float64 CPU tensors: what
    `expanded_l2` returns and select's re-ranking threshold min_k est + 2 max_k bound +
    `pytorch.reference_noise`, with everything after the Gram GEMM in one C++ pass (ddn_l2_threshold_cpu) instead
    of ~30 small torch ops (each tens of microseconds; ~1.5 ms of the ~6 ms forward at B=32, Cin=64, K=64,
    32x32, more on busy cores). Same formulas; float64 rounding differences only."""
    B = features.shape[0]
    K = weight.shape[0]
    a, gram, m_fe, s_f, e_sum, e_sq = _gram_terms_cpu(ext, features, weight, target, residual)
    est = torch.empty(B, K, dtype=torch.float64)
    bound = torch.empty(B, K, dtype=torch.float64)
    thresh = torch.empty(B, dtype=torch.float64)
    ext.ddn_l2_threshold_cpu(a, gram, m_fe, s_f, e_sum, e_sq, _contiguous(weight), _contiguous(bias),
                             _contiguous(target), pytorch.LAMBDA, est, bound, thresh)
    return est, bound, thresh


def select(features, weight, target, bias, residual, metric):
    """The "cpu" backend's selection kernel (no autograd), float32/float64 CPU tensors: (index int64 [B],
    distances float32 [B, K], the chosen candidate [B, Cout, H, W])."""
    ext = extension()
    B, Cin = features.shape[:2]
    K = weight.shape[0]
    with torch.no_grad():
        if metric == "l1":  # no expansion for l1: the direct distances, then the C++ chosen candidate
            index, distances = pytorch.l1_select(features, weight, target, bias, residual)
            return index, distances, chosen_forward(features, weight, index, bias, residual)
        n_tri = Cin * (Cin + 1) // 2
        distances = torch.empty(B, K, dtype=torch.float32)
        index = torch.empty(B, dtype=torch.int64)
        out = torch.empty(target.shape, dtype=features.dtype)  # the chosen candidate, formed once by C++
        f, w, b, r, t = (_contiguous(x) for x in (features, weight, bias, residual, target))
        if K * n_tri <= _FUSED_ELEMENTS:
            # Small K: the whole selection per sample in one C++ pass while the sample's features are in
            # cache (the weight Grams into p_tri, then statistics, A, est, bound, threshold, re-ranking).
            p_tri = torch.empty(K, n_tri, dtype=features.dtype)
            ext.ddn_l2_select_cpu(f, w, b, r, t, p_tri, pytorch.LAMBDA, distances, index, out)
        else:
            # The same est and thresh, all but the Gram GEMM in C++; then one C++ pass: each sample's own
            # near-best (not the batch's largest count) formed once, its exact distance, the winner kept.
            est, _, thresh = l2_threshold(ext, features, weight, target, bias, residual)
            ext.ddn_rerank_cpu(f, w, b, r, t, est, thresh.contiguous(), distances, index, out)
    return index, distances, out
