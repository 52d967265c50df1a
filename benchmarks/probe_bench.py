"""Issue-size probe benchmark: coloured vs exact pixel_locality at 32x32 and 64x64 (too slow for the
default `fastcomp bench` tier, whose CPU probe case is 24x24).

    python benchmarks/probe_bench.py                  # 32x32 and 64x64, B4, 3-channel 9x9 convnet
    python benchmarks/probe_bench.py --sizes 32 --rounds 5 --json out.json
    python benchmarks/probe_bench.py --threads 1     # on a machine shared with other jobs

Providers, timed in interleaved rounds on the same inputs so a machine whose load drifts affects them
alike: ``reference`` (the exact baseline of the issue: one backward pass per output element, C'*H*W passes),
``exact`` (batched, chunked exact probes) and ``colored`` (C*(2R+1)^2 probes). Every call is timed in full
(no extrapolation from a subset of rows). Reported: median seconds per provider, speedups over the
reference, the largest profile difference relative to the profile's maximum, and the peak extra memory
of the coloured probe at several chunk sizes (memory grows with the chunk, not with the probe count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from fastcomp.bench import harness
from fastcomp.bench.cases import ProbeSize, _probe_inputs


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(H: int, rounds: int, chunks: tuple[int, ...], radius: int = 4) -> dict:
    from fastcomp.probe import pixel_locality
    from fastcomp.reference import pixel_locality_reference

    size = ProbeSize(4, H, H, radius)
    inp = _probe_inputs(size, torch.device("cpu"), torch.float32)
    net, x = inp["net"], inp["x"]
    providers = {
        "reference": lambda: pixel_locality_reference(net, x, radius),
        "exact": lambda: pixel_locality(net, x, radius=radius, method="exact", progress=False),
        "colored": lambda: pixel_locality(net, x, radius=radius, method="colored", progress=False),
    }
    providers["colored"]()  # warm up (extension load, vmap tracing caches)
    times = {name: [] for name in providers}
    profiles = {}
    for r in range(rounds):
        for name, fn in providers.items():
            # The coloured probe is short: time it several times per round so its median is as stable as
            # the long calls'.
            for _ in range(5 if name == "colored" else 1):
                seconds, res = _timed(fn)
                times[name].append(seconds)
                profiles[name] = res.profile
        print(f"  {H}x{H} round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()),
              flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    ref = profiles["reference"]
    scale = float(ref.abs().max())
    memory = {}
    for chunk in chunks:
        memory[chunk] = harness.peak_memory_mb(
            lambda c=chunk: pixel_locality(net, x, radius=radius, method="colored", chunk_size=c, progress=False))
    return {
        "shape": size.label, "median_s": med, "calls": {n: len(t) for n, t in times.items()},
        "speedup_vs_reference": {n: med["reference"] / m for n, m in med.items()},
        "colored_vs_exact_batched": med["exact"] / med["colored"],
        "max_rel_profile_diff_vs_reference": {n: float((p - ref).abs().max()) / scale for n, p in profiles.items()},
        "colored_peak_mem_mb_by_chunk": memory,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/probe_bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32,64", help="comma-separated image sides (default 32,64)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--chunks", default="16,64,243", help="chunk sizes for the memory column")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's). On a shared machine use 1: a multi-threaded op "
                        "waits for descheduled threads, which penalizes the reference's thousands of small "
                        "ops far more than the batched probes and inflates the speedups")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = harness.environment(torch.device("cpu"))
    print(f"probe benchmark on {env['device']}, torch {env['torch']}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    out = {"env": env, "results": []}
    for H in (int(s) for s in args.sizes.split(",")):
        res = run(H, args.rounds, tuple(int(c) for c in args.chunks.split(",")))
        out["results"].append(res)
        sp = res["speedup_vs_reference"]
        print(f"{res['shape']}: median reference {res['median_s']['reference']:.2f} s, exact (batched) "
              f"{res['median_s']['exact']:.2f} s, colored {res['median_s']['colored']:.3f} s; colored "
              f"{sp['colored']:.1f}x faster than the reference, {res['colored_vs_exact_batched']:.1f}x than "
              f"batched exact; max profile diff {res['max_rel_profile_diff_vs_reference']['colored']:.2e} "
              f"(relative); colored peak MB by chunk {res['colored_peak_mem_mb_by_chunk']}", flush=True)
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
