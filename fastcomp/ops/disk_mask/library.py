"""disk_mask's fast backends as torch.library custom ops fastcomp::disk_mask_<backend>, with a fake
implementation and a vmap rule folding the vmapped dim into B, so torch.compile sees one opaque node: no
extension load or host-side check inside the traced region. The C++/CUDA kernels write an output allocated
here (extension_args)."""

from __future__ import annotations

import torch

from .. import _library

DISK = "disk_mask"
_SCHEMA = "(Tensor points, float radius, SymInt H, SymInt W) -> Tensor"


def disk_mask_op(backend: str, compute):
    """The custom op over compute(points, radius, H, W) -> [B, M, H, W] bool."""
    op = torch.library.custom_op(f"fastcomp::disk_mask_{backend}", compute, mutates_args=(), schema=_SCHEMA)

    @op.register_fake
    def _(points, radius, H, W):
        return points.new_empty(points.shape[0], points.shape[1], H, W, dtype=torch.bool)

    @op.register_vmap
    def _(info, in_dims, points, radius, H, W):
        (points,) = _library.fold_batch(info, in_dims[:1], (points,), (True,))
        return _library.unfold_batch(op(points, radius, H, W), info.batch_size), 0

    return op


def extension_args(points, H, W):
    """(float64 contiguous points, the [B, M, H, W] bool output for a C++/CUDA kernel to write)."""
    points = points.to(torch.float64).contiguous()
    return points, torch.empty(points.shape[0], points.shape[1], H, W, dtype=torch.bool, device=points.device)
