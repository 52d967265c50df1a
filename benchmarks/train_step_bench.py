"""Training-step throughput: one step (EDM loss forward + backward + AdamW) of the local ConditionalDenoiser
with the fused attention kernels (backend=None: C++ on CPU, Triton on CUDA) against the same model, same
weights and same batch on the reference op (dense masked scaled_dot_product_attention).

    python -m fastcomp.benchmarks.train_step_bench                       # CPU: B16 32x32, 64 ch, depth 4
    python -m fastcomp.benchmarks.train_step_bench --batch 64 --rounds 7 --out step.json
    python -m fastcomp.benchmarks.train_step_bench --device cuda --precision bf16
    python -m fastcomp.benchmarks.train_step_bench --batch 32 --depth 3 --kernel-size 3 --patch-size 2  # the demo's

Providers are timed in interleaved rounds (one step each per round, after warm-up steps) so load drift on a
shared machine affects them alike; reported: median and p20/p80 seconds per step, samples per second, and
the speedup of each provider over the reference. Also part of `fastcomp bench` (op "train_step").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from types import SimpleNamespace
from typing import Callable, Optional

import torch

MODEL = dict(img_channels=3, image_size=32, channels=64, depth=4, num_heads=4, kernel_size=7, locality="local",
             cond_radius=6.0)


def make_batch(batch: int, max_objects: int, image_size: int, channels: int, device, seed: int = 0):
    """A synthetic SceneBatch-like batch: images in [-1, 1], 1..max_objects valid points per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, image_size, image_size, generator=g) * 2 - 1
    points = torch.rand(batch, max_objects, 2, generator=g) * (image_size - 1)
    count = torch.randint(1, max_objects + 1, (batch, 1), generator=g)
    valid = torch.arange(max_objects)[None, :] < count
    return SimpleNamespace(images=images.to(device), points=points.to(device), valid=valid.to(device))


def build_step(backend: Optional[str], *, batch: int = 16, device="cpu", precision: str = "fp32",
               max_objects: int = 3, seed: int = 0, model_kwargs: Optional[dict] = None) -> Callable[[], float]:
    """A closure running one training step of a fresh (seeded, so identical across backends) model; returns
    the loss. precision: "fp32" or "bf16" (autocast; float32 master weights)."""
    from fastcomp.models import ConditionalDenoiser, LogNormalSigma, edm_loss

    device = torch.device(device)
    kwargs = {**MODEL, **(model_kwargs or {}), "backend": backend}
    torch.manual_seed(seed)
    model = ConditionalDenoiser(**kwargs).to(device)
    with torch.no_grad():  # leave the zero-initialized output layer's starting point: every layer gets gradient
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = make_batch(batch, max_objects, kwargs["image_size"], kwargs["img_channels"], device, seed)
    sigma_dist = LogNormalSigma()
    if precision == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    elif precision == "fp32":
        autocast = contextlib.nullcontext
    else:
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")

    def step() -> float:
        g = torch.Generator(device="cpu").manual_seed(seed)  # same sigmas and noise every step and backend
        with autocast():
            loss = edm_loss(model, data, sigma_dist, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


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
    from fastcomp.benchmarks.harness import device_name, environment

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
