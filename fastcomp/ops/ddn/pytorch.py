"""DDN selection without the B x K x Cout x H x W candidates in PyTorch: the "torch" backend (any device,
any floating dtype, always available), and the formulas the "cpu" backend's C++ kernels (cpu.py) compute.

Shapes: features [B, Cin, H, W], weight [K, Cout, Cin], bias [K, Cout] or None, residual and target
[B, Cout, H, W] (residual may be None); N = Cout * H * W elements per candidate.

l2 ("algebraic", `expanded_l2`): with e = residual - target,

    N * distances[b, k] = sum_p ||W_k f_p + b_k + e_p||^2 = A + 2 X + C,
    A = <W_k^T W_k, G_b>,  G_b = sum_p f_p f_p^T  (Cin x Cin Gram matrix per sample),
    X = <W_k, M_b> + b_k . (W_k s_b),  M_b = sum_p e_p f_p^T,  s_b = sum_p f_p,
    C = HW ||b_k||^2 + 2 b_k . sum_p e_p + sum_p ||e_p||^2.

Cost B*Cin^2*HW (Gram) + K*Cout*Cin^2 (W_k^T W_k) + B*K*Cin^2 (one GEMM) + small terms, instead of
B*K*Cout*Cin*HW for the candidates: no product of K with H*W. The expansion cancels when the
candidates are far from 0 relative to their distance to the target, so it is guarded:

* A (a sum of squares, the bulk of the flops) and M_b run in float32 (float64 for float64 inputs), the
  rest of X and C in float64, from e formed in float64: a residual and a target sharing a large offset
  (1e4) cancel exactly before anything is squared.
* error bound (Cauchy-Schwarz majorant of every rounding in the Gram matrices, W^T W and the dot
  products): |expanded - exact| <= bound[b, k] = (HW + Cin^2 + 4) u_A ||W_k||_F^2 tr(G_b) / N
  + (HW + Cin Cout + 8) u_64 ||W~_k||_F^2 tr(G~_b) / N, with W~ = [W | b | I] and G~ the Gram matrix
  of [f; 1; e], + 2 gamma_x u_A sqrt(||W_k||_F^2 tr(G_b) sum_p ||e_p||^2) / N for M_b. In the float32
  terms, (HW + Cin^2 + 4) (the worst case) is replaced by the probabilistic 8 sqrt(HW + Cin^2 + 4)
  (Higham & Mary 2019; exceeded with probability ~1e-14 per entry); see `expanded_l2`.
* re-ranking: every k whose expanded distance lies within 2 max_k bound[b, k], plus the rounding noise
  the reference itself has in the input dtype (`reference_noise`), of the row's minimum is recomputed
  exactly as the reference does (candidate in the input dtype, distance accumulated in float32 or
  float64), chunk by chunk, and the index is the argmin of those exact distances (ties -> smallest k).
  So the index equals the reference's argmin except where the reference's own rounding decides
  (genuine near-ties), and the chosen candidate's distance is computed as the reference computes it.
* returned distances: the exactly recomputed ones for every re-ranked k (the chosen one included); the
  others are the expansion rounded to float32: absolute error <= bound[b, k] + float32 rounding.

l1 has no such expansion: a direct computation, chunked over K so that at most ~2^18 candidate elements
exist at once, distances for all K, then argmin.

Backward goes only through the chosen candidate (`chosen_backward`, under library.py's ChosenCandidate):
d weight[k] = sum over the samples b that chose k of d out_b f_b^T (index_add), d features = W_idx^T d out,
d bias = index_add of d out summed over pixels, d residual = d out.

Measurements of both backends: benchmarks/results/ddn-cpu-notes.md.
"""

from __future__ import annotations

import torch

# At most this many candidate elements (B * chunk * Cout * H * W) exist at once in the direct paths.
_CHUNK_ELEMENTS = 1 << 18
# Confidence factor of the probabilistic rounding-error bound of the float32 part of the l2 expansion.
LAMBDA = 8.0
# At most this many float64 elements (4 MiB) per temporary in the expansion (Gram chunk, P chunk).
EXPANSION_ELEMENTS = 1 << 19


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype distances accumulate in, as in the reference: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


# --- the chosen candidate and its backward (library.py's ChosenCandidate runs these as custom ops) ----

def chosen_forward(features, weight, index, bias, residual):
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


