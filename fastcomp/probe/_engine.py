"""Batched, chunked Jacobian probes: the machinery behind pixel_locality and conditioner_locality.

A *probe* is one vector-Jacobian product (reverse mode: a cotangent on a set of output pixels of one output
channel) or one Jacobian-vector product (forward mode: a tangent on a set of input pixels of one input
channel). Probes are evaluated `chunk_size` at a time in one batched pass (autograd.grad with
is_grads_batched, or torch.func.vmap over torch.func.jvp), so memory is bounded by the chunk, and each
chunk's results go straight to the fused probe_demux reduction.

Forward mode costs about a third of reverse mode per probe on CPU for convolutional nets (a JVP runs
forward convolutions; a VJP runs their transposes, which PyTorch executes more slowly), so it is preferred
when the input has no more channels than the output. A fn that forward-mode AD or vmap cannot handle
(an op without a forward derivative or batching rule) falls back to reverse mode, and a fn that batched
backward cannot handle falls back to one backward pass per probe: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
from torch.func import jvp, vmap
from tqdm.auto import tqdm

from ..ops import _checks as check
from ..ops._checks import is_int
from ..ops.probe_demux import probe_demux

MODES = ("forward", "reverse")

# Elements of x-sized tensors per chunk when chunk_size is not given: a chunk of n probes materializes
# n copies of every activation of fn, so this bounds the probes' working set to a few hundred MB for
# typical small convnets.
_DEFAULT_CHUNK_ELEMENTS = 1 << 22


def default_chunk(per_probe_elements: int, n_probes: int) -> int:
    return max(1, min(n_probes, _DEFAULT_CHUNK_ELEMENTS // max(1, per_probe_elements)))


def check_chunk_size(op: str, chunk_size) -> Optional[int]:
    if chunk_size is None:
        return None
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int (probes per batched pass) or None for "
                         f"an automatic size, got {chunk_size!r}")
    return int(chunk_size)


def check_output(op: str, fn, args, B: int, H: int, W: int) -> None:
    """Evaluate fn once without grad to check the output shape before the expensive passes."""
    with torch.no_grad():
        y = fn(*args)
    if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[0] != B or tuple(y.shape[2:]) != (H, W):
        got = check.fmt_shape(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{op}: fn must return [B, C', H, W] = [{B}, C', {H}, {W}] (same batch and image "
                         f"size as x), got {got}")
    if not y.is_floating_point():
        raise TypeError(f"{op}: fn must return a floating tensor, got {check.dtype_name(y.dtype)}")


@contextlib.contextmanager
def math_attention():
    """Route scaled_dot_product_attention to its composite math kernel, which has forward-mode and vmap
    support (the fused CPU/CUDA kernels lack forward derivatives)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to route
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _progress(total: int, desc: str, enabled: Optional[bool]):
    # enabled=None: tqdm decides (shown on a terminal, silent in logs and tests).
    return tqdm(total=total, desc=desc, unit="probe", disable=None if enabled is None else not enabled,
                leave=False)


def pattern(channels: torch.Tensor, origins: torch.Tensor, stride: int, B: int, K: int, H: int, W: int,
            dtype, device, channels_last: bool = False) -> torch.Tensor:
    """[n, B, K, H, W] probe vectors: 1 at channel channels[k] and pixels origins[k] + stride * (a, b).

    channels_last: store them as [n, B, H, W, K] (the shape stays [n, B, K, H, W]): vmap folds n into the
    batch, and convolutions over few channels run ~3x faster in that layout on CPU (oneDNN).
    """
    rows = torch.arange(H, device=device)
    cols = torch.arange(W, device=device)
    o_row, o_col = origins[:, 0:1].to(device), origins[:, 1:2].to(device)
    on_row = ((rows - o_row) % stride == 0) & (rows >= o_row)  # [n, H]
    on_col = ((cols - o_col) % stride == 0) & (cols >= o_col)  # [n, W]
    pix = (on_row[:, :, None] & on_col[:, None, :]).to(dtype)  # [n, H, W]
    onehot = torch.nn.functional.one_hot(channels.to(device), K).to(dtype)  # [n, K]
    vecs = (onehot[:, :, None, None] * pix[:, None]).unsqueeze(1).expand(-1, B, -1, -1, -1)
    if channels_last:
        return vecs.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return vecs.contiguous()


def batched_vjp(op: str, y: torch.Tensor, xg: torch.Tensor, vecs: torch.Tensor, batched: bool = True
                ) -> tuple[torch.Tensor, bool]:
    """(d <vecs[i], y> / d xg for every i, stacked [n, *xg.shape], whether batching worked).

    One batched backward (autograd.grad with is_grads_batched) when fn allows it; a fn whose backward
    cannot run under vmap (an extension kernel that needs real storage, e.g. the fused attention's C++
    backward) gets one backward pass per probe instead, with a warning, and ``batched`` False from then on.
    """
    if batched:
        try:
            (g,) = torch.autograd.grad(y, xg, vecs.to(y.dtype), retain_graph=True, is_grads_batched=True,
                                       allow_unused=True)
            return (torch.zeros((vecs.shape[0], *xg.shape), dtype=xg.dtype, device=xg.device)
                    if g is None else g), True
        except RuntimeError as e:
            warnings.warn(f"{op}: batched backward failed for this fn ({str(e).splitlines()[0]}); "
                          f"falling back to one backward pass per probe", RuntimeWarning, stacklevel=4)
    out = []
    for v in vecs:
        (g,) = torch.autograd.grad(y, xg, v.to(y.dtype), retain_graph=True, allow_unused=True)
        out.append(torch.zeros_like(xg) if g is None else g)
    return torch.stack(out), False


