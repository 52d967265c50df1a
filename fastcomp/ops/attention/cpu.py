"""The attention's cpu backend: launchers of the C++ kernels (csrc/attention/), the contract of library.py.

Python allocates every output, through ops/_outputs.py (blocks that stay mapped between calls, so a training
loop does not page-fault through its outputs every step); the kernels run float32 and float64
(float16/bfloat16 inputs in float32 inside) on contiguous tensors.
"""

from __future__ import annotations

import torch

from .. import _outputs
from .library import empty_cond

# Input dtypes of the cpu backend (half precision: float32 inside).
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The C++ kernels run float32 and float64; float16 and bfloat16 inputs run in float32 inside."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(work, *tensors):
    return [None if t is None else t.to(work).contiguous() for t in tensors]


def _cond(q, cond_k, cond_v, cond_mask):
    """The C++ kernels' conditioner arguments: [B, 0, heads, D] tensors for none, an empty mask for all."""
    cond_k = empty_cond(q) if cond_k is None else cond_k
    cond_v = empty_cond(q) if cond_v is None else cond_v
    mask = torch.empty(0, dtype=torch.bool) if cond_mask is None else cond_mask.contiguous()
    return cond_k, cond_v, mask


def forward(q, k, v, cond_k, cond_v, cond_mask, kernel_size, scale):
    """C++ forward: (out [B, H, W, heads, D] in q.dtype, lse [B, heads, H, W] in the compute dtype)."""
    from ... import _build

    B, H, W, heads, D = q.shape
    work = compute_dtype(q.dtype)
    qw, kw_, vw, ckw, cvw = _inputs(work, q, k, v, cond_k, cond_v)
    ckw, cvw, mask = _cond(qw, ckw, cvw, cond_mask)
    ext = _build.load("attention")
    out = _outputs.cpu_empty(ext, q.shape, work)
    lse = _outputs.cpu_empty(ext, (B, heads, H, W), work)
    ext.local_attention_forward_cpu(qw, kw_, vw, ckw, cvw, mask, kernel_size[0], kernel_size[1], float(scale),
                                    out, lse)
    return out.to(q.dtype), lse


def backward(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, kernel_size, scale):
    """C++ backward: (dq, dk, dv, dcond_k, dcond_v) in q.dtype, the last two None when cond_k is None."""
    from ... import _build

    has_cond = cond_k is not None
    work = compute_dtype(q.dtype)
    go, qw, kw_, vw, ow, ckw, cvw = _inputs(work, grad_out, q, k, v, out, cond_k, cond_v)
    ckw, cvw, mask = _cond(qw, ckw, cvw, cond_mask)
    ext = _build.load("attention")
    dq, dk, dv = (_outputs.cpu_empty(ext, q.shape, work) for _ in range(3))
    dcond_k, dcond_v = _outputs.cpu_empty(ext, ckw.shape, work), _outputs.cpu_empty(ext, ckw.shape, work)
    ext.local_attention_backward_cpu(go, qw, kw_, vw, ckw, cvw, mask, ow, lse.contiguous(), kernel_size[0],
                                     kernel_size[1], float(scale), dq, dk, dv, dcond_k, dcond_v)
    grads = (dq, dk, dv) + ((dcond_k, dcond_v) if has_cond else (None, None))
    return tuple(None if g is None else g.to(q.dtype) for g in grads)


def jvp(q, k, v, cond_k, cond_v, cond_mask, out, lse, dq, dk, dv, dcond_k, dcond_v, kernel_size, scale):
    """C++ forward-mode derivative: the tangent of out [B, H, W, heads, D] in q.dtype."""
    from ... import _build

    work = compute_dtype(q.dtype)
    qw, kw_, vw, ow, ckw, cvw = _inputs(work, q, k, v, out, cond_k, cond_v)
    ckw, cvw, mask = _cond(qw, ckw, cvw, cond_mask)
    zero = torch.empty(0, dtype=work)  # an absent tangent
    tangents = [zero if t is None else t for t in _inputs(work, dq, dk, dv, dcond_k, dcond_v)]
    ext = _build.load("attention")
    dout = _outputs.cpu_empty(ext, q.shape, work)
    ext.local_attention_jvp_cpu(qw, kw_, vw, ckw, cvw, mask, ow, lse.contiguous(), *tangents, kernel_size[0],
                                kernel_size[1], float(scale), dout)
    return dout.to(q.dtype)
