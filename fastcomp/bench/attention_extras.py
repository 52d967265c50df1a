"""Extra numbers for the local conditional attention cases of `fastcomp bench`.

- effective GFLOP/s of every measured provider: the useful work of the op (each query times its kh*kw
  window keys and its allowed conditioners, for QK^T and PV: 4 * D flops per (query, key) pair; the
  backward counts 2.5x the forward, as for flash attention), next to the float32 matmul GFLOP/s of this
  machine measured in the same run;
- memory scaling: the peak extra memory of the cpu backend (forward + backward) at 32x32 and at 64x64.
  An O(H*W) kernel grows ~4x between them; a dense (H*W)^2 one (the reference) ~16x. The profiler sees
  torch allocations (outputs, lse, contiguous copies); the C++ kernel's own scratch is not in that number
  but is O(H*W*D) per thread by construction (transposed K/V and gradient rows of one (b, head)).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch

import fastcomp

from . import cases as _cases
from . import harness

OP = "local_conditional_attention"


def attention_flops(size: _cases.AttnSize, mode: str) -> float:
    """Useful flops of one call of a case (see the module docstring)."""
    s = size
    # Each disk covers about cond_fraction of the pixels (cases._attention_inputs), so a query sees
    # about M * cond_fraction conditioners.
    pairs = s.B * s.heads * s.H * s.W * (s.kernel * s.kernel + s.M * s.cond_fraction)
    fwd = 4.0 * s.D * pairs
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def matmul_gflops(device: torch.device, dtype=torch.float32, n: int = 1024, repeats: int = 9) -> float:
    """This machine's dense float32 matmul throughput (torch's BLAS) in GFLOP/s, median of repeats."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    t = harness.time_fn(lambda: a @ b, device=device, repeats=repeats)
    return 2.0 * n ** 3 / (t.median_ms * 1e-3) / 1e9


def memory_scaling(device: torch.device, dtype=torch.float32, backend: str = "cpu") -> Optional[dict]:
    """Peak extra MiB of one forward+backward of ``backend`` at 32x32 and 64x64 (B2, h4, d32, k7, M8)."""
    peaks = {}
    for side in (32, 64):
        size = _cases.AttnSize(2, side, side, 4, 32, 7, 8)
        inp = _cases._attention_inputs(size, "fwd+bwd", device, dtype)
        wrt = [inp[n] for n in ("q", "k", "v", "cond_k", "cond_v")]

        def fn():
            out = fastcomp.local_conditional_attention(inp["q"], inp["k"], inp["v"], size.kernel, cond_k=inp["cond_k"],
                                                       cond_v=inp["cond_v"], cond_mask=inp["cond_mask"],
                                                       backend=backend)
            return torch.autograd.grad(out, wrt, torch.ones_like(out))

        try:
            fn()
            peak = harness.peak_memory_mb(fn, device)
        except Exception as e:  # an unavailable backend: report why, never fail the run
            return {"backend": backend, "note": _cases._first_line(e)}
        if peak is None:
            return {"backend": backend, "note": "peak memory not measurable here"}
        peaks[side] = peak
    ratio = peaks[64] / peaks[32] if peaks[32] > 0 else math.nan
    return {"backend": backend, "peak_mb_32x32": round(peaks[32], 3), "peak_mb_64x64": round(peaks[64], 3),
            "ratio": round(ratio, 2), "expected_linear": 4.0, "quadratic_would_be": 16.0}


def has_cases(cases: list) -> bool:
    return any(c.op == OP and getattr(c, "size", None) is not None for c in cases)


def report(cases: list, results: list[harness.Result], device: torch.device,
           matmul_before: Optional[float] = None) -> tuple[dict, list[str]]:
    """(JSON-ready dict, printed lines) for the attention cases among ``results``; matmul_before: the
    matmul GFLOP/s sampled before the cases ran (see below)."""
    sizes = {c.name: c.size for c in cases if c.op == OP and getattr(c, "size", None) is not None}
    if not sizes:
        return {}, []
    start = time.perf_counter()
    # The matmul rate is sampled before the cases and again now; on a shared machine a loaded second can
    # halve one sample, and a share taken from it would be twice too high. The higher sample is the
    # machine's rate (so a share is never flattered); far apart samples are reported as such.
    samples = [mm for mm in (matmul_before, matmul_gflops(device)) if mm is not None]
    mm = max(samples)
    out = {"matmul_float32_gflops": round(mm, 2), "matmul_samples_gflops": [round(x, 2) for x in samples],
           "providers": []}
    lines = [f"local_conditional_attention throughput (useful flops; float32 matmul here: {mm:.1f} GFLOP/s):"]
    if min(samples) < 0.75 * mm:
        listed = ", ".join(f"{x:.1f}" for x in samples)
        lines.append(f"  note: the matmul samples before and after the cases differ ({listed} GFLOP/s): the load "
                     f"changed during the run, so the shares are rough; benchmarks/attention_share.py measures "
                     f"them with matmul and attention timed alternately")
    for r in results:
        size = sizes.get(f"{r.op} [{r.shape}] {r.mode}")
        if size is None or not r.measured:
            continue
        gflops = attention_flops(size, r.mode) / (r.median_ms * 1e-3) / 1e9
        r.extra["gflops"] = gflops
        out["providers"].append({"shape": r.shape, "mode": r.mode, "dtype": r.dtype, "provider": r.provider,
                                 "gflops": round(gflops, 3), "fraction_of_matmul": round(gflops / mm, 4)})
        lines.append(f"  {r.shape} {r.mode:<7} {r.provider:<15} {gflops:8.2f} GFLOP/s ({100 * gflops / mm:5.1f}% "
                     f"of matmul)")
    if device.type == "cpu":
        mem = memory_scaling(device)
        out["memory_scaling"] = mem
        if mem and "ratio" in mem:
            lines.append(f"  memory (cpu backend, fwd+bwd, B2 h4 d32 k7 M8): peak {mem['peak_mb_32x32']:.2f} MB at "
                         f"32x32, {mem['peak_mb_64x64']:.2f} MB at 64x64: x{mem['ratio']:.2f} for 4x the pixels "
                         f"(O(H*W): ~4, O((H*W)^2): ~16)")
        elif mem:
            lines.append(f"  memory scaling not measured: {mem.get('note')}")
    out["extras_s"] = round(time.perf_counter() - start, 1)
    return out, lines
