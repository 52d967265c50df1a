"""Public local conditional attention and disk masks: input checks, then dispatch to a backend."""

from __future__ import annotations

import math
import sys
from typing import Callable, Optional, Union

import torch

from .. import backends as _b
from ..reference.attention import (disk_mask_reference, local_conditional_attention_reference, propagate_poison,
                                   screen_conditioners)
from . import _checks as check

OP = "local_conditional_attention"


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
    if torch.compiler.is_compiling():
        # The registry's checks look at the machine (compilers on PATH, build caches), which dynamo cannot
        # trace; the choice depends only on constants, so it is made once, at trace time.
        name = _compile_time_backend(backend, q.device.type, q.dtype)
        out = _b.backends(OP)[[b.name for b in _b.backends(OP)].index(name)].fn(*call_args)
    else:
        out = _b.dispatch(OP, backend, (q, k, v, cond_k, cond_v, cond_mask), call_args)
    return propagate_poison(out, poisoned)


@torch.compiler.assume_constant_result
def _compile_time_backend(requested: Optional[str], device_type: str, dtype: torch.dtype) -> str:
    """The backend eager dispatch would pick for tensors of this device and dtype (run once, while tracing)."""
    probe = torch.empty(0, device=device_type, dtype=dtype)
    return _b.select(OP, requested, probe, probe, probe).name


@_b.register(OP, "reference", priority=0,
             description="dense masked scaled_dot_product_attention, O((H*W)^2) memory")
def _attention_reference(q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale):
    return local_conditional_attention_reference(q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale)


# --- fused backends: one autograd.Function and one torch.library op over a backend's kernel pair ----
#
# A fused backend supplies two kernels with this contract (kernels/local_attention.py for Triton,
# lca_forward_cpu / lca_backward_cpu below for C++):
#   forward(q, k, v, cond_k, cond_v, cond_mask, kernel_size, scale) -> (out, lse)
#       q, k, v [B, H, W, heads, D] any strides; cond_k, cond_v [B, M, heads, D] or None (M may be 0);
#       cond_mask [B, M, H, W] bool or None (None with cond given: every pixel sees every conditioner);
#       kernel_size (kh, kw); scale already resolved. out [B, H, W, heads, D] in q.dtype; lse opaque,
#       [B, heads, H, W] (float32, or float64 for float64 inputs on the CPU).
#   backward(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, kernel_size, scale)
#       -> (dq, dk, dv, dcond_k, dcond_v), dcond_* None when cond_k is None.
# Eager calls go through LocalConditionalAttentionFunction; under torch.compile the same kernels run as
# the custom ops fastcomp::lca_forward / fastcomp::lca_backward (with fake implementations), so a model
# using the op compiles with fullgraph=True.

CPU_DTYPES = (torch.float32, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_HEAD_DIMS = (16, 128)  # kernels/local_attention.py pads D to a power of two up to 128


def _empty_cond(q: torch.Tensor) -> torch.Tensor:
    B, _, _, heads, D = q.shape
    return q.new_empty(B, 0, heads, D)


def lca_forward_cpu(q, k, v, cond_k, cond_v, cond_mask, kernel_size, scale):
    """C++ forward (csrc/attention_cpu.cpp): (out [B, H, W, heads, D], lse [B, heads, H, W] in q.dtype)."""
    from .. import _build

    B, H, W, heads, D = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cond_k = _empty_cond(q) if cond_k is None else cond_k.contiguous()
    cond_v = _empty_cond(q) if cond_v is None else cond_v.contiguous()
    mask = torch.empty(0, dtype=torch.bool) if cond_mask is None else cond_mask.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(B, heads, H, W, dtype=q.dtype)
    _build.load("cpu").local_attention_forward_cpu(q, k, v, cond_k, cond_v, mask, kernel_size[0], kernel_size[1],
                                                   float(scale), out, lse)
    return out, lse


def lca_backward_cpu(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, kernel_size, scale):
    """C++ backward: (dq, dk, dv, dcond_k, dcond_v), the last two None when cond_k is None."""
    from .. import _build

    has_cond = cond_k is not None
    q, k, v, out, lse = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous()
    grad_out = grad_out.contiguous()
    cond_k = _empty_cond(q) if cond_k is None else cond_k.contiguous()
    cond_v = _empty_cond(q) if cond_v is None else cond_v.contiguous()
    mask = torch.empty(0, dtype=torch.bool) if cond_mask is None else cond_mask.contiguous()
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype) for _ in range(3))
    dcond_k, dcond_v = torch.empty(cond_k.shape, dtype=q.dtype), torch.empty(cond_k.shape, dtype=q.dtype)
    _build.load("cpu").local_attention_backward_cpu(grad_out, q, k, v, cond_k, cond_v, mask, out, lse,
                                                    kernel_size[0], kernel_size[1], float(scale),
                                                    dq, dk, dv, dcond_k, dcond_v)
    return dq, dk, dv, (dcond_k if has_cond else None), (dcond_v if has_cond else None)


