"""DDN K-way selection: the public functions (input checks, then one dispatch to a backend) and their
backends' registration.

The op's files: reference.py (the spec), library.py (the custom ops and the one autograd path, through the
chosen candidate), cpu.py (C++ kernels, csrc/ddn/), pytorch.py (the torch backend: the same algorithm in
PyTorch, always available), triton.py (kernels/ddn.py) and cuda.py (csrc/ddn/ddn.cu). None but the
reference holds the B x K x Cout x H x W candidates.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ... import backends as _b
from .. import _checks as check
from . import cpu, cuda, pytorch, triton
from .library import GATHER, SELECT, gather_by_chosen_candidate, gather_op, make_chosen_candidate, selection_op
from .reference import ddn_gather_reference, ddn_select_reference

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
# The chosen candidate's two sets of kernels (library.py): C++ for the cpu backend, PyTorch for the others.
chosen_cpu = make_chosen_candidate("cpu", cpu.chosen_forward, cpu.chosen_backward, "cpu")
chosen_torch = make_chosen_candidate("torch", pytorch.chosen_forward, pytorch.chosen_backward,
                                      "torch/triton/cuda")

# Priorities: on CUDA tensors Triton (tl.dot over Cin on the tensor cores, BLOCK_K candidates per features
# load) above the CUDA kernel (csrc/ddn/ddn.cu: scalar FMAs, about 9 loads per 8 multiply-adds), until a GPU
# measurement (benchmarks/gpu_check.sh, DDN section) says otherwise; on CPU tensors the C++ kernels above
# their PyTorch formulation (several times faster: benchmarks/results/ddn-cpu-notes.md), which runs where
# they cannot (float16/bfloat16, no compiler, a failed build).
_TRITON_PRIORITY, _CUDA_PRIORITY, _CPU_PRIORITY, _TORCH_PRIORITY = 20, 15, 10, 5
# Input dtypes of the GPU backends (triton and cuda); cpu's are cpu.DTYPES, torch takes every floating dtype.
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _register(name: str, priority: int, select_run, gather_run, select_description: str,
              gather_description: str, *, input_problem=None, machine_check=None, prepare=None):
    """Register backend ``name`` of both ops; ``input_problem(*tensors)`` checks the tensor arguments."""
    check = None if input_problem is None else (lambda f, w, x, b, r: input_problem(f, w, x, b, r))
    for op, run, description in ((SELECT, select_run, select_description), (GATHER, gather_run, gather_description)):
        _b.register(op, name, priority=priority, machine_check=machine_check, input_check=check, prepare=prepare,
                    description=description)(run)


_register("cpu", _CPU_PRIORITY, selection_op("cpu", cpu.select, chosen_cpu), gather_by_chosen_candidate(chosen_cpu),
          "C++ kernels: Gram expansion + exact re-ranking of the near-best (l2), chunked direct distances (l1); "
          "float32/float64",
          "C++ kernels: the chosen candidate and its backward; float32/float64",
          # one dtype for all: the public functions checked that the tensors share features' dtype
          input_problem=lambda f, *t: _b.device_input_problem("cpu", f, *t) or _b.dtype_input_problem(cpu.DTYPES, f),
          machine_check=_b.cpp_problem("ddn"), prepare=_b.cpp_prepare("ddn"))
_register("torch", _TORCH_PRIORITY, selection_op("torch", pytorch.select, chosen_torch),
          gather_by_chosen_candidate(chosen_torch),
          "PyTorch: Gram expansion + exact re-ranking of the near-best (l2), chunked over K (l1)",
          "PyTorch: bmm of the gathered weights; backward by index_add")
_register("triton", _TRITON_PRIORITY, selection_op("triton", triton.select, chosen_torch),
          gather_op("triton", triton.gather, chosen_torch),
          "fused distances per (b, k block) with tl.dot, candidates in registers; torch argmin",
          "the chosen candidate per (b, pixel block); backward by bmm/index_add",
          input_problem=lambda *t: _b.triton_input_problem(*t) or _b.dtype_input_problem(_GPU_DTYPES, *t),
          machine_check=_b.triton_problem)
_register("cuda", _CUDA_PRIORITY, selection_op("cuda", cuda.select, chosen_torch),
          gather_op("cuda", cuda.gather, chosen_torch),
          "CUDA kernels: fused distances (kTileK candidates per block) + argmin; torch backward",
          "CUDA kernel, one thread per (b, pixel); torch backward",
          input_problem=lambda *t: _b.device_input_problem("cuda", *t) or _b.dtype_input_problem(_GPU_DTYPES, *t),
          machine_check=_b.cuda_problem)
