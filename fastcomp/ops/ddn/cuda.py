"""The DDN cuda backend: launchers of csrc/ddn/ddn.cu (bound in csrc/ddn/ddn_cuda_ops.cpp): fused distances +
argmin kernels and the gather kernel. The backward is the PyTorch chosen candidate's (library.py): cuBLAS
already does its bmm well."""

from __future__ import annotations

import torch


def _args(features, weight, bias, residual):
    def c(t):
        return None if t is None else t.detach().contiguous()

    return c(features), c(weight), c(bias), c(residual)


def gather(features, weight, index, bias, residual):
    from ... import _build

    ext = _build.load("cuda")
    stream = torch.cuda.current_stream(features.device).cuda_stream
    f, w, b, r = _args(features, weight, bias, residual)
    out = torch.empty(f.shape[0], w.shape[1], f.shape[2], f.shape[3], dtype=f.dtype, device=f.device)
    ext.ddn_gather_cuda(f, w, index.contiguous(), b, r, out, stream)
    return out


def select(features, weight, target, bias, residual, metric):
    from ... import _build

    ext = _build.load("cuda")
    stream = torch.cuda.current_stream(features.device).cuda_stream
    f, w, b, r = _args(features, weight, bias, residual)
    acc = torch.float64 if f.dtype == torch.float64 else torch.float32
    dist = torch.empty(f.shape[0], w.shape[0], dtype=acc, device=f.device)
    index = torch.empty(f.shape[0], dtype=torch.int64, device=f.device)
    ext.ddn_select_cuda(f, w, target.contiguous(), b, r, metric == "l1", dist, index, stream)
    return index, dist, gather(features, weight, index, bias, residual)