def kernels(backend: str) -> tuple[Callable, Callable]:
    """The (forward, backward) kernel pair of a fused backend ("cpu" or "triton")."""
    if backend == "cpu":
        return lca_forward_cpu, lca_backward_cpu
    if backend == "triton":
        from ..kernels.local_attention import lca_backward, lca_forward

        return lca_forward, lca_backward
    raise ValueError(f"{OP}: no fused kernels for backend {backend!r}; choose 'cpu' or 'triton'")


class LocalConditionalAttentionFunction(torch.autograd.Function):
    """Autograd over a backend's kernel pair (see :func:`kernels`); the kernels store lse for the backward."""

    @staticmethod
    def forward(ctx, backend: str, q, k, v, cond_k, cond_v, cond_mask, kernel_size, scale):
        forward_fn, _ = kernels(backend)
        out, lse = forward_fn(q, k, v, cond_k, cond_v, cond_mask, kernel_size, scale)
        ctx.save_for_backward(q, k, v, cond_k, cond_v, cond_mask, out, lse)
        ctx.backend, ctx.kernel_size, ctx.scale = backend, kernel_size, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        _, backward_fn = kernels(ctx.backend)
        q, k, v, cond_k, cond_v, cond_mask, out, lse = ctx.saved_tensors
        dq, dk, dv, dck, dcv = backward_fn(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse,
                                           ctx.kernel_size, ctx.scale)
        return None, dq, dk, dv, dck, dcv, None, None, None


# torch.library ops: what torch.compile sees. Optional conditioners stay Optional; the backward returns
# empty [B, 0, heads, D] conditioner gradients when there are none (an op's outputs cannot be None).

@torch.library.custom_op("fastcomp::lca_forward", mutates_args=())
def _lca_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cond_k: Optional[torch.Tensor],
                    cond_v: Optional[torch.Tensor], cond_mask: Optional[torch.Tensor], kh: int, kw: int,
                    scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = kernels(backend)[0](q, k, v, cond_k, cond_v, cond_mask, (kh, kw), scale)
    return out.contiguous(), lse.contiguous()


def _lse_dtype(q: torch.Tensor, backend: str) -> torch.dtype:
    return q.dtype if backend == "cpu" else torch.float32


@_lca_forward_op.register_fake
def _(q, k, v, cond_k, cond_v, cond_mask, kh, kw, scale, backend):
    B, H, W, heads, D = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(B, heads, H, W, dtype=_lse_dtype(q, backend))


@torch.library.custom_op("fastcomp::lca_backward", mutates_args=())
def _lca_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cond_k: Optional[torch.Tensor], cond_v: Optional[torch.Tensor],
                     cond_mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, kh: int, kw: int,
                     scale: float, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = kernels(backend)[1](grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, (kh, kw), scale)
    dq, dk, dv, dck, dcv = (None if g is None else g.contiguous() for g in grads)
    if dck is None:
        dck, dcv = _empty_cond(q), _empty_cond(q)
    return dq, dk, dv, dck, dcv


@_lca_backward_op.register_fake
def _(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, kh, kw, scale, backend):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    cond = _empty_cond(q) if cond_k is None else cond_k
    return like(q), like(q), like(q), like(cond), like(cond)


def _setup_context(ctx, inputs, output):
    q, k, v, cond_k, cond_v, cond_mask, kh, kw, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cond_k, cond_v, cond_mask, out, lse)
    ctx.kh, ctx.kw, ctx.scale, ctx.backend = kh, kw, scale, backend
    ctx.has_cond = cond_k is not None


def _backward_op(ctx, grad_out, grad_lse):
    q, k, v, cond_k, cond_v, cond_mask, out, lse = ctx.saved_tensors
    dq, dk, dv, dck, dcv = _lca_backward_op(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse,
                                            ctx.kh, ctx.kw, ctx.scale, ctx.backend)
    if not ctx.has_cond:
        dck = dcv = None
    return dq, dk, dv, dck, dcv, None, None, None, None, None


_lca_forward_op.register_autograd(_backward_op, setup_context=_setup_context)


def _fused(backend, q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale):
    if torch.compiler.is_compiling():
        out, _ = _lca_forward_op(q, k, v, cond_k, cond_v, cond_mask, kernel_size[0], kernel_size[1], scale,
                                 backend)
        return out
    return LocalConditionalAttentionFunction.apply(backend, q, k, v, cond_k, cond_v, cond_mask,
                                                   tuple(kernel_size), scale)