def chosen_backward(d_out, features, weight, index, has_bias: bool):
    """(d features [B, Cin, H, W], d weight [K, Cout, Cin], d bias [K, Cout] or None) of the chosen candidate.

    d weight[k] = sum over the samples b that chose k of d out_b f_b^T (index_add), d features =
    W_idx^T d out, d bias = index_add of d out summed over pixels: nothing of size K x H x W."""
    B, Cin, H, W = features.shape
    K, Cout, _ = weight.shape
    d_flat = d_out.reshape(B, Cout, H * W)
    w_idx = weight.index_select(0, index)  # [B, Cout, Cin]
    d_features = torch.bmm(w_idx.transpose(1, 2), d_flat).view(B, Cin, H, W)
    # d weight and d bias sum over the samples that chose each k: accumulated in float32 (float64 for
    # float64), rounded to the input dtype once, as the reference's single GEMM over the batch does. In
    # bfloat16 an index_add would round after every sample (8 bits: lossy when many pick one k).
    acc = _acc_dtype(features.dtype)
    per_sample = torch.bmm(d_flat.to(acc), features.reshape(B, Cin, H * W).transpose(1, 2).to(acc))  # [B, Cout, Cin]
    d_weight = torch.zeros(K, Cout, Cin, dtype=acc, device=weight.device).index_add_(
        0, index, per_sample).to(weight.dtype)
    d_bias = None
    if has_bias:
        d_bias = torch.zeros(K, Cout, dtype=acc, device=d_out.device).index_add_(
            0, index, d_flat.sum(dim=2, dtype=acc)).to(d_out.dtype)
    return d_features, d_weight, d_bias


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

def _feature_sums(x, e):
    """(M [B, Cin, Cout] = sum_p f_p e_p^T, s_f [B, Cin] = sum_p f_p) in float64, computed in x's dtype.

    x: [B, Cin, HW] (float32, or float64 for float64 inputs); e: [B, Cout, HW] float64.
    """
    # e [B, Cout, HW] times x^T rather than x times a contiguous e^T: with the inner size Cout (3) on the
    # right, MKL's batched GEMM took 1.6 ms against 0.3 ms this way (B=32, Cin=64, 32x32).
    m_fe = torch.bmm(e.to(x.dtype), x.transpose(1, 2)).transpose(1, 2)  # [B, Cin, Cout]
    return m_fe.to(torch.float64), x.sum(dim=2, dtype=torch.float64)


