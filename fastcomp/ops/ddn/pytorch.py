"""DDN selection without the B x K x Cout x H x W candidates: the "cpu" backend, plus the pieces the
Triton and CUDA backends share (the chosen-candidate autograd.Function).

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
  of [f; 1; e], + 2 gamma_x u_A sqrt(||W_k||_F^2 tr(G_b) sum_p ||e_p||^2) / N for M_b. In the float32 terms, (HW + Cin^2 + 4) (the worst case) is replaced by the probabilistic
  8 sqrt(HW + Cin^2 + 4) (Higham & Mary 2019; exceeded with probability ~1e-14 per entry); see
  `expanded_l2`.
* re-ranking: every k whose expanded distance lies within 2 max_k bound[b, k], plus the rounding noise
  the reference itself has in the input dtype (`_reference_noise`), of the row's minimum is recomputed
  exactly as the reference does (candidate in the input dtype, distance accumulated in float32 or
  float64), chunk by chunk, and the index is the argmin of those exact distances (ties -> smallest k).
  So the index equals the reference's argmin except where the reference's own rounding decides
  (genuine near-ties), and the chosen candidate's distance is computed as the reference computes it.
* returned distances: the exactly recomputed ones for every re-ranked k (the chosen one included); the
  others are the expansion rounded to float32: absolute error <= bound[b, k] + float32 rounding.

l1 has no such expansion: a direct computation, chunked over K so that at most ~2^18 candidate elements
exist at once, distances for all K, then argmin.

For float32/float64 CPU tensors the heavy passes are C++ (csrc/ddn_cpu.cpp): the per-sample statistics
(Gram upper triangles in 4 x 4 register tiles, half the flops of x @ x^T, with M_b, s_b and the e sums
in the same call), the weight Gram upper triangles (A is then one GEMM over Cin (Cin + 1) / 2 instead of
Cin^2 terms), the expanded distances + bound + re-ranking threshold (one pass over B x K instead of ~30
small torch ops), the exact re-ranking of each sample's own near-best set (which also writes the chosen
candidate, so the forward forms it once), and the chosen candidate's forward/backward. For small K
(K Cin (Cin + 1) / 2 <= _FUSED_ELEMENTS, e.g. K=64 at Cin=64) all of the forward runs per sample in one
C++ task (ddn_l2_select_cpu) while that sample's features are still in cache. float16/bfloat16
(and a machine without a compiler) take the PyTorch formulation below; the bound and the margins are the
same for both.

Measured (2 cores shared with other jobs; float32, forward + backward, B=32 Cin=64 Cout=3;
`OMP_WAIT_POLICY=PASSIVE fastcomp bench --op ddn_select --device cpu --dtype float32 --repeats 21`,
medians; without PASSIVE, OpenMP's spinning threads on oversubscribed cores made every small op cost a
time slice):
    before the C++ kernels (PyTorch formulation), load ~0.8:  K=512 16x16 21.1x, K=64 32x32 3.9x.
    with them (07:56 UTC, load ~5: wall times ~1.5-2x the CPU times), 2 threads / OMP_NUM_THREADS=1:
      K=512 16x16: 6.2 / 10.6 ms vs the reference 494 / 523 ms: 79.6x / 49.2x; peak 4.4 MB vs 194 MB;
      K=64 32x32:  11.1 / 9.2 ms vs 134 / 108 ms: 12.1x / 11.8x (one-thread CPU time ~6-7 ms: Gram
                   tiles ~2.5 ms, re-rank ~0.5-1.3 ms, backward ~1.1-1.5 ms, small torch ops + Python).
    The same in one process with the three interleaved (/tmp script; the reference then touches cold
    memory every round and runs slower than in fastcomp bench), 1 / 2 threads, wall (CPU time):
      K=512: 51.4x (61.3x) / 50.7x (50.8x), the PyTorch-only path 30.9x / 30.8x;
      K=64:  18.4x (20.2x) / 19.9x (19.8x), the PyTorch-only path 7.8x / 7.7x.
    With the threshold pass and the fused small-K path (08:23-08:25 UTC, load 1.7-2.9, same command,
    2 threads, four runs): K=64 32x32 13.8x / 14.9x / 16.0x / 14.9x (cpu 3.0-6.0 ms; the reference
    43-97 ms moves most with the load), K=512 16x16 51-74x; OMP_NUM_THREADS=1: 12.9x / 70x. Interleaved
    in one process at K=64 (/tmp script, 61 rounds, load ~1.8), 2 threads: 3.6-3.9 ms vs 5.0-6.9 ms for
    the PyTorch threshold ops + batched passes; one-thread CPU time ~5.4 ms (fused select ~3.3 ms, of
    which the Gram tiles ~2.3; backward ~1.3-1.5 ms, ~0.5 of it page faults of the fresh d features).
The expansion needs ~20x fewer multiply-adds than any direct scheme at K=512 (the direct computation,
B*K*Cout*Cin*HW = 805M multiply-adds through torch's GEMM, took ~140 ms forward alone); at K=64 32x32 the
Gram matrices (B*Cin^2*HW/2 = 67M multiply-adds) are the floor.

Backward goes only through the chosen candidate (`ChosenCandidate`): d weight[k] = sum over the samples
b that chose k of d out_b f_b^T (index_add; in C++ per-sample rows summed into the K rows), d features =
W_idx^T d out, d bias = index_add of d out summed over pixels, d residual = d out.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import _library

# At most this many candidate elements (B * chunk * Cout * H * W) exist at once in the direct paths.
_CHUNK_ELEMENTS = 1 << 18
# Confidence factor of the probabilistic rounding-error bound of the float32 part of the l2 expansion.
_LAMBDA = 8.0
# At most this many float64 elements (4 MiB) per temporary in the expansion (Gram chunk, P chunk).
_EXPANSION_ELEMENTS = 1 << 19
# The fused per-sample l2 selection (ddn_l2_select_cpu) reads the K weight Gram triangles once per sample:
# worth it while they stay in cache (K <= 126 at Cin = 64); larger K takes the batched GEMM.
_FUSED_ELEMENTS = 1 << 18


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype distances accumulate in, as in the reference: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


# dtypes of the C++ kernels (csrc/ddn_cpu.cpp); float16/bfloat16 CPU tensors take the PyTorch path.
_EXT_DTYPES = (torch.float32, torch.float64)


def _cpu_ext(tensor: torch.Tensor):
    """The compiled CPU extension when `tensor` is a float32/float64 CPU tensor (the C++ kernels' domain),
    else None (other devices and dtypes use the PyTorch formulation below)."""
    if tensor.device.type != "cpu" or tensor.dtype not in _EXT_DTYPES:
        return None
    from ... import _build
    from ...backends import warn_build_failure

    try:
        return _build.load("ddn")
    except _build.BuildError as e:
        # The PyTorch formulation computes the same thing, slower: say so once, never silently.
        warn_build_failure("ddn", f"ddn_select/ddn_gather: the C++ kernels are unavailable, the cpu backend runs "
                                  f"its PyTorch formulation instead (slower): {e}", stacklevel=4)
        return None


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().contiguous()


# --- the chosen candidate and its backward ----------------------------------------------------------

def chosen_candidate_forward(features, weight, bias, residual, index):
    """[B, Cout, H, W] = einsum(weight[index[b]], features[b]) + bias[index[b]] + residual[b], in the
    input dtype, added in the reference's order."""
    B, Cin, H, W = features.shape
    ext = _cpu_ext(features)
    if ext is not None:
        out = torch.empty(B, weight.shape[1], H, W, dtype=features.dtype)
        ext.ddn_chosen_forward_cpu(_contiguous(features), _contiguous(weight), _contiguous(bias),
                                   _contiguous(residual), index.contiguous(), out)
        return out
    w_idx = weight.index_select(0, index)  # [B, Cout, Cin]
    out = torch.bmm(w_idx, features.reshape(B, Cin, H * W)).view(B, -1, H, W)
    if bias is not None:
        out = out + bias.index_select(0, index)[:, :, None, None]
    if residual is not None:
        out = out + residual
    return out


def chosen_candidate_backward(d_out, features, weight, index, has_bias: bool):
    """(d features [B, Cin, H, W], d weight [K, Cout, Cin], d bias [K, Cout] or None) of the chosen candidate.

    d weight[k] = sum over the samples b that chose k of d out_b f_b^T (index_add), d features =
    W_idx^T d out, d bias = index_add of d out summed over pixels: nothing of size K x H x W."""
    B, Cin, H, W = features.shape
    K, Cout, _ = weight.shape
    ext = _cpu_ext(features)
    if ext is not None:  # one C++ pass (csrc/ddn_cpu.cpp): d features and the per-sample d weight rows
        d_features = torch.empty(B, Cin, H, W, dtype=features.dtype)
        d_weight = torch.empty(K, Cout, Cin, dtype=features.dtype)
        d_bias = torch.empty(K, Cout, dtype=features.dtype) if has_bias else None
        ext.ddn_chosen_backward_cpu(features.contiguous(), weight.contiguous(), index.contiguous(),
                                    d_out.to(features.dtype).contiguous(), d_features, d_weight, d_bias)
        return d_features, d_weight, d_bias
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


# The chosen candidate's kernels as torch.library custom ops (any device: C++ for float32/float64 CPU
# tensors, PyTorch otherwise) with fake implementations and vmap rules, and one autograd.Function over
# them: the single autograd path of ddn_select and ddn_gather on every backend, eager, under torch.func
# and under torch.compile (see fastcomp/ops/_library.py).

@torch.library.custom_op("fastcomp::ddn_chosen_forward", mutates_args=(),
                         schema="(Tensor features, Tensor weight, Tensor index, Tensor? bias, Tensor? residual) -> Tensor")
def _chosen_forward_op(features, weight, index, bias, residual):
    return chosen_candidate_forward(features, weight, bias, residual, index).contiguous()


@_chosen_forward_op.register_fake
def _(features, weight, index, bias, residual):
    B, _, H, W = features.shape
    return features.new_empty(B, weight.shape[1], H, W)


@torch.library.custom_op("fastcomp::ddn_chosen_backward", mutates_args=(),
                         schema="(Tensor d_out, Tensor features, Tensor weight, Tensor index, bool has_bias) "
                                "-> (Tensor, Tensor, Tensor)")
def _chosen_backward_op(d_out, features, weight, index, has_bias):
    d_features, d_weight, d_bias = chosen_candidate_backward(d_out, features, weight, index, has_bias)
    if d_bias is None:  # an op's outputs cannot be None
        d_bias = weight.new_zeros(weight.shape[0], 0)
    return d_features.contiguous(), d_weight.contiguous(), d_bias.contiguous()


@_chosen_backward_op.register_fake
def _(d_out, features, weight, index, has_bias):
    K, Cout, _ = weight.shape
    return torch.empty_like(features, memory_format=torch.contiguous_format), torch.empty_like(weight), \
        weight.new_empty(K, Cout if has_bias else 0)


def _fold_chosen(info, in_dims, features, weight, index, bias, residual, d_out=None, per_instance_weight=False):
    """vmap: the n vmapped instances become n * B samples. The weight (and bias) are shared unless vmapped,
    or unless per_instance_weight (the backward's d weight is per instance): then they are stacked into
    n * K candidates and each instance's samples index their own K."""
    from .._library import fold_batch

    n = info.batch_size
    f_d, w_d, i_d, b_d, r_d, *g_d = in_dims
    K = weight.shape[0] if w_d is None else weight.shape[1 if w_d == 0 else 0]
    features, index, residual, d_out = fold_batch(info, (f_d, i_d, r_d, *(g_d or [None])),
                                                  (features, index, residual, d_out), (True,) * 4)
    if per_instance_weight or w_d is not None or b_d is not None:
        weight, bias = fold_batch(info, (w_d, b_d), (weight, bias), (True, True))
        index = index + (torch.arange(n, device=index.device) * K).repeat_interleave(index.shape[0] // n)
    return features, weight, index, bias, residual, d_out


@_chosen_forward_op.register_vmap
def _(info, in_dims, features, weight, index, bias, residual):
    from .._library import unfold_batch

    features, weight, index, bias, residual, _ = _fold_chosen(info, in_dims, features, weight, index, bias,
                                                              residual)
    return unfold_batch(_chosen_forward_op(features, weight, index, bias, residual), info.batch_size), 0


@_chosen_backward_op.register_vmap
def _(info, in_dims, d_out, features, weight, index, has_bias):
    from .._library import unfold_batch

    n = info.batch_size
    g_d, f_d, w_d, i_d, _ = in_dims
    features, weight, index, _, _, d_out = _fold_chosen(info, (f_d, w_d, i_d, None, None, g_d), features, weight,
                                                        index, None, None, d_out, per_instance_weight=True)
    d_features, d_weight, d_bias = _chosen_backward_op(d_out, features, weight, index, has_bias)
    return (unfold_batch(d_features, n), d_weight.view(n, -1, *d_weight.shape[1:]),
            d_bias.view(n, -1, d_bias.shape[1])), (0, 0, 0)


def _chosen_gradient():
    from .._library import once_differentiable

    return once_differentiable(_chosen_backward_op, "ddn_select/ddn_gather", "cpu/triton/cuda")


class ChosenCandidate(torch.autograd.Function):
    """The chosen candidate, differentiable in features, weight, bias and residual (index saved).

    forward: the candidate given by `out` (already computed by a backend's selection kernel; copied, since
    a Function may not hand back its input) or computed by fastcomp::ddn_chosen_forward. backward:
    fastcomp::ddn_chosen_backward (two bmm and two index_add; weight's gradient has non-zero rows only for
    chosen k). jvp: the candidate is bilinear in (features, weight) and affine in bias, residual, so its
    tangent is the chosen candidate of the tangents: W_idx df + dW_idx f + db_idx + dr.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(features, weight, bias, residual, index, out):
        if out is not None:
            return out.clone()
        return _chosen_forward_op(features, weight, index, bias, residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        features, weight, bias, residual, index, _ = inputs
        ctx.save_for_backward(features, weight, index)
        ctx.save_for_forward(features, weight, index)
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None

    @staticmethod
    def backward(ctx, d_out):
        features, weight, index = ctx.saved_tensors
        d_features, d_weight, d_bias = _CHOSEN_GRADIENT.apply(d_out, features, weight, index, ctx.has_bias)
        return (d_features, d_weight, d_bias if ctx.has_bias else None, d_out if ctx.has_residual else None,
                None, None)

    @staticmethod
    def jvp(ctx, d_features, d_weight, d_bias, d_residual, _d_index, _d_out):
        features, weight, index = ctx.saved_tensors
        tangent = None

        def add(t):
            nonlocal tangent
            tangent = t if tangent is None else tangent + t

        if d_features is not None:
            add(_chosen_forward_op(d_features, weight, index, None, None))
        if d_weight is not None:
            add(_chosen_forward_op(features, d_weight, index, None, None))
        if d_bias is not None:
            add(d_bias.index_select(0, index)[:, :, None, None].expand(-1, -1, *features.shape[2:]).contiguous())
        if d_residual is not None:
            add(d_residual)
        return tangent


_CHOSEN_GRADIENT = _chosen_gradient()  # a second derivative through it raises a clear error
_library.compile_opaque(ChosenCandidate)  # see fastcomp/ops/_library.py: Dynamo cannot trace its jvp


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
    step = max(1, _EXPANSION_ELEMENTS // (Cin * Cin))
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


@functools.lru_cache(maxsize=16)
def _diagonal_positions(cin: int) -> torch.Tensor:
    """Positions [Cin] of the diagonal entries in a Cin x Cin upper triangle stored row by row."""
    i = torch.arange(cin)
    return i * cin - i * (i - 1) // 2


def _gram_terms_cpu(ext, features, weight, target, residual):
    """The C++ passes of the expansion for float32/float64 CPU tensors: one pass over the features
    (csrc/ddn_cpu.cpp ddn_l2_stats_cpu) gives the Gram matrices' upper triangles and the sums; A is then
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
    step = max(1, _EXPANSION_ELEMENTS // n_tri)
    if step >= K:
        p_tri = torch.empty(K, n_tri, dtype=cd)
        ext.ddn_weight_gram_cpu(w, p_tri)
        a = torch.mm(gram, p_tri.t())
    else:
        a = torch.empty(B, K, dtype=cd)
        for k0 in range(0, K, step):  # chunks of K: at most _EXPANSION_ELEMENTS weight Gram entries at once
            w_k = w[k0:k0 + step]  # [k, Cout, Cin], contiguous
            p_tri = torch.empty(w_k.shape[0], n_tri, dtype=cd)
            ext.ddn_weight_gram_cpu(w_k, p_tri)
            a[:, k0:k0 + w_k.shape[0]] = torch.mm(gram, p_tri.t())
    return a, gram, m_fe, s_f, e_sum, e_sq


def _l2_terms_cpu(ext, features, weight, target, residual):
    """_l2_terms_torch for float32/float64 CPU tensors through `_gram_terms_cpu`."""
    Cin = features.shape[1]
    a, gram, m_fe, s_f, e_sum, e_sq = _gram_terms_cpu(ext, features, weight, target, residual)
    tr_ff = gram.index_select(1, _diagonal_positions(Cin)).sum(dim=1, dtype=torch.float64)  # [B]
    return a.to(torch.float64), tr_ff, m_fe, s_f, e_sum, e_sq


def l2_threshold_cpu(ext, features, weight, target, bias, residual):
    """(est float64 [B, K], bound float64 [B, K], thresh float64 [B]) for float32/float64 CPU tensors: what
    `expanded_l2` returns and select_cpu's re-ranking threshold min_k est + 2 max_k bound +
    `_reference_noise`, with everything after the Gram GEMM in one C++ pass (ddn_l2_threshold_cpu) instead
    of ~30 small torch ops (each tens of microseconds; ~1.5 ms of the ~6 ms forward at B=32, Cin=64, K=64,
    32x32, more on busy cores). Same formulas; float64 rounding differences only."""
    B = features.shape[0]
    K = weight.shape[0]
    a, gram, m_fe, s_f, e_sum, e_sq = _gram_terms_cpu(ext, features, weight, target, residual)
    est = torch.empty(B, K, dtype=torch.float64)
    bound = torch.empty(B, K, dtype=torch.float64)
    thresh = torch.empty(B, dtype=torch.float64)
    ext.ddn_l2_threshold_cpu(a, gram, m_fe, s_f, e_sum, e_sq, _contiguous(weight), _contiguous(bias),
                             _contiguous(target), _LAMBDA, est, bound, thresh)
    return est, bound, thresh


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
    dev = features.device
    cd = torch.float64 if features.dtype == torch.float64 else torch.float32  # dtype of A
    f64 = torch.float64

    ext = _cpu_ext(features)
    if ext is not None:
        dist, tr_ff, m_fe, s_f, e_sum, e_sq = _l2_terms_cpu(ext, features, weight, target, residual)
    else:
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
    bound = (min(n_a, _LAMBDA * n_a ** 0.5) * u_a / N) * tr_ff[:, None] * w_norm[None, :]
    bound += ((HW + Cin * Cout + 8) * u64 / N) * tr_aug[:, None] * w_aug_norm[None, :]
    # M_b's rounding: 2 <W_k, dM_b> <= 2 gamma sum_p |W_k f_p| |e_p| <= 2 gamma sqrt(||W_k||^2 tr(G_b) sum e^2)
    # (plus e's own rounding to float32, relative u_A).
    n_x = HW + Cin * Cout + 2
    bound += (2 * min(n_x, _LAMBDA * n_x ** 0.5) * u_a / N) * (tr_ff[:, None] * w_norm[None, :]
                                                                * e_sq[:, None]).sqrt()
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
    """The "cpu" backend's selection kernel (no autograd): (index int64 [B], distances float32 [B, K],
    the chosen candidate [B, Cout, H, W])."""
    B = features.shape[0]
    K = weight.shape[0]
    out = None  # the chosen candidate, when the C++ re-ranking has already formed it
    with torch.no_grad():
        if metric == "l1":
            k_all = torch.arange(K, device=features.device).expand(B, K)
            dist = exact_distances(features, weight, target, bias, residual, metric, k_all)
            index = dist.argmin(dim=1)  # first minimum: ties -> smallest k
            distances = dist.float()
        else:
            ext = _cpu_ext(features)
            Cin = features.shape[1]
            n_tri = Cin * (Cin + 1) // 2
            fused = ext is not None and K * n_tri <= _FUSED_ELEMENTS
            if fused:
                # Small K: the whole selection per sample in one C++ pass while the sample's features are in
                # cache (statistics, A against the weight Grams, est, bound, threshold, re-ranking).
                p_tri = torch.empty(K, n_tri, dtype=features.dtype)
                ext.ddn_weight_gram_cpu(_contiguous(weight), p_tri)
                distances = torch.empty(B, K, dtype=torch.float32)
                index = torch.empty(B, dtype=torch.int64)
                out = torch.empty(target.shape, dtype=features.dtype)
                ext.ddn_l2_select_cpu(_contiguous(features), _contiguous(weight), _contiguous(bias),
                                      _contiguous(residual), _contiguous(target), p_tri, _LAMBDA, distances, index,
                                      out)
            elif ext is not None:  # the same est and thresh, all but the Gram GEMM in C++
                est, _, thresh = l2_threshold_cpu(ext, features, weight, target, bias, residual)
            else:
                est, bound = expanded_l2(features, weight, target, bias, residual)
                # amin/amax, not min(dim)/max(dim): those also compute indices, and in torch 2.13 on CPU they
                # took ~20 ms even on a [2, 3] tensor when the cores were busy (amin: 2 us)
                est_min = est.amin(dim=1)  # [B]
                margin = 2 * bound.amax(dim=1) + _reference_noise(features.dtype, est_min, target)
                thresh = est_min + margin  # [B]: every k with est <= thresh is re-ranked exactly
            if fused:
                pass  # distances, index and out are written
            elif ext is not None:
                # One C++ pass: each sample's own near-best (not the batch's largest count) formed once, its
                # exact distance, and the winner kept as the output (not recomputed by chosen_candidate).
                distances = torch.empty(B, K, dtype=torch.float32)
                index = torch.empty(B, dtype=torch.int64)
                out = torch.empty(target.shape, dtype=features.dtype)
                ext.ddn_rerank_cpu(_contiguous(features), _contiguous(weight), _contiguous(bias),
                                   _contiguous(residual), _contiguous(target), est, thresh.contiguous(), distances,
                                   index, out)
            else:
                n_close = (est <= thresh[:, None]).sum(dim=1)  # [B], >= 1
                m = max(1, int(n_close.max()))  # NaN rows count 0
                # The m best by the expansion, in increasing k, so that exact ties go to the smallest k.
                k_near = est.topk(m, dim=1, largest=False).indices.sort(dim=1).values  # [B, m]
                exact = exact_distances(features, weight, target, bias, residual, metric, k_near)  # [B, m]
                index = k_near.gather(1, exact.argmin(dim=1, keepdim=True)).squeeze(1)
                distances = est.float().scatter_(1, k_near, exact.float())
    if out is None:
        out = chosen_candidate_forward(features, weight, bias, residual, index)
    return index, distances, out
