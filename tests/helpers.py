"""Comparison helpers: every fast path is checked against the float64 reference through these."""

from __future__ import annotations

import numpy as np
import torch

# --- comparison with a float64 reference -----------------------------------------------------------

# RMS(ref - out) / RMS(ref) allowed per dtype of the tested output.
RMS_RATIO = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 4e-2,
}


def rms_error_ratio(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    denom = ref64.square().mean().sqrt().item()
    num = (ref64 - out64).square().mean().sqrt().item()
    if denom == 0.0:
        return num  # reference is all zeros: compare absolutely
    return num / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, *, ratio: float | None = None, name: str = "output",
                 dtype: torch.dtype | None = None) -> None:
    """Assert RMS(ref - out) / RMS(ref) < ratio, ref in float64; the message reports the worst element."""
    assert out.shape == ref.shape, f"{name}: shape {list(out.shape)} != reference {list(ref.shape)}"
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if out64.numel() == 0:
        return
    bad = ~torch.isfinite(out64) & torch.isfinite(ref64)
    if bool(bad.any()):
        where = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite element(s) where the reference is finite "
                             f"(unwritten output?), first at {where}: {out64[where].item()}")
    limit = RMS_RATIO[dtype or out.dtype] if ratio is None else ratio
    err = rms_error_ratio(out64, ref64)
    if not err < limit:
        diff = (out64 - ref64).abs()
        where = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), diff.shape))
        raise AssertionError(f"{name}: RMS error ratio {err:.3e} >= {limit:.1e}; worst element at {where}: "
                             f"got {out64[where].item():.8g}, reference {ref64[where].item():.8g}")


def assert_low_precision_close(out: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor, *,
                               name: str = "output", factor: float = 2.0) -> None:
    """Low precision passes when its error vs the float64 reference is at most ~factor x that of plain
    PyTorch computing the same thing in the same dtype (flash-attention's rule)."""
    ours = rms_error_ratio(out, ref64)
    theirs = rms_error_ratio(torch_same_dtype, ref64)
    assert ours <= factor * theirs + 1e-6, (f"{name}: error {ours:.3e} vs float64 exceeds {factor}x plain "
                                           f"PyTorch's {theirs:.3e} in {out.dtype}")
