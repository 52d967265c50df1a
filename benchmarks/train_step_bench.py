"""Training-step throughput: one step (EDM loss forward + backward + AdamW) of the local ConditionalDenoiser
with the fused attention kernels (backend=None: C++ on CPU, Triton on CUDA) against the same model, same
weights and same batch on the reference op (dense masked scaled_dot_product_attention).

    python benchmarks/train_step_bench.py                       # CPU: B16 32x32, 64 ch, depth 4
    python benchmarks/train_step_bench.py --batch 64 --rounds 7 --out step.json
    python benchmarks/train_step_bench.py --device cuda --precision bf16
    python benchmarks/train_step_bench.py --batch 32 --depth 3 --kernel-size 3 --patch-size 2  # the demo's

Providers are timed in interleaved rounds (one step each per round, after warm-up steps) so load drift on a
shared machine affects them alike; reported: median and p20/p80 seconds per step, samples per second, and
the speedup of each provider over the reference. Also part of `fastcomp bench` (op "train_step").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Optional

import torch

from fastcomp.bench.harness import device_name, environment
from fastcomp.bench.train_step import MODEL, build_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(*, batch: int, device: str, precision: str, rounds: int, warmup: int,
        backends: tuple[str, ...] = ("fused", "reference"), model_kwargs: Optional[dict] = None) -> dict:
    dev = torch.device(device)
    steps = {name: build_step(None if name == "fused" else name, batch=batch, device=dev, precision=precision,
                              model_kwargs=model_kwargs) for name in backends}
    first = {}
    for name, step in steps.items():
        for _ in range(warmup):
            loss = step()
        first[name] = float(loss)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            _sync(dev)
            t0 = time.perf_counter()
            step()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), flush=True)
    ref = statistics.median(times["reference"]) if "reference" in times else None
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [med] * 4
        rows.append(dict(provider=name, median_s=med, p20_s=q[0], p80_s=q[-1], samples_per_s=batch / med,
                         speedup_vs_reference=(ref / med) if ref else None, warmup_loss=first[name]))
    return dict(benchmark="train_step", device=device_name(dev), environment=environment(dev),
                settings=dict(batch=batch, precision=precision, rounds=rounds, warmup=warmup,
                              model={**MODEL, **(model_kwargs or {})}, threads=torch.get_num_threads()),
                results=rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default 16 on CPU, 64 on CUDA)")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                    help="default fp32 on CPU, bf16 autocast on CUDA")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--channels", type=int, default=MODEL["channels"])
    ap.add_argument("--depth", type=int, default=MODEL["depth"])
    ap.add_argument("--image-size", type=int, default=MODEL["image_size"])
    ap.add_argument("--kernel-size", type=int, default=MODEL["kernel_size"])
    ap.add_argument("--patch-size", type=int, default=1, help="2: the length-generalization demo's model")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    batch = args.batch or (64 if cuda else 16)
    precision = args.precision or ("bf16" if cuda else "fp32")
    result = run(batch=batch, device=args.device, precision=precision, rounds=args.rounds, warmup=args.warmup,
                 model_kwargs=dict(channels=args.channels, depth=args.depth, image_size=args.image_size,
                                   kernel_size=args.kernel_size, patch_size=args.patch_size))
    print(f"\ntrain step, local ConditionalDenoiser {result['settings']['model']}, batch {batch}, {precision}, "
          f"{result['device']}")
    print(f"{'provider':<10} {'median s':>9} {'p20':>7} {'p80':>7} {'samples/s':>10} {'speedup':>8}")
    for row in result["results"]:
        sp = row["speedup_vs_reference"]
        print(f"{row['provider']:<10} {row['median_s']:9.4f} {row['p20_s']:7.4f} {row['p80_s']:7.4f} "
              f"{row['samples_per_s']:10.1f} {sp if sp is None else f'{sp:7.2f}x':>8}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
