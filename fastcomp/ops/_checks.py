"""Input validation shared by the public ops.

Every error names the op and the argument, and states what was expected and what was given, so a user
can fix the call without reading the source. Shapes are printed as lists: ``[2, 13, 17, 4, 32]``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor(op: str, name: str, t, *, ndim: int, layout: str) -> torch.Tensor:
    """``t`` must be a tensor with ``ndim`` dimensions; ``layout`` (e.g. "[B, H, W, heads, D]") is quoted."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have shape {layout} ({ndim} dims), got {fmt_shape(t.shape)}")
    return t


def floating(op: str, name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must have a floating dtype ({allowed}), got {dtype_name(t.dtype)}")


def same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {dtype_name(t.dtype)} but {ref_name} has "
                            f"{dtype_name(ref.dtype)}; cast them to one dtype (e.g. {name}.to({ref_name}.dtype))")


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                             f"move them to one device")


def shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], layout: str, why: str = "") -> None:
    """``t.shape`` must equal ``expected``; ``layout`` names the dims, ``why`` says where they come from."""
    if tuple(t.shape) != tuple(expected):
        hint = f" ({why})" if why else ""
        raise ValueError(f"{op}: {name} must have shape {layout} = {fmt_shape(expected)}{hint}, "
                         f"got {fmt_shape(t.shape)}")


def is_int(value) -> bool:
    """A Python or numpy integer (np.int64 from array arithmetic is as good as an int); bool is not."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A Python or numpy real number (int, float, np.float32, ...); bool is not."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def positive_int(op: str, name: str, value, *, minimum: int = 1) -> int:
    """``value`` as a Python int (numpy integers accepted), at least ``minimum``."""
    if not is_int(value):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return int(value)


def positive_finite(op: str, name: str, value, why: str) -> float:
    """``value`` as a Python float; it must be a real number, finite and > 0 (``why`` says what it is)."""
    if not is_real(value):
        raise TypeError(f"{op}: {name} must be a number ({why}), got {type(value).__name__} ({value!r})")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: {name} must be finite and > 0 ({why}), got {value}")
    return value
