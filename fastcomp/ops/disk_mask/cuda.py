"""disk_mask's cuda backend: the CUDA kernel of csrc/disk_mask/disk_mask.cu (bound in csrc/cuda_ops.cpp)."""

from __future__ import annotations

import torch

from .library import extension_args


def compute(points, radius, H, W):
    from ... import _build

    points, out = extension_args(points, H, W)
    _build.load("cuda").disk_mask_cuda(points, radius, out, torch.cuda.current_stream(points.device).cuda_stream)
    return out
