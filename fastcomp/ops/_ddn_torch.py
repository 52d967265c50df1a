"""DDN selection without the B x K x Cout x H x W candidates: the "cpu" backend, plus the pieces the
Triton and CUDA backends share (the chosen-candidate autograd.Function).

Shapes: features [B, Cin, H, W], weight [K, Cout, Cin], bias [K, Cout] or None, residual and target
[B, Cout, H, W] (residual may be None); N = Cout * H * W elements per candidate.

l2 ("algebraic"): with augmented features f~_p = [f_p; 1; e_p] (D = Cin + 1 + Cout rows, e = residual -
target) and augmented weights W~_k = [W_k | b_k | I_Cout] (Cout x D), candidate_k - target = W~_k f~ at
every pixel, so

    N * distances[b, k] = sum_p ||W~_k f~_p||^2 = <P_k, G_b>,  P_k = W~_k^T W~_k,  G_b = sum_p f~_p f~_p^T

(D x D, symmetric: only the upper triangle is used). Cost B*D^2*HW for the Gram matrices plus
B*K*D^2/2 for one GEMM, instead of B*K*Cout*Cin*HW for the candidates; no product of K with H*W.
The expansion cancels catastrophically when the candidates are far from 0 (a residual of 1e4 makes the
terms ~1e8 for a distance ~1), so it runs in float64 and is guarded:

* error bound: |expanded - exact| <= bound[b, k] = (HW + D^2 + 8) * eps64 * ||W~_k||_F^2 * tr(G_b) / N
  (each rounding in the Gram matrix, in P_k and in the dot product is bounded by the Cauchy-Schwarz
  majorant sum_p ||W~_k||_F^2 ||f~_p||^2 = ||W~_k||_F^2 tr(G_b));
* re-ranking: every k whose expanded distance lies within 2 * max_k bound[b, k] plus the rounding noise
  the reference itself has in the input dtype (`_reference_noise`) of the row's minimum is recomputed
  exactly, as the reference does (candidate in the input dtype, distance accumulated in float32 or
  float64), chunk by chunk, and the index is the argmin of those exact distances (ties -> smallest k).
  So the index equals the reference's argmin except where the reference's own rounding decides
  (genuine near-ties), and the chosen candidate's distance is computed as the reference computes it.
* returned distances: the exactly recomputed ones for every re-ranked k (the chosen one included); the
  others are the float64 expansion rounded to float32, absolute error <= bound[b, k] + float32 rounding.

l1 has no such expansion: a direct computation, chunked over K so that at most ~2^18 candidate elements
exist at once, distances for all K, then argmin.

Measured (2 shared cores, float32, forward only, B=32 Cin=64 Cout=3 K=512 16x16): this algebraic l2
select 9 ms; the direct chunked computation (the l1 path run with the square; the same flops a C++ loop
nest would do, through torch's GEMM) 140 ms; the reference 330 ms. The direct computation needs
B*K*Cout*Cin*HW = 805M multiply-adds, the expansion ~40M + 38M (float64), so no hand-written direct C++
kernel could catch up: the CPU backend is this PyTorch formulation (no C++).

Backward goes only through the chosen candidate (`ChosenCandidate`): d weight[k] = sum over the samples
b that chose k of d out_b f_b^T (index_add), d features = W_idx^T d out, d bias = index_add of d out summed
over pixels, d residual = d out.
"""

from __future__ import annotations

from typing import Optional

import torch

# At most this many candidate elements (B * chunk * Cout * H * W) exist at once in the direct paths.
_CHUNK_ELEMENTS = 1 << 18
# At most this many float64 elements per temporary in the expansion (Gram chunk, P chunk).
_EXPANSION_ELEMENTS = 1 << 17


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype distances accumulate in, as in the reference: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


# --- the chosen candidate and its backward ----------------------------------------------------------

def chosen_candidate_forward(features, weight, bias, residual, index):
    """[B, Cout, H, W] = einsum(weight[index[b]], features[b]) + bias[index[b]] + residual[b], in the
    input dtype, added in the reference's order."""
    B, Cin, H, W = features.shape
    w_idx = weight.index_select(0, index)  # [B, Cout, Cin]
    out = torch.bmm(w_idx, features.reshape(B, Cin, H * W)).view(B, -1, H, W)
    if bias is not None:
        out = out + bias.index_select(0, index)[:, :, None, None]
    if residual is not None:
        out = out + residual
    return out


