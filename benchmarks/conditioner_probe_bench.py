"""conditioner_locality on fastcomp's own local ConditionalDenoiser: fused kernels vs the reference attention.

    python benchmarks/conditioner_probe_bench.py                 # 32x32, B2, M4, 3 rounds
    python benchmarks/conditioner_probe_bench.py --sizes 24,32 --rounds 5 --json out.json
    python benchmarks/conditioner_probe_bench.py --threads 1    # on a machine shared with other jobs

Two denoisers with the same weights (perturbed from the zero-initialized output layer, so every Jacobian
is non-zero): one on the auto backends (the C++ local attention and disk mask on CPU), one with
backend="reference" (dense masked SDPA). conditioner_locality runs forward mode: one Jacobian-vector
product per conditioner feature (M * 2 of them), vmapped, so the attention's jvp kernel sees all the
tangents in one call (its vmap rule folds them into the batch). Timed in interleaved rounds on the same
inputs (a drifting load affects both alike); reported: medians, the ratio reference / fused, the largest
attribution difference relative to the attribution's maximum, the warnings each raised (none expected)
and the number of calls into the C++ attention kernels per probe run (the batched path: one jvp call
per attention layer, not one per probe).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch


def _denoisers(S: int, M: int):
    from fastcomp.models import ConditionalDenoiser

    kw = dict(img_channels=1, image_size=S, channels=32, depth=2, kernel_size=7, locality="local", cond_radius=6.0)
    fused = ConditionalDenoiser(**kw).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    reference = ConditionalDenoiser(**kw, backend="reference").eval()
    reference.load_state_dict(fused.state_dict())
    return {"fused": fused, "reference": reference}


def _counting_extension():
    """Wrap the C++ extension so calls into the attention kernels are counted (returns the counts)."""
    from fastcomp import _build

    ext, real_load = _build.load("attention"), _build.load
    counts: dict[str, int] = {}

    class Counted:
        def __getattr__(self, name):
            fn = getattr(ext, name)
            if not name.startswith("local_attention_"):
                return fn

            def counted(*args):
                counts[name] = counts.get(name, 0) + 1
                return fn(*args)

            return counted

    _build.load = lambda name: Counted() if name == "attention" else real_load(name)
    return counts


def run(S: int, B: int, M: int, rounds: int) -> dict:
    from fastcomp import disk_mask
    from fastcomp.probe import conditioner_locality

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 1, S, S, generator=g)
    points = torch.rand(B, M, 2, generator=g) * S
    cond_mask = disk_mask(points, 6.0, S, S)
    models = _denoisers(S, M)
    counts = _counting_extension()
    times = {name: [] for name in models}
    results, caught, calls = {}, {}, {}
    for r in range(rounds):
        for name, model in models.items():
            counts.clear()
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                results[name] = conditioner_locality(lambda t, c, m=model: m(t, 0.5, c), x, points, cond_mask,
                                                     progress=False).attribution
                times[name].append(time.perf_counter() - t0)
            caught[name] = sorted({f"{type(m.message).__name__}: {str(m.message)[:120]}" for m in w
                                   if issubclass(m.category, (RuntimeWarning, UserWarning))})
            calls[name] = dict(counts)
        print(f"  {S}x{S} round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()),
              flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    ref = results["reference"]
    return {
        "shape": f"B{B} {S}x{S} M{M} channels32 depth2 k7", "median_s": med, "rounds": rounds,
        "reference_over_fused": med["reference"] / med["fused"],
        "max_rel_attribution_diff": float((results["fused"] - ref).abs().max() / ref.abs().max()),
        "warnings": caught, "attention_kernel_calls_per_run": calls,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/conditioner_probe_bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32", help="comma-separated image sides (default 32)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--conditioners", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from fastcomp.bench import harness

    env = harness.environment(torch.device("cpu"))
    print(f"conditioner probe benchmark on {env['device']}, torch {env['torch']}, {torch.get_num_threads()} "
          f"threads, load {os.getloadavg()[0]:.2f}", flush=True)
    out = {"env": env, "results": []}
    for S in (int(s) for s in args.sizes.split(",")):
        res = run(S, args.batch, args.conditioners, args.rounds)
        out["results"].append(res)
        print(f"{res['shape']}: median fused {res['median_s']['fused']:.2f} s, reference "
              f"{res['median_s']['reference']:.2f} s: fused {res['reference_over_fused']:.1f}x faster; max "
              f"attribution diff {res['max_rel_attribution_diff']:.1e} (relative); warnings {res['warnings']}; "
              f"C++ attention calls per run {res['attention_kernel_calls_per_run']['fused']}", flush=True)
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
