"""Public DDN K-way selection: input checks, then dispatch to a backend."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ... import backends as _b
from .. import _checks as check
from .pytorch import chosen_candidate
from .reference import ddn_gather_reference, ddn_select_reference

SELECT = "ddn_select"
GATHER = "ddn_gather"
METRICS = ("l2", "l1")


class DDNSelection(NamedTuple):
    output: torch.Tensor  # [B, Cout, H, W], the chosen candidate; differentiable
    index: torch.Tensor  # int64 [B]
    distances: torch.Tensor  # float32 [B, K], no grad


def _check_layer(op, features, weight, bias, residual):
    """Validate the candidate-producing arguments; returns (B, K, Cout, Cin, H, W)."""
    check.tensor(op, "features", features, ndim=4, layout="[B, Cin, H, W]")
    check.floating(op, "features", features)
    if isinstance(weight, torch.Tensor) and weight.dim() == 4 and weight.shape[2:] == (1, 1):
        raise ValueError(f"{op}: weight must have shape [K, Cout, Cin]; got a conv1x1 weight "
                         f"{check.fmt_shape(weight.shape)}: pass weight.view(K, Cout, Cin)")
    check.tensor(op, "weight", weight, ndim=3, layout="[K, Cout, Cin]")
    B, Cin, H, W = features.shape
    K, Cout, w_cin = weight.shape
    if K < 1 or Cout < 1 or w_cin < 1:
        raise ValueError(f"{op}: weight [K, Cout, Cin] needs K >= 1, Cout >= 1 and Cin >= 1, "
                         f"got {check.fmt_shape(weight.shape)}")
    if w_cin != Cin:
        raise ValueError(f"{op}: weight [K, Cout, Cin] = {check.fmt_shape(weight.shape)} has Cin = {w_cin} but "
                         f"features [B, Cin, H, W] = {check.fmt_shape(features.shape)} has Cin = {Cin}")
    if bias is not None:
        if isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.numel() == K * Cout:
            raise ValueError(f"{op}: bias must have shape [K, Cout] = {check.fmt_shape((K, Cout))}; got a "
                             f"conv bias [{K * Cout}]: pass bias.view(K, Cout)")
        check.tensor(op, "bias", bias, ndim=2, layout="[K, Cout]")
        check.shape(op, "bias", bias, (K, Cout), "[K, Cout]", f"K, Cout from weight {check.fmt_shape(weight.shape)}")
    if residual is not None:
        check.tensor(op, "residual", residual, ndim=4, layout="[B, Cout, H, W]")
        check.shape(op, "residual", residual, (B, Cout, H, W), "[B, Cout, H, W]",
                    "B, H, W from features, Cout from weight")
    check.same_dtype(op, "features", features, weight=weight, bias=bias, residual=residual)
    check.same_device(op, "features", features, weight=weight, bias=bias, residual=residual)
    return B, K, Cout, Cin, H, W


def ddn_select(features, weight, target, *, bias=None, residual=None, metric: str = "l2",
               backend: Optional[str] = None) -> DDNSelection:
    """Pick, per sample, the candidate nearest the target among K produced by a 1x1 conv.

    features: [B, Cin, H, W]; weight: [K, Cout, Cin] (= conv1x1 weight.view(K, Cout, Cin));
    bias: [K, Cout]; residual, target: [B, Cout, H, W].
    candidate_k = einsum(weight[k], features) + bias[k] + residual;
    distances[b, k] = mean over (c, y, x) of (candidate_k - target)^2 (metric "l1": |.|);
    index[b] = argmin_k distances[b, k] (ties -> smallest k).
    Returns DDNSelection(output [B, Cout, H, W] = candidate_index[b] (differentiable in features,
    weight, bias, residual), index int64 [B], distances float32 [B, K] (no grad)).
    """
    B, K, Cout, _, H, W = _check_layer(SELECT, features, weight, bias, residual)
    check.tensor(SELECT, "target", target, ndim=4, layout="[B, Cout, H, W]")
    check.shape(SELECT, "target", target, (B, Cout, H, W), "[B, Cout, H, W]",
                "B, H, W from features, Cout from weight")
    check.same_dtype(SELECT, "features", features, target=target)
    check.same_device(SELECT, "features", features, target=target)
    if metric not in METRICS:
        raise ValueError(f"{SELECT}: metric must be one of {METRICS}, got {metric!r}")
    if B == 0:
        out = features.new_zeros(0, Cout, H, W) + weight.sum() * 0  # keeps the autograd connection
        return DDNSelection(out, torch.zeros(0, dtype=torch.int64, device=features.device),
                            torch.zeros(0, K, dtype=torch.float32, device=features.device))
    output, index, distances = _b.dispatch(SELECT, backend, (features, weight, target, bias, residual),
                                           (features, weight, target, bias, residual, metric))
    return DDNSelection(output, index, distances)


def ddn_gather(features, weight, index, *, bias=None, residual=None, backend: Optional[str] = None):
    """The chosen candidate only: output[b] = einsum(weight[index[b]], features[b]) + bias[index[b]] + residual[b].

    For generation and guided sampling. index: int64 [B] in [0, K). Differentiable in features, weight,
    bias, residual. Returns [B, Cout, H, W].
    """
    B, K, Cout, _, H, W = _check_layer(GATHER, features, weight, bias, residual)
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{GATHER}: index must be an int64 tensor of shape [B], got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise TypeError(f"{GATHER}: index must be int64 (torch.long), got {check.dtype_name(index.dtype)}; "
                        f"call index.long()")
    check.shape(GATHER, "index", index, (B,), "[B]", "B from features")
    check.same_device(GATHER, "features", features, index=index)
    if B == 0:
        return features.new_zeros(0, Cout, H, W) + weight.sum() * 0
    _check_index_range(index, K)
    return _b.dispatch(GATHER, backend, (features, weight, index, bias, residual),
                       (features, weight, index, bias, residual))


def _check_index_range(index: torch.Tensor, K: int) -> None:
    in_range = (index >= 0) & (index < K)
    if index.device.type == "cuda" or torch.compiler.is_compiling():
        # An eager check would sync with the host every layer of a generation loop (and break a compiled
        # graph); assert on the device instead.
        torch._assert_async(in_range.all(), f"{GATHER}: index values must lie in [0, K={K})")
    elif not bool(in_range.all()):
        bad = index[~in_range]
        raise ValueError(f"{GATHER}: index values must lie in [0, K) = [0, {K}), got {bad.tolist()[:8]} "
                         f"at positions {torch.nonzero(~in_range).flatten().tolist()[:8]}")


@_b.register(SELECT, "reference", priority=0, description="materializes all K candidates (original DDN code)")
def _select_reference(features, weight, target, bias, residual, metric):
    return ddn_select_reference(features, weight, target, bias, residual, metric)


@_b.register(GATHER, "reference", priority=0, description="materializes all K candidates, then indexes")
def _gather_reference(features, weight, index, bias, residual):
    return ddn_gather_reference(features, weight, index, bias, residual)


# --- fast backends ----------------------------------------------------------------------------------
# cpu: fastcomp/ops/_ddn_torch.py + csrc/ddn_cpu.cpp (expansion + exact re-ranking for l2, chunked direct for l1);
# triton: kernels/ddn.py; cuda: csrc/ddn.cu. None holds the B x K x Cout x H x W candidates.
#
# Each backend's selection is a torch.library custom op fastcomp::ddn_select_<backend>(features, weight,
# target, bias, residual, metric) -> (index, distances float32, the chosen candidate), with no autograd
# (the index is piecewise constant): torch.compile sees one opaque node with a fake implementation, so the
# selection's host syncs, extension loads and size-dependent Python branches stay out of the graph. The
# output then goes through _ddn_torch.chosen_candidate, the one autograd path of every backend (backward
# and jvp through the chosen candidate only). ddn_gather's fast backends: the candidate kernel (its own
# custom op on triton and cuda; fastcomp::ddn_chosen_forward on cpu) under the same chosen_candidate.

_SELECT_SCHEMA = ("(Tensor features, Tensor weight, Tensor target, Tensor? bias, Tensor? residual, str metric) "
                  "-> (Tensor, Tensor, Tensor)")
_GATHER_SCHEMA = "(Tensor features, Tensor weight, Tensor index, Tensor? bias, Tensor? residual) -> Tensor"


def _selection_op(backend: str, compute):
    """The custom op over compute(features, weight, target, bias, residual, metric) -> (index, distances, out)."""
    def impl(features, weight, target, bias, residual, metric):
        index, distances, out = compute(features, weight, target, bias, residual, metric)
        return index.contiguous(), distances.float().contiguous(), out.contiguous()

    op = torch.library.custom_op(f"fastcomp::ddn_select_{backend}", impl, mutates_args=(), schema=_SELECT_SCHEMA)

    @op.register_fake
    def _(features, weight, target, bias, residual, metric):
        B = features.shape[0]
        return (features.new_empty(B, dtype=torch.int64), features.new_empty(B, weight.shape[0], dtype=torch.float32),
                torch.empty_like(target, memory_format=torch.contiguous_format))

    @op.register_vmap
    def _(info, in_dims, features, weight, target, bias, residual, metric):
        from .._library import fold_batch, unfold_batch

        if in_dims[1] is not None or in_dims[3] is not None:
            raise NotImplementedError(f"{SELECT}: vmap over weight or bias is not supported (each vmapped "
                                      f"instance would select among its own K candidates); loop over them")
        f, t, r = fold_batch(info, (in_dims[0], in_dims[2], in_dims[4]), (features, target, residual), (True,) * 3)
        return tuple(unfold_batch(x, info.batch_size) for x in op(f, weight, t, bias, r, metric)), (0, 0, 0)

    def run(features, weight, target, bias, residual, metric):
        # The selection has no derivative: its inputs are detached (no autograd node, no tangent).
        detached = (None if t is None else t.detach() for t in (features, weight, target, bias, residual))
        index, distances, out = op(*detached, metric)
        return chosen_candidate(features, weight, bias, residual, index, out), index, distances

    return run


def _gather_op(backend: str, compute):
    """ddn_gather through the custom op over compute(features, weight, index, bias, residual) -> candidate."""
    op = torch.library.custom_op(f"fastcomp::ddn_gather_{backend}", compute, mutates_args=(), schema=_GATHER_SCHEMA)

    @op.register_fake
    def _(features, weight, index, bias, residual):
        B, _, H, W = features.shape
        return features.new_empty(B, weight.shape[1], H, W)

    def run(features, weight, index, bias, residual):
        detached = (None if t is None else t.detach() for t in (features, weight, index, bias, residual))
        return chosen_candidate(features, weight, bias, residual, index, op(*detached))

    return run


def _cpu_input_problem(*tensors):
    return _b.device_input_problem("cpu", *tensors)


def _select_cpu_compute(features, weight, target, bias, residual, metric):
    from .pytorch import select_cpu

    return select_cpu(features, weight, target, bias, residual, metric)


_b.register(SELECT, "cpu", priority=10, input_check=lambda f, w, t, b, r: _cpu_input_problem(f, w, t, b, r),
            description="Gram expansion + exact re-ranking of the near-best (l2; C++ for float32/64); chunked over K (l1)"
            )(_selection_op("cpu", _select_cpu_compute))


@_b.register(GATHER, "cpu", priority=10, input_check=lambda f, w, i, b, r: _cpu_input_problem(f, w, i, b, r),
             description="bmm of the gathered weights; backward by index_add")
def _gather_cpu(features, weight, index, bias, residual):
    return chosen_candidate(features, weight, bias, residual, index)


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Ranking on CUDA tensors: Triton (tl.dot over Cin on the tensor cores, BLOCK_K candidates per features
# load) above the CUDA kernel (csrc/ddn.cu: scalar FMAs, about 9 loads per 8 multiply-adds), until a GPU
# measurement (benchmarks/gpu_check.sh, DDN section) says otherwise.
_TRITON_PRIORITY, _CUDA_PRIORITY = 20, 15


def _triton_input_problem(*tensors):
    return _b.triton_input_problem(*tensors) or _b.dtype_input_problem(_TRITON_DTYPES, *tensors)


def _select_triton_compute(features, weight, target, bias, residual, metric):
    from ...kernels.ddn import ddn_distances_triton, ddn_gather_forward_triton

    dist = ddn_distances_triton(features, weight, target, bias, residual, metric)
    index = dist.argmin(dim=1)  # first minimum: ties -> smallest k
    return index, dist, ddn_gather_forward_triton(features, weight, index, bias, residual)


def _gather_triton_compute(features, weight, index, bias, residual):
    from ...kernels.ddn import ddn_gather_forward_triton

    return ddn_gather_forward_triton(features, weight, index, bias, residual)


_b.register(SELECT, "triton", priority=_TRITON_PRIORITY, machine_check=_b.triton_problem,
            input_check=lambda f, w, t, b, r: _triton_input_problem(f, w, t, b, r),
            description="fused distances per (b, k block) with tl.dot, candidates in registers; torch argmin"
            )(_selection_op("triton", _select_triton_compute))
_b.register(GATHER, "triton", priority=_TRITON_PRIORITY, machine_check=_b.triton_problem,
            input_check=lambda f, w, i, b, r: _triton_input_problem(f, w, i, b, r),
            description="the chosen candidate per (b, pixel block); backward by bmm/index_add"
            )(_gather_op("triton", _gather_triton_compute))


# CUDA (csrc/ddn.cu through csrc/ddn_cuda_ops.cpp): fused distances + argmin kernels and the gather
# kernel; the backward is ChosenCandidate's bmm/index_add (cuBLAS already does those well).

def _cuda_input_problem(*tensors):
    return _b.device_input_problem("cuda", *tensors) or _b.dtype_input_problem(_TRITON_DTYPES, *tensors)


def _cuda_args(features, weight, bias, residual):
    def c(t):
        return None if t is None else t.detach().contiguous()

    return c(features), c(weight), c(bias), c(residual)


def _cuda_gather_forward(features, weight, index, bias, residual):
    from ... import _build

    ext = _build.load("cuda")
    stream = torch.cuda.current_stream(features.device).cuda_stream
    f, w, b, r = _cuda_args(features, weight, bias, residual)
    out = torch.empty(f.shape[0], w.shape[1], f.shape[2], f.shape[3], dtype=f.dtype, device=f.device)
    ext.ddn_gather_cuda(f, w, index.contiguous(), b, r, out, stream)
    return out


def _select_cuda_compute(features, weight, target, bias, residual, metric):
    from ... import _build

    ext = _build.load("cuda")
    stream = torch.cuda.current_stream(features.device).cuda_stream
    f, w, b, r = _cuda_args(features, weight, bias, residual)
    acc = torch.float64 if f.dtype == torch.float64 else torch.float32
    dist = torch.empty(f.shape[0], w.shape[0], dtype=acc, device=f.device)
    index = torch.empty(f.shape[0], dtype=torch.int64, device=f.device)
    ext.ddn_select_cuda(f, w, target.contiguous(), b, r, metric == "l1", dist, index, stream)
    return index, dist, _cuda_gather_forward(features, weight, index, bias, residual)


_b.register(SELECT, "cuda", priority=_CUDA_PRIORITY, machine_check=_b.cuda_problem,
            input_check=lambda f, w, t, b, r: _cuda_input_problem(f, w, t, b, r),
            description="CUDA kernels: fused distances (kTileK candidates per block) + argmin; torch backward"
            )(_selection_op("cuda", _select_cuda_compute))
_b.register(GATHER, "cuda", priority=_CUDA_PRIORITY, machine_check=_b.cuda_problem,
            input_check=lambda f, w, i, b, r: _cuda_input_problem(f, w, i, b, r),
            description="CUDA kernel, one thread per (b, pixel); torch backward")(_gather_op("cuda", _cuda_gather_forward))
