"""The input domain of each op's Triton kernels, defined once and importable without importing triton:
the kernels' launchers assert it, and the ops' triton backends read it for their input checks (so that
backend=None never picks a kernel that would refuse the call)."""

from __future__ import annotations

import torch

# kernels/attention.py: fp32/fp16/bf16 (float64 has no tensor-core dot; the cpu backend takes it), and the
# head dim padded to a power of two up to 128 (register budget of the fused backward).
ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATTENTION_HEAD_DIMS = (16, 128)
