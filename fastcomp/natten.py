"""NATTEN 0.21's functional 2-D neighborhood attention on fastcomp's kernel: code that calls
``natten.na2d`` switches by changing the import (``from fastcomp.natten import na2d``).

NATTEN is not needed to use this module; its tests compare against it where it is installed.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .ops.attention import local_conditional_attention

PerAxis = Union[int, tuple[int, int]]

_NAME = "fastcomp.natten.na2d"


def _pair(name: str, value) -> tuple:
    if isinstance(value, (bool, int)):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return tuple(value)
    raise TypeError(f"{_NAME}: {name} must be an int (bool for is_causal) or a pair, got {value!r}")


def _repeat_kv_heads(t: torch.Tensor, heads: int, name: str) -> torch.Tensor:
    """NATTEN's GQA/MQA: query head h reads key/value head h // (heads // heads_kv)."""
    heads_kv = t.shape[-2]
    if heads_kv == heads:
        return t
    if heads_kv < 1 or heads % heads_kv:
        raise ValueError(f"{_NAME}: {name} has {heads_kv} heads, which must divide the query's {heads} heads "
                         f"(grouped-query attention), got shape {list(t.shape)}")
    return t.repeat_interleave(heads // heads_kv, dim=-2)


def na2d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: PerAxis,
    *,
    stride: PerAxis = 1,
    dilation: PerAxis = 1,
    is_causal: Union[bool, tuple[bool, bool]] = False,
    scale: Optional[float] = None,
    additional_keys: Optional[torch.Tensor] = None,
    additional_values: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """2-D neighborhood attention with NATTEN's semantics, on ``fastcomp.local_conditional_attention``.

    query: [B, X, Y, heads, D]; key, value: [B, X, Y, heads_kv, D] (heads_kv divides heads, as NATTEN's
    GQA); kernel_size: odd int or (kx, ky), at most the feature map's sides; every query attends the
    kernel window NATTEN uses (centred, shifted inwards at the borders).
    additional_keys / additional_values: [B, M, heads_kv, D] extra tokens every query attends too, in the
    same softmax (NATTEN's neighborhood cross-attention); both or neither.
    scale: default D ** -0.5 (as NATTEN, 0 or None means the default). backend: a fastcomp backend name
    (None: the fastest that can run), not a NATTEN one. Returns [B, X, Y, heads, D].

    stride > 1, dilation > 1, causal windows and even kernel sizes raise NotImplementedError naming the
    option: use natten.na2d for them.
    """
    if _pair("stride", stride) != (1, 1):
        raise NotImplementedError(f"{_NAME}: stride={stride!r} is not supported (only stride=1); use natten.na2d")
    if _pair("dilation", dilation) != (1, 1):
        raise NotImplementedError(f"{_NAME}: dilation={dilation!r} is not supported (only dilation=1); "
                                  f"use natten.na2d for dilated windows")
    if tuple(bool(c) for c in _pair("is_causal", is_causal)) != (False, False):
        raise NotImplementedError(f"{_NAME}: is_causal={is_causal!r} is not supported (only False); use "
                                  f"natten.na2d for causal windows")
    kernel = _pair("kernel_size", kernel_size)
    if any(isinstance(k, int) and not isinstance(k, bool) and k % 2 == 0 for k in kernel):
        raise NotImplementedError(f"{_NAME}: kernel_size={kernel_size!r} has an even side; fastcomp's windows "
                                  f"are odd (centred on the query); use natten.na2d for even windows")
    if (additional_keys is None) != (additional_values is None):
        raise ValueError(f"{_NAME}: pass additional_keys and additional_values together, or neither")
    if query.dim() == 5:
        heads = query.shape[-2]
        key, value = _repeat_kv_heads(key, heads, "key"), _repeat_kv_heads(value, heads, "value")
        if additional_keys is not None:
            additional_keys = _repeat_kv_heads(additional_keys, heads, "additional_keys")
            additional_values = _repeat_kv_heads(additional_values, heads, "additional_values")
    # otherwise the op's own checks name the layout it expects
    return local_conditional_attention(query, key, value, kernel, cond_k=additional_keys,
                                       cond_v=additional_values, scale=scale or None, backend=backend)


__all__ = ["na2d"]