class PixelProber:
    """Evaluates pixel probes of fn at x in one direction, chunked, and demultiplexes them.

    mode: "forward", "reverse" or None (forward when x has no more channels than fn's output, falling back
    to reverse when fn does not support forward-mode AD under vmap).
    """

    def __init__(self, op: str, fn, x: torch.Tensor, C_out: int, mode: Optional[str], chunk_size: Optional[int],
                 backend: Optional[str], progress: Optional[bool]):
        self.op, self.fn, self.x = op, fn, x.detach()
        self.C_out = C_out
        self.requested_mode = mode
        self.mode = mode or ("forward" if x.shape[1] <= C_out else "reverse")
        self.chunk_size, self.backend, self.progress = chunk_size, backend, progress
        self._y = None  # reverse mode: fn(x) with its graph, built once
        self._xg = None
        self.batched = True  # False once batched backward failed: one pass per probe
        # Channels-last x and probe vectors: much faster convolutions; dropped (with a retry) for a fn
        # that cannot take them (e.g. one that calls .view on its input).
        self.channels_last = x.dim() == 4 and x.shape[1] > 1

    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    @property
    def channels(self) -> int:
        """Channels a probe is placed on: fn's outputs (reverse) or inputs (forward)."""
        return self.C_out if self.mode == "reverse" else self.x.shape[1]

    def _graph(self):
        if self._y is None:
            self._xg = self._layout(self.x.clone()).requires_grad_(True)
            self._y = self.fn(self._xg)
        return self._xg, self._y

    def _reverse(self, vecs: torch.Tensor) -> torch.Tensor:
        xg, y = self._graph()
        g, self.batched = batched_vjp(self.op, y, xg, vecs, self.batched)
        return g

    def _forward(self, vecs: torch.Tensor) -> torch.Tensor:
        x = self._layout(self.x)
        with math_attention():
            return vmap(lambda t: jvp(self.fn, (x,), (t,))[1])(vecs.to(x.dtype))

    def run(self, make_probes, stride: int, radius: int, desc: str):
        """Evaluate the probes make_probes(K) -> (channels [n], origins [n, 2]) for K probe channels and
        return (sums [2R+1, 2R+1], counts [2R+1, 2R+1], outside []) summed over all probes."""
        B, _, H, W = self.x.shape
        channels, origins = make_probes(self.channels)
        n = channels.shape[0]
        per_probe = B * max(self.x.shape[1], self.C_out) * H * W
        chunk = self.chunk_size or default_chunk(per_probe, n)
        s = 2 * radius + 1
        sums = torch.zeros(s, s, dtype=torch.float64, device=self.x.device)
        counts = torch.zeros_like(sums)
        outside = torch.zeros((), dtype=torch.float64, device=self.x.device)
        with _progress(n, desc, self.progress) as bar:
            start = 0
            while start < n:
                ch, org = channels[start:start + chunk], origins[start:start + chunk]
                vecs = pattern(ch, org, stride, B, self.channels, H, W, self.x.dtype, self.x.device,
                               channels_last=self.channels_last)
                if self.mode == "forward":
                    try:
                        g = self._forward(vecs)
                    except (RuntimeError, NotImplementedError) as e:
                        if start == 0 and self.channels_last:
                            self.channels_last = False  # retry in the standard layout first
                            return self.run(make_probes, stride, radius, desc)
                        if self.requested_mode == "forward" or start > 0:
                            raise
                        # Forward-mode AD or vmap cannot run this fn: redo everything in reverse mode.
                        warnings.warn(f"{self.op}: forward-mode probes are not supported by this fn "
                                      f"({str(e).splitlines()[0][:200]}); using reverse mode", RuntimeWarning,
                                      stacklevel=3)
                        self.mode = "reverse"
                        return self.run(make_probes, stride, radius, desc)
                else:
                    try:
                        g = self._reverse(vecs)
                    except RuntimeError:
                        if not (start == 0 and self.channels_last):
                            raise
                        self.channels_last, self._y, self._xg = False, None, None
                        return self.run(make_probes, stride, radius, desc)
                d = probe_demux(g.detach().contiguous(), org, stride=stride, radius=radius, transpose=self.mode == "forward",
                                backend=self.backend)
                sums += d.sums
                counts += d.counts
                outside += d.outside
                bar.update(ch.shape[0])
                start += chunk
        return sums, counts, outside
