"""The attention's triton backend: launchers of the Triton kernels (kernels/attention.py), the contract of
library.py. The kernels' module is imported on first use: TRITON_INTERPRET is read when it is imported."""

from __future__ import annotations

import torch

# The kernels' limits, defined once in kernels/limits.py (importing it does not import triton).
from ...kernels.limits import ATTENTION_DTYPES as DTYPES  # noqa: F401  (the backend's input check reads it)
from ...kernels.limits import ATTENTION_HEAD_DIMS as HEAD_DIMS


def forward(*args):
    from ...kernels.attention import lca_forward

    return lca_forward(*args)


def backward(*args):
    from ...kernels.attention import lca_backward

    return lca_backward(*args)


def jvp(*args):
    from ...kernels.attention import lca_jvp

    return lca_jvp(*args)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32  # log2-domain lse, float32 whatever the input dtype


def head_dim_problem(q):
    D = q.shape[-1]
    if not HEAD_DIMS[0] <= D <= HEAD_DIMS[1]:
        return (f"head dim D = {D} is outside the {HEAD_DIMS[0]}..{HEAD_DIMS[1]} the Triton kernels "
                f"support; use the cpu backend, or pad D with zeros (it does not change the result)")
    return None
