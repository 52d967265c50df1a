"""Public local conditional attention and disk masks: input checks, then dispatch to a backend."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import backends as _b
from ..reference.attention import disk_mask_reference, local_conditional_attention_reference
from . import _checks as check

OP = "local_conditional_attention"


def _kernel_size(kernel_size, H: int, W: int) -> tuple[int, int]:
    if isinstance(kernel_size, bool):
        raise TypeError(f"{OP}: kernel_size must be an odd int or a pair (kh, kw), got {kernel_size!r}")
    if isinstance(kernel_size, int):
        kh = kw = kernel_size
    elif (isinstance(kernel_size, (tuple, list)) and len(kernel_size) == 2
          and all(isinstance(s, int) and not isinstance(s, bool) for s in kernel_size)):
        kh, kw = kernel_size
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
    scale: softmax scale, default D ** -0.5. backend: None (best available) or a name from
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
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"{OP}: scale must be a float or None, got {type(scale).__name__}")
        scale = float(scale)

    if B == 0:  # nothing to attend; the result is empty but shaped and still differentiable
        return q * 0.0
    return _b.dispatch(OP, backend, (q, k, v, cond_k, cond_v, cond_mask),
                       (q, k, v, (kh, kw), cond_k, cond_v, cond_mask, scale))


@_b.register(OP, "reference", priority=0,
             description="dense masked scaled_dot_product_attention, O((H*W)^2) memory")
def _attention_reference(q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale):
    return local_conditional_attention_reference(q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale)


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
    if isinstance(radius, bool) or not isinstance(radius, (int, float)):
        raise TypeError(f"{DISK}: radius must be a number, got {type(radius).__name__}")
    if not radius >= 0:  # also refuses NaN
        raise ValueError(f"{DISK}: radius must be >= 0, got {radius}")
    check.positive_int(DISK, "H", H)
    check.positive_int(DISK, "W", W)
    return _b.dispatch(DISK, backend, (points,), (points, float(radius), H, W))


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
