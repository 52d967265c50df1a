"""What every Triton launch of fastcomp.kernels shares: the device it runs on, the int32 offset limits and
the float32 dot precision. One place, so that no kernel file can forget one of them.

- `launch(kernel, grid, device, *args, **meta)`: every launch goes through here (tests/test_triton_launch.py
  checks that no kernel file subscripts a kernel itself). Triton launches on the *current* CUDA device and
  its current stream; a cuda:1 tensor launched while cuda:0 is current would read memory of the wrong
  device. The launch therefore runs inside `torch.cuda.device(device)`, as torch's own ops do.
- `check_int32_extent`: the kernels add the batch (or sample) offset in int64 but every offset inside one
  batch item in int32, one product `index * stride` per axis; a tensor whose item spans 2**31 elements
  along an axis would wrap. Each launcher checks every tensor it indexes (outputs and incoming gradients
  included).
- `fp32_dot_precision`: the `input_precision` of a float32 tl.dot follows PyTorch's float32 matmul
  setting (`torch.backends.cuda.matmul.fp32_precision` / `allow_tf32` / `set_float32_matmul_precision`):
  "ieee" by default, "tf32" when the user allowed TF32 for matmuls, as cuBLAS would for the reference.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch

INT32_LIMIT = 2**31
GRID_YZ_LIMIT = 65535  # CUDA's cap on the size of grid axes 1 and 2


def device_context(device: torch.device):
    """The context a launch on `device` runs in: that CUDA device made current (a no-op elsewhere: CPU
    tensors under TRITON_INTERPRET=1, meta tensors in the ahead-of-time compile check)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, device: torch.device, *args, **meta):
    """kernel[grid](*args, **meta) with `device` current, so Triton uses its stream and its memory."""
    with device_context(device):
        return kernel[grid](*args, **meta)


def check_int32_extent(where: str, name: str, t: Optional[torch.Tensor], dims: Iterable[int],
                       sizes: Optional[dict] = None) -> None:
    """Raise unless size * |stride| < 2**31 along each of `dims` of `t` (None passes).

    sizes: {dim: size} overrides where a kernel indexes past the tensor's size (e.g. conditioners padded
    to a multiple of 32 in masked lanes)."""
    if t is None:
        return
    sizes = sizes or {}
    for d in dims:
        extent = sizes.get(d, t.shape[d]) * abs(t.stride(d))
        if extent >= INT32_LIMIT:
            raise ValueError(
                f"{where}: {name} {list(t.shape)} (strides {list(t.stride())}) spans {extent} elements along "
                f"dim {d} within one batch item; the Triton kernels index inside an item with int32 offsets "
                f"(< 2**31). Split the call into smaller pieces along that dim, or pass a contiguous tensor")


def check_int32_count(where: str, what: str, count: int, how: str) -> None:
    """Raise unless `count` (elements a kernel indexes with one int32 offset) is below 2**31."""
    if count >= INT32_LIMIT:
        raise ValueError(f"{where}: {what} holds {count} elements, but the Triton kernel indexes it with int32 "
                         f"offsets (< 2**31); {how}")


def fp32_dot_precision() -> str:
    """input_precision for float32 dots: "tf32" when PyTorch allows TF32 for float32 matmuls, else "ieee"."""
    matmul = torch.backends.cuda.matmul
    new_api = getattr(matmul, "fp32_precision", None)  # torch >= 2.9: "ieee", "tf32", or "none" (unset)
    if new_api in ("ieee", "tf32"):
        return new_api
    try:
        return "tf32" if matmul.allow_tf32 else "ieee"
    except RuntimeError:  # torch refuses to read the legacy flag after the new API was used with it
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
