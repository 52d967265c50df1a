"""The attention's useful GFLOP/s as a share of this machine's float32 matmul rate, measured interleaved.

    python benchmarks/attention_share.py                # B2 64x64 h4 d32 k7 M8, torch's thread count
    FASTCOMP_MARCH=x86-64-v3 python benchmarks/attention_share.py --threads 2 --rounds 15

`fastcomp bench` prints the same share from one matmul measurement and one provider measurement taken
tens of seconds apart; on a shared machine the load changes in between and the share moves by 2x. Here
every round times a 1024^3 matmul, the forward and the forward+backward back to back (A B C A B C ...),
and the share is taken round by round, so both sides of each ratio saw the same load. Prints the median
and p20-p80 over rounds. Useful flops as in fastcomp.bench.attention_extras (4 D per (query, key) pair
forward, 3.5x that forward+backward).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastcomp
from fastcomp.bench import attention_extras, cases, harness


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = cases.AttnSize(2, 64, 64, 4, 32, 7, 8)
    inp = cases._attention_inputs(size, "fwd+bwd", torch.device("cpu"), torch.float32)
    wrt = [inp[n] for n in ("q", "k", "v", "cond_k", "cond_v")]

    def forward():
        return fastcomp.local_conditional_attention(inp["q"], inp["k"], inp["v"], size.kernel, cond_k=inp["cond_k"],
                                                    cond_v=inp["cond_v"], cond_mask=inp["cond_mask"],
                                                    backend=args.backend)

    def forward_only():
        with torch.no_grad():
            forward()

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    calls = {"matmul": lambda: a @ b, "fwd": forward_only, "fwd+bwd": cases.with_backward(forward, wrt)}

    def median_s(fn, n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    for fn in calls.values():  # warm up: first-use builds, allocator
        median_s(fn, 2)
    matmul, shares = [], {"fwd": [], "fwd+bwd": []}
    for _ in range(args.rounds):
        mm = 2 * 1024 ** 3 / median_s(calls["matmul"], 3) / 1e9
        matmul.append(mm)
        for mode in shares:
            seconds = median_s(calls[mode], 3 if mode == "fwd" else 2)
            shares[mode].append(attention_extras.attention_flops(size, mode) / seconds / 1e9 / mm)

    mm_lo, mm_hi = (harness.percentile(matmul, q) for q in (20, 80))
    print(f"{size.label}, float32, {torch.get_num_threads()} threads, backend {args.backend!r}, "
          f"{args.rounds} rounds: matmul median {statistics.median(matmul):.1f} GFLOP/s "
          f"(p20-p80 {mm_lo:.1f}-{mm_hi:.1f}, best {max(matmul):.1f})")
    if statistics.median(matmul) < 0.75 * max(matmul):
        # Other work on these cores slows the compute-bound matmul and the memory-bound attention by
        # different factors, so a share taken under that load is not this kernel's share.
        print("  note: the matmul ran well below its best round most of the time: other load shared these "
              "cores, and the shares below are not the kernel's; rerun on a quiet machine")
    for mode, xs in shares.items():
        p20, p80 = (100 * harness.percentile(xs, q) for q in (20, 80))
        print(f"  {mode:<8} {100 * statistics.median(xs):5.1f}% of matmul (p20-p80 {p20:.1f}-{p80:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
