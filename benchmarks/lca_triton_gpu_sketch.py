"""GPU timing sketch for the Triton local conditional attention kernels, called directly (no op, no harness).

    python benchmarks/lca_triton_gpu_sketch.py            # bf16, B=4, 128x128, 8 heads, D=64, kernel 13, M=16

Forward and forward+backward of fastcomp.kernels.local_attention (lca_forward / lca_backward) against
torch.compile(flex_attention) with the same block mask (benchmarks/cases.py builds it), median times from
triton.testing.do_bench, plus the effective TFLOP/s of the useful work (4 * D flops per allowed query-key
pair forward, 3.5x that forward+backward: the backward costs 2.5 forwards, as FlashAttention counts).
Needs CUDA. `fastcomp bench` is the harness of record once the op registers the Triton backend; this
script times the kernels alone.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--kernel", type=int, default=13)
    ap.add_argument("--cond", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    import triton.testing
    from torch.nn.attention.flex_attention import flex_attention

    from benchmarks.cases import flex_block_mask, flex_local_conditional_attention
    from fastcomp.kernels.attention import lca_backward, lca_forward
    from fastcomp.reference import disk_mask_reference

    dt = getattr(torch, args.dtype)
    B, S, nh, D, ks, M = args.batch, args.size, args.heads, args.dim, args.kernel, args.cond
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, S, S, nh, D, device="cuda", dtype=dt, generator=g) for _ in range(3))
    ck, cv = (torch.randn(B, M, nh, D, device="cuda", dtype=dt, generator=g) for _ in range(2))
    points = torch.rand(B, M, 2, device="cuda", generator=g) * S
    cond_mask = disk_mask_reference(points, 0.25 * S, S, S)  # disks covering ~20 % of the image each
    scale = D ** -0.5
    do = torch.randn_like(q)

    def ours_fwd():
        return lca_forward(q, k, v, ck, cv, cond_mask, (ks, ks), scale)

    def ours_fwd_bwd():
        out, lse = lca_forward(q, k, v, ck, cv, cond_mask, (ks, ks), scale)
        return lca_backward(do, q, k, v, ck, cv, cond_mask, out, lse, (ks, ks), scale)

    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = flex_block_mask(cond_mask, S, S, ks, device="cuda")
    leaves = [t.detach().requires_grad_() for t in (q, k, v, ck, cv)]

    def flex_fwd():
        with torch.no_grad():
            return flex_local_conditional_attention(flex, q, k, v, ck, cv, block_mask)

    def flex_fwd_bwd():
        out = flex_local_conditional_attention(flex, *leaves, block_mask)
        return torch.autograd.grad(out, leaves, do)

    pairs = B * nh * S * S * ks * ks + nh * int(cond_mask.sum())  # allowed (query, key) pairs
    fwd_flops = 4 * D * pairs
    for name, fn, flops in (("forward", (ours_fwd, flex_fwd), fwd_flops),
                            ("forward+backward", (ours_fwd_bwd, flex_fwd_bwd), 3.5 * fwd_flops)):
        t_ours, t_flex = (triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median") for f in fn)
        print(f"{name:17s} triton {t_ours:7.3f} ms ({flops / t_ours / 1e9:6.1f} TFLOP/s)   "
              f"flex {t_flex:7.3f} ms ({flops / t_flex / 1e9:6.1f} TFLOP/s)   speedup {t_flex / t_ours:5.2f}x")


if __name__ == "__main__":
    main()