def _l2_terms_torch(features, weight, target, residual):
    """The sample-dependent terms of the expansion in PyTorch (any dtype, any device):
    (A float64 [B, K], tr(G_b) float64 [B], M_b float64 [B, Cout, Cin], s_b float64 [B, Cin],
    sum_p e_p float64 [B, Cout], sum_p ||e_p||^2 float64 [B])."""
    B, Cin, H, W = features.shape
    K, Cout, _ = weight.shape
    HW = H * W
    cd = torch.float64 if features.dtype == torch.float64 else torch.float32  # dtype of A
    f64 = torch.float64

    # A: one Gram matrix per sample, P_k = W_k^T W_k in chunks of K, one GEMM per chunk.
    x = features.reshape(B, Cin, HW).to(cd)
    gram = torch.bmm(x, x.transpose(1, 2)).view(B, Cin * Cin)  # [B, Cin^2]
    w_cd = weight.to(cd)
    dist = torch.empty(B, K, dtype=f64, device=features.device)
    step = max(1, EXPANSION_ELEMENTS // (Cin * Cin))
    for k0 in range(0, K, step):
        w = w_cd[k0:k0 + step]  # [k, Cout, Cin]
        # (a contiguous W_k^T: MKL's batched GEMM is ~50x slower on the transposed view with inner size Cout)
        p = torch.bmm(w.transpose(1, 2).contiguous(), w).view(w.shape[0], Cin * Cin)  # [k, Cin^2]
        dist[:, k0:k0 + w.shape[0]] = torch.mm(gram, p.t())
    tr_ff = gram.view(B, Cin, Cin).diagonal(dim1=1, dim2=2).sum(dim=1).to(f64)  # [B]

    # e in float64, so that a residual and a target sharing a large offset cancel exactly; M_b in the
    # dtype of A (its rounding is bounded in expanded_l2), the rest of X and C in float64.
    e = -target.reshape(B, Cout, HW).to(f64)
    if residual is not None:
        e += residual.reshape(B, Cout, HW)
    m_fe, s_f = _feature_sums(x, e)  # [B, Cin, Cout], [B, Cin]
    return dist, tr_ff, m_fe.transpose(1, 2), s_f, e.sum(dim=2), e.square().sum(dim=(1, 2))


def expanded_l2(features, weight, target, bias, residual):
    """(distances float64 [B, K] by the expansion, their error bound float64 [B, K]).

    N * d[b, k] = A + 2 X + C with
      A = sum_p ||W_k f_p||^2 = <W_k^T W_k, G_b>, G_b = sum_p f_p f_p^T       (Cin x Cin: the bulk)
      X = <W_k, M_b> + b_k . (W_k s_b),  M_b = sum_p e_p f_p^T, s_b = sum_p f_p, e = residual - target
      C = HW ||b_k||^2 + 2 b_k . sum_p e_p + sum_p ||e_p||^2.
    A runs in float32 (float64 for float64 inputs): it is a sum of squares, its rounding is bounded by
    (HW + Cin^2 + 4) u * ||W_k||_F^2 tr(G_b). X and C run in float64 from e formed in float64, so a
    residual and a target that share a large offset cancel exactly before anything is squared. Their
    rounding is bounded by (HW + Cin * Cout + 8) u64 * ||W~_k||_F^2 tr(G~_b) (W~ = [W | b | I],
    G~ the Gram matrix of [f; 1; e]), by the same Cauchy-Schwarz majorant.
    """
    B, Cin, H, W = features.shape
    K, Cout, _ = weight.shape
    HW, N = H * W, Cout * H * W
    cd = torch.float64 if features.dtype == torch.float64 else torch.float32  # dtype of A
    f64 = torch.float64

    dist, tr_ff, m_fe, s_f, e_sum, e_sq = _l2_terms_torch(features, weight, target, residual)
    w64 = weight.to(f64)
    dist.addmm_(m_fe.reshape(B, Cout * Cin), w64.view(K, Cout * Cin).t(), alpha=2.0)
    dist += e_sq[:, None]
    if bias is not None:
        b64 = bias.to(f64)
        wtb = torch.bmm(b64[:, None, :], w64).squeeze(1)  # [K, Cin] = W_k^T b_k
        dist.addmm_(s_f, wtb.t(), alpha=2.0)
        dist.addmm_(e_sum, b64.t(), alpha=2.0)
        dist += HW * b64.square().sum(dim=1)[None, :]
    dist /= N

    w_norm = w64.square().sum(dim=(1, 2))  # [K]
    w_aug_norm = w_norm + Cout + (0.0 if bias is None else bias.to(f64).square().sum(dim=1))  # ||W~_k||_F^2
    tr_aug = tr_ff + HW + e_sq  # tr(G~_b)
    u_a = torch.finfo(cd).eps
    u64 = torch.finfo(f64).eps
    # A's sums have n = HW + Cin^2 + 4 rounded terms: the worst case is n u_A, but rounding errors of a
    # long float32 sum behave as independent zero-mean variables (Higham & Mary, SIAM J. Sci. Comput.
    # 2019): |error| <= lam sqrt(n) u_A with probability >= 1 - 2 exp(-lam^2 / 2), ~1e-14 for lam = 8.
    # The worst-case bound would re-rank ~10x more candidates at HW = 1024 for no observed benefit.
    n_a = HW + Cin * Cin + 4
    bound = (min(n_a, LAMBDA * n_a ** 0.5) * u_a / N) * tr_ff[:, None] * w_norm[None, :]
    bound += ((HW + Cin * Cout + 8) * u64 / N) * tr_aug[:, None] * w_aug_norm[None, :]
    # M_b's rounding: 2 <W_k, dM_b> <= 2 gamma sum_p |W_k f_p| |e_p| <= 2 gamma sqrt(||W_k||^2 tr(G_b) sum e^2)
    # (plus e's own rounding to float32, relative u_A).
    n_x = HW + Cin * Cout + 2
    bound += (2 * min(n_x, LAMBDA * n_x ** 0.5) * u_a / N) * (tr_ff[:, None] * w_norm[None, :]
                                                                * e_sq[:, None]).sqrt()
    return dist, bound


def reference_noise(dtype, d_min, target):
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


def select(features, weight, target, bias, residual, metric):
    """The "torch" backend's selection kernel (no autograd): (index int64 [B], distances float32 [B, K],
    the chosen candidate [B, Cout, H, W])."""
    with torch.no_grad():
        if metric == "l1":
            index, distances = l1_select(features, weight, target, bias, residual)
        else:
            est, bound = expanded_l2(features, weight, target, bias, residual)
            # amin/amax, not min(dim)/max(dim): those also compute indices, and in torch 2.13 on CPU they
            # took ~20 ms even on a [2, 3] tensor when the cores were busy (amin: 2 us)
            est_min = est.amin(dim=1)  # [B]
            thresh = est_min + 2 * bound.amax(dim=1) + reference_noise(features.dtype, est_min, target)
            n_close = (est <= thresh[:, None]).sum(dim=1)  # [B], >= 1: every k with est <= thresh is re-ranked
            m = max(1, int(n_close.max()))  # NaN rows count 0
            # The m best by the expansion, in increasing k, so that exact ties go to the smallest k.
            k_near = est.topk(m, dim=1, largest=False).indices.sort(dim=1).values  # [B, m]
            exact = exact_distances(features, weight, target, bias, residual, metric, k_near)  # [B, m]
            index = k_near.gather(1, exact.argmin(dim=1, keepdim=True)).squeeze(1)
            distances = est.float().scatter_(1, k_near, exact.float())
        return index, distances, chosen_forward(features, weight, index, bias, residual)


def l1_select(features, weight, target, bias, residual):
    """(index, distances float32) for metric l1, which has no expansion: every candidate's distance
    computed directly, chunked over K (exact_distances), then the argmin. Both CPU backends run it."""
    K, B = weight.shape[0], features.shape[0]
    k_all = torch.arange(K, device=features.device).expand(B, K)
    dist = exact_distances(features, weight, target, bias, residual, "l1", k_all)
    return dist.argmin(dim=1), dist.float()  # first minimum: ties -> smallest k