def _triton_head_dim_problem(q):
    D = q.shape[-1]
    if not TRITON_HEAD_DIMS[0] <= D <= TRITON_HEAD_DIMS[1]:
        return (f"head dim D = {D} is outside the {TRITON_HEAD_DIMS[0]}..{TRITON_HEAD_DIMS[1]} the Triton kernels "
                f"support; use the cpu backend, or pad D with zeros (it does not change the result)")
    return None


@_b.register(OP, "cpu", priority=10, machine_check=_b.cpp_problem,
             input_check=lambda q, *rest: (_b.device_input_problem("cpu", q, *rest)
                                           or _b.dtype_input_problem(CPU_DTYPES, q)),
             description="C++ extension, OpenMP over (b, head, rows), vectorized over queries; O(H*W) memory")
def _attention_cpu(q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale):
    return _fused("cpu", q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale)


@_b.register(OP, "triton", priority=15, machine_check=_b.triton_problem,
             input_check=lambda q, *rest: (_b.triton_input_problem(q, *rest)
                                           or _b.dtype_input_problem(TRITON_DTYPES, q)
                                           or _triton_head_dim_problem(q)),
             description="Triton kernels, fused online softmax over window + conditioners")
def _attention_triton(q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale):
    return _fused("triton", q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale)


# --- disk masks -----------------------------------------------------------------------------------

DISK = "disk_mask"


def disk_mask(points: torch.Tensor, radius: float, H: int, W: int, *, backend: Optional[str] = None
              ) -> torch.Tensor:
    """[B, M, H, W] bool: pixel (i, j) is inside disk m when (i - row)^2 + (j - col)^2 <= radius^2.

    points: [B, M, 2] (row, col) in pixels, any real dtype; evaluated in float64 so every backend
    agrees exactly on the boundary. radius: >= 0.
    """
    check.tensor(DISK, "points", points, ndim=3, layout="[B, M, 2]")
    if points.shape[2] != 2:
        raise ValueError(f"{DISK}: points must have shape [B, M, 2] holding (row, col), "
                         f"got {check.fmt_shape(points.shape)}")
    if points.is_complex() or points.dtype == torch.bool:
        raise TypeError(f"{DISK}: points must be real numbers, got {check.dtype_name(points.dtype)}")
    if not check.is_real(radius):
        raise TypeError(f"{DISK}: radius must be a number, got {type(radius).__name__}")
    if not radius >= 0:  # also refuses NaN
        raise ValueError(f"{DISK}: radius must be >= 0, got {radius} (inf: every pixel is inside)")
    radius = float(radius)
    if radius > _HUGE_RADIUS:  # radius ** 2 overflows float64: it is inf on every backend, so say so once
        radius = math.inf
    H = check.positive_int(DISK, "H", H)
    W = check.positive_int(DISK, "W", W)
    return _b.dispatch(DISK, backend, (points,), (points, radius, H, W))


# Above this radius ** 2 is inf in float64 (and Python's float ** 2 raises OverflowError).
_HUGE_RADIUS = math.sqrt(sys.float_info.max)


@_b.register(DISK, "reference", priority=0, description="broadcast comparison in float64")
def _disk_mask_reference(points, radius, H, W):
    return disk_mask_reference(points, radius, H, W)


@_b.register(DISK, "triton", priority=15, machine_check=_b.triton_problem,
             input_check=lambda points: _b.triton_input_problem(points),
             description="Triton kernel, one program per (b, m, row)")
def _disk_mask_triton(points, radius, H, W):
    from ..kernels.disk_mask import disk_mask_triton

    return disk_mask_triton(points, radius, H, W)


# C++/CUDA disk masks (csrc/cpu_ops.cpp, csrc/disk_mask.cu): the output is allocated here and written by
# the extension, compiled on first use by fastcomp._build.

def _disk_mask_extension_args(points, H, W):
    """(float64 contiguous points, the [B, M, H, W] bool output for the kernel to write)."""
    points = points.to(torch.float64).contiguous()
    return points, torch.empty(points.shape[0], points.shape[1], H, W, dtype=torch.bool, device=points.device)


@_b.register(DISK, "cpu", priority=10, machine_check=_b.cpp_problem,
             input_check=lambda points: _b.device_input_problem("cpu", points),
             description="C++ extension, OpenMP over (b, m, row), vectorized over columns")
def _disk_mask_cpu(points, radius, H, W):
    from .. import _build

    points, out = _disk_mask_extension_args(points, H, W)
    _build.load("cpu").disk_mask_cpu(points, radius, out)
    return out


@_b.register(DISK, "cuda", priority=20, machine_check=_b.cuda_problem,
             input_check=lambda points: _b.device_input_problem("cuda", points),
             description="CUDA extension, one thread per pixel, rows across the grid")
def _disk_mask_cuda(points, radius, H, W):
    from .. import _build

    points, out = _disk_mask_extension_args(points, H, W)
    _build.load("cuda").disk_mask_cuda(points, radius, out, torch.cuda.current_stream(points.device).cuda_stream)
    return out
