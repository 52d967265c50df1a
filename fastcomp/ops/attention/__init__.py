"""Local conditional attention: the public function (input checks, then one dispatch to a backend) and
its backends' registration.

The op's files: reference.py (the spec, plain PyTorch), library.py (the custom ops and their one autograd
path), cpu.py and triton.py (the launchers of csrc/attention/ and kernels/attention.py).
"""

from __future__ import annotations

import operator
from typing import Optional, Union

import torch

from ... import backends as _b
from .. import _checks as check
from . import cpu, triton
from .library import OP, make_fused_backend
from .reference import local_conditional_attention_reference, propagate_poison, screen_conditioners


def _kernel_size(kernel_size, H: int, W: int) -> tuple[int, int]:
    if check.is_int(kernel_size):  # numpy integers too
        kh = kw = int(kernel_size)
    elif isinstance(kernel_size, (tuple, list)) and len(kernel_size) == 2 and all(map(check.is_int, kernel_size)):
        kh, kw = (int(s) for s in kernel_size)
    else:
        raise TypeError(f"{OP}: kernel_size must be an odd int or a pair (kh, kw), got {kernel_size!r}")
    for name, size, side, side_name in (("kh", kh, H, "H"), ("kw", kw, W, "W")):
        if size < 1 or size % 2 == 0:
            raise ValueError(f"{OP}: kernel_size must be odd and >= 1 so the window has a centre, "
                             f"got {name} = {size} (kernel_size={kernel_size!r})")
        if size > side:
            raise ValueError(f"{OP}: kernel_size {name} = {size} is larger than the image side {side_name} = "
                             f"{side}; use a kernel of at most {side if side % 2 else side - 1}")
    return kh, kw


