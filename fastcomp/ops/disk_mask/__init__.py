"""disk_mask: the public function (input checks, then one dispatch) and its backends' registration.

The op's files: reference.py (the spec), library.py (the custom op every fast backend runs as), cpu.py,
cuda.py and triton.py (the launchers of csrc/disk_mask/ and kernels/disk_mask.py).
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch

from ... import backends as _b
from .. import _checks as check
from . import cpu, cuda, triton
from .library import DISK, disk_mask_op
from .reference import disk_mask_reference

# Above this radius ** 2 is inf in float64 (and Python's float ** 2 raises OverflowError).
_HUGE_RADIUS = math.sqrt(sys.float_info.max)


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


@_b.register(DISK, "reference", priority=0, description="broadcast comparison in float64")
def _disk_mask_reference(points, radius, H, W):
    return disk_mask_reference(points, radius, H, W)


_b.register(DISK, "triton", priority=15, machine_check=_b.triton_problem,
            input_check=lambda points: _b.triton_input_problem(points),
            description="Triton kernel, one program per (b, m, row)")(disk_mask_op("triton", triton.compute))
_b.register(DISK, "cpu", priority=10, machine_check=_b.cpp_problem("disk_mask"), prepare=_b.cpp_prepare("disk_mask"),
            input_check=lambda points: _b.device_input_problem("cpu", points),
            description="C++ extension, OpenMP over (b, m, row), vectorized over columns")(
    disk_mask_op("cpu", cpu.compute))
_b.register(DISK, "cuda", priority=20, machine_check=_b.cuda_problem,
            input_check=lambda points: _b.device_input_problem("cuda", points),
            description="CUDA extension, one thread per pixel, rows across the grid")(
    disk_mask_op("cuda", cuda.compute))
