"""probe_demux: the fused reduction of structured probe results to the per-offset |J| profile.

Registered as a fastcomp op ("probe_demux") so `fastcomp info` lists its backends and tests can pick one:
reference (reference.py, plain PyTorch), cpu (cpu.py: csrc/probe_demux/) and triton (triton.py:
kernels/probe_demux.py), each fused backend a custom op (library.py). Every backend writes float64 outputs
allocated with torch.empty (library.outputs).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ... import backends as _b
from . import cpu, triton
from .library import OP, demux_op, outputs
from .reference import probe_demux_reference


class Demuxed(NamedTuple):
    """Per-offset sums over all probes: sums and counts [2R+1, 2R+1] float64, outside a 0-d float64."""

    sums: torch.Tensor
    counts: torch.Tensor
    outside: torch.Tensor


def probe_demux(g: torch.Tensor, origins: torch.Tensor, *, stride: int, radius: int, transpose: bool = False,
                backend: Optional[str] = None) -> Demuxed:
    """Reduce N probe results g [N, B, K, H, W] to per-offset |J| sums, counts and the outside mass.

    origins: [N, 2] int64 (row, col) of each probe's first pixel, each in [0, min(stride, H or W)); probe n
    covers origins[n] + (k * stride, l * stride). transpose=False: g are vector-Jacobian products of
    output-pixel probes; True: Jacobian-vector products of input-pixel probes. See
    fastcomp.ops.probe_demux.reference.probe_demux_reference for the exact semantics.
    """
    if g.dim() != 5:
        raise ValueError(f"{OP}: g must be [N, B, K, H, W], got shape {list(g.shape)}")
    if g.dtype not in (torch.float32, torch.float64):
        g = g.to(torch.float32)  # half-precision probes: the sums are float64 anyway
    N = g.shape[0]
    s = 2 * radius + 1
    if stride < s:
        raise ValueError(f"{OP}: stride must be >= 2 * radius + 1 = {s}, got {stride}")
    origins = origins.to(device=g.device, dtype=torch.int64).contiguous()
    if N == 0:
        zeros = torch.zeros(s, s, dtype=torch.float64, device=g.device)
        return Demuxed(zeros, zeros.clone(), zeros.new_zeros(()))
    sums, counts, outside = _b.dispatch(OP, backend, (g,), (g.contiguous(), origins, int(stride), int(radius),
                                                            bool(transpose)))
    return Demuxed(sums.sum(0).view(s, s), counts.sum(0).view(s, s), outside.sum())


@_b.register(OP, "reference", priority=0, description="plain PyTorch: |g| summed over (b, k), scatter_add per slot")
def _demux_reference(g, origins, stride, radius, transpose):
    out = outputs(g, radius)
    probe_demux_reference(g, origins, stride, radius, transpose, *out)
    return out


_b.register(OP, "triton", priority=15, machine_check=_b.triton_problem,
            input_check=lambda g: _b.triton_input_problem(g),
            description="Triton kernel, one program per probe, one-hot slot reductions (no atomics)")(
    demux_op("triton", triton.launch))
_b.register(OP, "cpu", priority=10, machine_check=_b.cpp_problem("probe_demux"), prepare=_b.cpp_prepare("probe_demux"),
            input_check=lambda g: _b.device_input_problem("cpu", g),
            description="C++ extension, OpenMP over probes, vectorized |g| row sums")(demux_op("cpu", cpu.launch))
