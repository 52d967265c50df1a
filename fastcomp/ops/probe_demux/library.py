"""probe_demux's fused backends as torch.library custom ops fastcomp::probe_demux_<backend> with fake
implementations: torch.compile sees one opaque node, no extension load is traced."""

from __future__ import annotations

import torch

OP = "probe_demux"
_SCHEMA = "(Tensor g, Tensor origins, int stride, int radius, bool transpose) -> (Tensor, Tensor, Tensor)"


def outputs(g: torch.Tensor, radius: int):
    """sums, counts [N, (2R+1)^2] and outside [N], float64, for a kernel to write."""
    N, s = g.shape[0], 2 * radius + 1
    return (torch.empty(N, s * s, dtype=torch.float64, device=g.device),
            torch.empty(N, s * s, dtype=torch.float64, device=g.device),
            torch.empty(N, dtype=torch.float64, device=g.device))


def demux_op(backend: str, launch):
    """The custom op over launch(g, origins, stride, radius, transpose, sums, counts, outside)."""
    def compute(g, origins, stride, radius, transpose):
        out = outputs(g, radius)
        launch(g, origins, stride, radius, transpose, *out)
        return out

    op = torch.library.custom_op(f"fastcomp::probe_demux_{backend}", compute, mutates_args=(), schema=_SCHEMA)
    op.register_fake(lambda g, origins, stride, radius, transpose: outputs(g, radius))
    return op
