"""probe_demux: the fused reduction of structured probe results to the per-offset |J| profile.

Registered as a fastcomp op ("probe_demux") so `fastcomp info` lists its backends and tests can pick one:
reference (plain PyTorch, fastcomp.reference.probe.probe_demux_reference), cpu (csrc/probe_demux/) and
triton (kernels/probe_demux.py). Every backend writes float64 outputs allocated with torch.empty (_outputs).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ... import backends as _b
from ...reference.probe import probe_demux_reference

OP = "probe_demux"


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
    fastcomp.reference.probe.probe_demux_reference for the exact semantics.
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


def _outputs(g: torch.Tensor, radius: int):
    """sums, counts [N, (2R+1)^2] and outside [N], float64, for a kernel to write."""
    N, s = g.shape[0], 2 * radius + 1
    return (torch.empty(N, s * s, dtype=torch.float64, device=g.device),
            torch.empty(N, s * s, dtype=torch.float64, device=g.device),
            torch.empty(N, dtype=torch.float64, device=g.device))


@_b.register(OP, "reference", priority=0, description="plain PyTorch: |g| summed over (b, k), scatter_add per slot")
def _demux_reference(g, origins, stride, radius, transpose):
    out = _outputs(g, radius)
    probe_demux_reference(g, origins, stride, radius, transpose, *out)
    return out


# The fused backends are torch.library custom ops fastcomp::probe_demux_<backend> with fake implementations
# (torch.compile sees one opaque node; no extension load is traced).
_SCHEMA = "(Tensor g, Tensor origins, int stride, int radius, bool transpose) -> (Tensor, Tensor, Tensor)"


def _demux_op(backend: str, launch):
    """The custom op over launch(g, origins, stride, radius, transpose, sums, counts, outside)."""
    def compute(g, origins, stride, radius, transpose):
        out = _outputs(g, radius)
        launch(g, origins, stride, radius, transpose, *out)
        return out

    op = torch.library.custom_op(f"fastcomp::probe_demux_{backend}", compute, mutates_args=(), schema=_SCHEMA)
    op.register_fake(lambda g, origins, stride, radius, transpose: _outputs(g, radius))
    return op


def _launch_triton(*args):
    from ...kernels.probe_demux import probe_demux_triton

    probe_demux_triton(*args)


def _launch_cpu(*args):
    from ... import _build

    _build.load("probe_demux").probe_demux_cpu(*args)


_b.register(OP, "triton", priority=15, machine_check=_b.triton_problem,
            input_check=lambda g: _b.triton_input_problem(g),
            description="Triton kernel, one program per probe, one-hot slot reductions (no atomics)")(
    _demux_op("triton", _launch_triton))
_b.register(OP, "cpu", priority=10, machine_check=_b.cpp_problem("probe_demux"), prepare=_b.cpp_prepare("probe_demux"),
            input_check=lambda g: _b.device_input_problem("cpu", g),
            description="C++ extension, OpenMP over probes, vectorized |g| row sums")(_demux_op("cpu", _launch_cpu))
