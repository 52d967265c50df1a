"""The DDN triton backend: launchers of kernels/ddn.py (imported on first use: TRITON_INTERPRET is read then).
The backward is the PyTorch chosen candidate's (library.py)."""

from __future__ import annotations


def select(features, weight, target, bias, residual, metric):
    from ...kernels.ddn import ddn_distances_triton, ddn_gather_forward_triton

    dist = ddn_distances_triton(features, weight, target, bias, residual, metric)
    index = dist.argmin(dim=1)  # first minimum: ties -> smallest k
    return index, dist, ddn_gather_forward_triton(features, weight, index, bias, residual)


def gather(features, weight, index, bias, residual):
    from ...kernels.ddn import ddn_gather_forward_triton

    return ddn_gather_forward_triton(features, weight, index, bias, residual)
