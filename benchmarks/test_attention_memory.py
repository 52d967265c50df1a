"""Local conditional attention's fused backends keep O(H*W) memory: peak extra memory of forward+backward
grows ~4x from 32x32 to 64x64 (a dense (H*W)^2 kernel: ~16x). Also printed by `fastcomp bench`.

    python -m pytest benchmarks/test_attention_memory.py -q -s
"""

from __future__ import annotations

import pytest
import torch

from fastcomp import backends as _b
from fastcomp.bench import attention_extras


def test_cpu_backend_memory_grows_linearly_in_pixels():
    reason = {b.name: b for b in _b.backends("local_conditional_attention")}["cpu"].machine_reason
    if reason is not None:
        pytest.skip(f"cpu backend unavailable: {reason}")
    mem = attention_extras.memory_scaling(torch.device("cpu"))
    if "ratio" not in mem:
        pytest.skip(mem.get("note", "peak memory not measurable"))
    print(mem)
    assert mem["ratio"] < 6.0, f"peak memory grew x{mem['ratio']} for 4x the pixels: not O(H*W) ({mem})"