class ChosenCandidate(torch.autograd.Function):
    """The chosen candidate, differentiable in features, weight, bias and residual (index saved).

    The backward is two bmm and two index_add: nothing of size K x H x W, and weight's gradient has
    non-zero rows only for chosen k.
    """

    @staticmethod
    def forward(ctx, features, weight, bias, residual, index, out=None):
        ctx.save_for_backward(features, weight, index)
        ctx.has_bias = bias is not None
        ctx.has_residual = residual is not None
        if out is None:
            out = chosen_candidate_forward(features, weight, bias, residual, index)
        return out

    @staticmethod
    def backward(ctx, d_out):
        features, weight, index = ctx.saved_tensors
        B, Cin, H, W = features.shape
        K, Cout, _ = weight.shape
        d_flat = d_out.reshape(B, Cout, H * W)
        d_features = d_weight = d_bias = d_residual = None
        if ctx.needs_input_grad[0]:
            w_idx = weight.index_select(0, index)  # [B, Cout, Cin]
            d_features = torch.bmm(w_idx.transpose(1, 2), d_flat).view(B, Cin, H, W)
        if ctx.needs_input_grad[1]:
            per_sample = torch.bmm(d_flat, features.reshape(B, Cin, H * W).transpose(1, 2))  # [B, Cout, Cin]
            d_weight = torch.zeros_like(weight).index_add_(0, index, per_sample)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_bias = torch.zeros(K, Cout, dtype=d_out.dtype, device=d_out.device).index_add_(
                0, index, d_flat.sum(dim=2))
        if ctx.has_residual and ctx.needs_input_grad[3]:
            d_residual = d_out
        return d_features, d_weight, d_bias, d_residual, None, None


def chosen_candidate(features, weight, bias, residual, index, out=None):
    """Apply :class:`ChosenCandidate`; ``out`` (already computed, e.g. by a kernel) skips the forward."""
    return ChosenCandidate.apply(features, weight, bias, residual, index, out)


# --- exact (direct) distances of selected candidates, chunked -------------------------------------

def exact_distances(features, weight, target, bias, residual, metric, k_idx):
    """Distances of the candidates k_idx[b, :] computed as the reference does, never holding more than
    ~_CHUNK_ELEMENTS candidate elements. k_idx: int64 [B, M]. Returns [B, M] in the accumulation dtype."""
    B, Cin, H, W = features.shape
    _, Cout, _ = weight.shape
    M = k_idx.shape[1]
    acc = _acc_dtype(features.dtype)
    x = features.reshape(B, Cin, H * W)
    t = target.reshape(B, 1, Cout, H * W).to(acc)
    r = None if residual is None else residual.reshape(B, 1, Cout, H * W)
    out = torch.empty(B, M, dtype=acc, device=features.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * Cout * H * W))
    for m0 in range(0, M, chunk):
        idx = k_idx[:, m0:m0 + chunk]  # [B, m]
        m = idx.shape[1]
        w = weight[idx].view(B, m * Cout, Cin)
        # [B, m, Cout, HW] in the input dtype, as the reference's einsum
        cand = torch.bmm(w, x).view(B, m, Cout, H * W)
        if bias is not None:
            cand = cand + bias[idx][..., None]
        if r is not None:
            cand = cand + r
        diff = cand.to(acc) - t
        per_elem = diff.square() if metric == "l2" else diff.abs()
        out[:, m0:m0 + m] = per_elem.flatten(2).mean(dim=2)
    return out


# --- l2 by expansion --------------------------------------------------------------------------------