def local_conditional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: Union[int, tuple[int, int]],
    *,
    cond_k: Optional[torch.Tensor] = None,
    cond_v: Optional[torch.Tensor] = None,
    cond_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Image tokens attend a 2-D window of image tokens plus the conditioners allowed there, in one softmax.

    q, k, v: [B, H, W, heads, D] (heads-last, as NATTEN). kernel_size: odd int or (kh, kw), each at most
    the image side; pixel (i, j) attends the kh x kw window whose top-left corner is
    (clamp(i - kh//2, 0, H - kh), clamp(j - kw//2, 0, W - kw)).
    cond_k, cond_v: [B, M, heads, D] conditioner tokens (both or neither; M may be 0).
    cond_mask: [B, M, H, W] bool, may pixel (i, j) attend conditioner m? None = every pixel sees all.
    A conditioner changes only the pixels that see it, on every backend, even when it holds NaN or inf
    (padding); a pixel that sees a non-finite conditioner gets NaN.
    scale: softmax scale, finite and > 0, default D ** -0.5. backend: None (best available) or a name from
    ``fastcomp info``. Returns [B, H, W, heads, D].
    """
    check.tensor(OP, "q", q, ndim=5, layout="[B, H, W, heads, D]")
    check.floating(OP, "q", q)
    B, H, W, heads, D = q.shape
    for name, t in (("k", k), ("v", v)):
        check.tensor(OP, name, t, ndim=5, layout="[B, H, W, heads, D]")
        check.shape(OP, name, t, q.shape, "[B, H, W, heads, D]", "must match q")
    check.same_dtype(OP, "q", q, k=k, v=v, cond_k=cond_k, cond_v=cond_v)
    check.same_device(OP, "q", q, k=k, v=v, cond_k=cond_k, cond_v=cond_v, cond_mask=cond_mask)
    kh, kw = _kernel_size(kernel_size, H, W)

    if (cond_k is None) != (cond_v is None):
        given, missing = ("cond_k", "cond_v") if cond_v is None else ("cond_v", "cond_k")
        raise ValueError(f"{OP}: {given} was given without {missing}; pass both conditioner keys and "
                         f"values, or neither")
    if cond_k is not None:
        check.tensor(OP, "cond_k", cond_k, ndim=4, layout="[B, M, heads, D]")
        M = cond_k.shape[1]
        check.shape(OP, "cond_k", cond_k, (B, M, heads, D), "[B, M, heads, D]", "B, heads and D from q")
        check.tensor(OP, "cond_v", cond_v, ndim=4, layout="[B, M, heads, D]")
        check.shape(OP, "cond_v", cond_v, cond_k.shape, "[B, M, heads, D]", "must match cond_k")
        if cond_mask is not None:
            check.tensor(OP, "cond_mask", cond_mask, ndim=4, layout="[B, M, H, W]")
            if cond_mask.dtype != torch.bool:
                raise TypeError(f"{OP}: cond_mask must be a bool tensor, got {check.dtype_name(cond_mask.dtype)}"
                                f"; build it with a comparison or fastcomp.disk_mask, or call .bool()")
            check.shape(OP, "cond_mask", cond_mask, (B, M, H, W), "[B, M, H, W]",
                        "B and H, W from q, M from cond_k")
    elif cond_mask is not None:
        raise ValueError(f"{OP}: cond_mask was given without cond_k/cond_v; it says which conditioner "
                         f"tokens a pixel may attend, so pass the tokens too (or drop the mask)")
    if scale is not None:
        scale = check.positive_finite(OP, "scale", scale, "the softmax scale; None for the default D ** -0.5")
    else:  # resolved once here, so every backend gets the same number
        scale = D ** -0.5

    if B == 0:  # nothing to attend; the result is empty but shaped and still differentiable
        return q * 0.0
    # Conditioners no pixel sees, and non-finite ones, reach no kernel (see screen_conditioners).
    cond_k, cond_v, poisoned = screen_conditioners(cond_k, cond_v, cond_mask, H, W)
    call_args = (q, k, v, (kh, kw), cond_k, cond_v, cond_mask, scale)
    # Under torch.compile the choice is made while tracing from the metadata the backends' input checks read:
    # device, dtype, head dim (operator.index specializes a symbolic one), conditioners and mask or not.
    def compile_specs():
        image, cond = (1, kh, kw, 1, operator.index(D)), (1, 1, 1, operator.index(D))
        return (*(_b.tensor_spec(t, image) for t in (q, k, v)), *(_b.tensor_spec(t, cond) for t in (cond_k, cond_v)),
                _b.tensor_spec(cond_mask, (1, 1, kh, kw)))

    out = _b.dispatch(OP, backend, (q, k, v, cond_k, cond_v, cond_mask), call_args, compile_specs=compile_specs)
    return propagate_poison(out, poisoned)


@_b.register(OP, "reference", priority=0,
             description="dense masked scaled_dot_product_attention, O((H*W)^2) memory")
def _attention_reference(q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale):
    return local_conditional_attention_reference(q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale)


# --- fused backends: the launchers of cpu.py and triton.py under library.py's custom ops and autograd ----

_attention_cpu, CpuFunction = make_fused_backend("cpu", cpu.forward, cpu.backward, cpu.jvp,
                                                 lse_dtype=cpu.compute_dtype)
_b.register(OP, "cpu", priority=10, machine_check=_b.cpp_problem("attention"), prepare=_b.cpp_prepare("attention"),
            input_check=lambda q, *rest: (_b.device_input_problem("cpu", q, *rest)
                                          or _b.dtype_input_problem(cpu.DTYPES, q)),
            description="C++ extension, OpenMP over (b, head, rows), vectorized over queries; O(H*W) memory; "
                        "float16/bfloat16 run in float32 inside")(_attention_cpu)

_attention_triton, TritonFunction = make_fused_backend("triton", triton.forward, triton.backward, triton.jvp,
                                                       lse_dtype=triton.lse_dtype)
_b.register(OP, "triton", priority=15, machine_check=_b.triton_problem,
            input_check=lambda q, *rest: (_b.triton_input_problem(q, *rest)
                                          or _b.dtype_input_problem(triton.DTYPES, q)
                                          or triton.head_dim_problem(q)),
            description="Triton kernels, fused online softmax over window + conditioners")(_attention_triton)
