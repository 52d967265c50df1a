"""Reference probe demultiplexing: plain PyTorch, the executable spec of the fused probe_demux kernels."""

from __future__ import annotations

import torch


def probe_demux_reference(g: torch.Tensor, origins: torch.Tensor, stride: int, radius: int, transpose: bool,
                          sums: torch.Tensor, counts: torch.Tensor, outside: torch.Tensor) -> None:
    """Demultiplex probe results into per-offset |J| sums (the spec of the fused probe_demux kernels).

    g: [N, B, K, H, W] results of N structured probes. Probe n covers the pixels
    origins[n] + (k * stride, l * stride) inside the image. Not transposed (vector-Jacobian products):
    those are OUTPUT pixels p and g holds d(sum of their outputs)/dx at input pixels q. Transposed
    (Jacobian-vector products): they are INPUT pixels q and g holds the output response at pixels p.
    Every position of g is assigned to the probe pixel nearest it along each axis modulo the stride,
    (pos - origin + R) mod stride - R = d; the offset delta = q - p is d (or -d transposed). When
    |d| <= R per axis and that probe pixel is inside the image, sum_{b, k} |g| lands in
    sums[n, (delta_row + R) * (2R+1) + delta_col + R] and B*K in counts at that slot; otherwise it lands
    in outside[n] (mass at offsets beyond R, or aliased: the probe is not exact there).

    Writes sums [N, (2R+1)^2], counts [N, (2R+1)^2] and outside [N], all float64.
    """
    N, B, K, H, W = g.shape
    R, S, s = radius, stride, 2 * radius + 1
    mass = g.abs().to(torch.float64).sum(dim=(1, 2))  # [N, H, W]
    o_row, o_col = origins[:, 0:1].to(g.device), origins[:, 1:2].to(g.device)  # [N, 1]
    rows = torch.arange(H, device=g.device)[None, :]
    cols = torch.arange(W, device=g.device)[None, :]
    d_row = (rows - o_row + R) % S - R  # [N, H]
    d_col = (cols - o_col + R) % S - R  # [N, W]
    ok_row = (d_row <= R) & (rows - d_row >= 0) & (rows - d_row < H)  # probe pixel inside the image
    ok_col = (d_col <= R) & (cols - d_col >= 0) & (cols - d_col < W)
    if transpose:
        d_row, d_col = -d_row, -d_col
    ok = ok_row[:, :, None] & ok_col[:, None, :]  # [N, H, W]
    slot = ((d_row + R).clamp(0, s - 1)[:, :, None] * s + (d_col + R).clamp(0, s - 1)[:, None, :])
    slot = torch.where(ok, slot, torch.full_like(slot, s * s))  # a spare slot collects the outside mass
    flat = slot.reshape(N, H * W)
    acc = torch.zeros(N, s * s + 1, dtype=torch.float64, device=g.device)
    acc.scatter_add_(1, flat, mass.reshape(N, H * W))
    cnt = torch.zeros(N, s * s + 1, dtype=torch.float64, device=g.device)
    cnt.scatter_add_(1, flat, torch.full((N, H * W), float(B * K), dtype=torch.float64, device=g.device))
    sums.copy_(acc[:, :s * s])
    counts.copy_(cnt[:, :s * s])
    outside.copy_(acc[:, s * s])