def _gram(features, target, residual):
    """G_b = sum_p f~_p f~_p^T, float64 [B, D, D] with f~ = [features; 1; residual - target]."""
    B, Cin, H, W = features.shape
    Cout = target.shape[1]
    D = Cin + 1 + Cout
    HW = H * W
    gram = torch.empty(B, D, D, dtype=torch.float64, device=features.device)
    step = max(1, _EXPANSION_ELEMENTS // (D * HW))
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        f_aug = torch.empty(b1 - b0, D, HW, dtype=torch.float64, device=features.device)
        f_aug[:, :Cin] = features[b0:b1].reshape(b1 - b0, Cin, HW)
        f_aug[:, Cin] = 1.0
        e = f_aug[:, Cin + 1:]
        e.copy_(target[b0:b1].reshape(b1 - b0, Cout, HW)).neg_()
        if residual is not None:
            e += residual[b0:b1].reshape(b1 - b0, Cout, HW)
        torch.bmm(f_aug, f_aug.transpose(1, 2), out=gram[b0:b1])
    return gram


def _augmented_weight(weight, bias):
    """W~ = [W | b | I], float64 [K, Cout, D]."""
    K, Cout, Cin = weight.shape
    w_aug = torch.zeros(K, Cout, Cin + 1 + Cout, dtype=torch.float64, device=weight.device)
    w_aug[:, :, :Cin] = weight
    if bias is not None:
        w_aug[:, :, Cin] = bias
    w_aug[:, :, Cin + 1:] = torch.eye(Cout, dtype=torch.float64, device=weight.device)
    return w_aug


def expanded_l2(features, weight, target, bias, residual):
    """(distances float64 [B, K] by the expansion, their error bound float64 [B, K])."""
    B, Cin, H, W = features.shape
    K, Cout, _ = weight.shape
    D = Cin + 1 + Cout
    N = Cout * H * W
    gram = _gram(features, target, residual)  # [B, D, D]
    w_aug = _augmented_weight(weight, bias)  # [K, Cout, D]
    o_i, o_j = torch.triu_indices(D, D, device=features.device)  # upper triangle, [T] each
    o_flat = o_i * D + o_j
    # Off-diagonal entries stand for both (i, j) and (j, i).
    g_tri = gram.flatten(1)[:, o_flat] * torch.where(o_i == o_j, 1.0, 2.0).to(torch.float64)  # [B, T]
    dist = torch.empty(B, K, dtype=torch.float64, device=features.device)
    step = max(1, _EXPANSION_ELEMENTS // (D * D))
    for k0 in range(0, K, step):
        w = w_aug[k0:k0 + step]  # [k, Cout, D]
        p_tri = torch.bmm(w.transpose(1, 2), w).flatten(1)[:, o_flat]  # [k, T]
        torch.mm(g_tri, p_tri.t(), out=dist[:, k0:k0 + w.shape[0]])
    dist /= N
    trace = gram.diagonal(dim1=1, dim2=2).sum(dim=1)  # [B]
    w_norm = w_aug.square().sum(dim=(1, 2))  # [K]
    eps = torch.finfo(torch.float64).eps
    bound = ((H * W + D * D + 8) * eps / N) * trace[:, None] * w_norm[None, :]
    return dist, bound


def _reference_noise(dtype, d_min, target):
    """How far the reference's own distances (candidates rounded to `dtype`, sums in float32 or float64)
    may stray from the exact ones near a row's minimum d_min [B]: 2 |c - t| |dc| + dc^2 with
    |dc| <= u |c| per element, plus the accumulation's rounding."""
    u = _unit_roundoff(dtype)
    u_acc = _unit_roundoff(_acc_dtype(dtype))
    rms_t = target.to(torch.float64).flatten(1).square().mean(dim=1).sqrt()  # [B]
    rms_d = d_min.clamp_min(0).sqrt()
    rms_c = rms_d + rms_t  # bounds the candidate's RMS
    n = target[0].numel()
    return 4 * u * rms_c * rms_d + 2 * u * u * rms_c.square() + 4 * (n + 8) ** 0.5 * u_acc * d_min.abs()


def select_cpu(features, weight, target, bias, residual, metric):
    """The "cpu" backend of ddn_select: (output, index, distances float32 [B, K])."""
    B = features.shape[0]
    K = weight.shape[0]
    with torch.no_grad():
        if metric == "l1":
            k_all = torch.arange(K, device=features.device).expand(B, K)
            dist = exact_distances(features, weight, target, bias, residual, metric, k_all)
            index = dist.argmin(dim=1)  # first minimum: ties -> smallest k
            distances = dist.float()
        else:
            est, bound = expanded_l2(features, weight, target, bias, residual)
            est_min = est.min(dim=1).values  # [B]
            margin = 2 * bound.max(dim=1).values + _reference_noise(features.dtype, est_min, target)
            n_close = (est <= (est_min + margin)[:, None]).sum(dim=1)  # [B], >= 1
            m = max(1, int(n_close.max()))  # NaN rows count 0
            # The m best by the expansion, in increasing k, so that exact ties go to the smallest k.
            k_near = est.topk(m, dim=1, largest=False).indices.sort(dim=1).values  # [B, m]
            exact = exact_distances(features, weight, target, bias, residual, metric, k_near)  # [B, m]
            index = k_near.gather(1, exact.argmin(dim=1, keepdim=True)).squeeze(1)
            distances = est.float().scatter_(1, k_near, exact.float())
    output = chosen_candidate(features, weight, bias, residual, index)
    return output, index, distances


def gather_cpu(features, weight, index, bias, residual):
    """The "cpu" backend of ddn_gather."""
    return chosen_candidate(features, weight, bias, residual, index)
