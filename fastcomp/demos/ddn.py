"""`fastcomp demo ddn`: train a small DDN on scikit-learn's 8x8 digits (upsampled to 16x16) on the CPU.
Training runs in two phases: a warm-up without Split-and-Prune, then with it, so the hit-frequency
histogram can be compared before and after. Writes into --out:
    samples.png            unconditional samples (uniform latent indices)
    reconstructions.png    rows of originals over their reconstructions
    guided_superres.png    zero-shot super-resolution: 4x4 input | guided sample | ground truth, per row
    guided_inpainting.png  zero-shot inpainting (left half known): known half | guided sample | truth
    hit_frequencies.png    per-node hit frequencies (x K) of the last layer, before and after S&P
    metrics.json           final loss, throughput, hit-frequency spread per layer before and after
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..ddn import SplitAndPrune
from ..models import DDN, InpaintingScorer, SuperResolutionScorer


def load_digits_16(image_size: int = 16) -> torch.Tensor:
    """scikit-learn's 1797 8x8 digits (shipped with the package, no download) as [N, 1, S, S] in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the message is the point
        raise SystemExit("fastcomp demo ddn needs scikit-learn: pip install 'fastcomp[demo]' "
                         "(or pip install scikit-learn)") from e
    x = torch.from_numpy(load_digits().images).float()[:, None] / 16.0  # [N, 1, 8, 8], values 0..16
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0)


# --- PNG output without extra dependencies ------------------------------------------------------------

def write_png(path: str, img: np.ndarray) -> None:
    """img: [H, W] or [H, W, 3] floats in [0, 1] -> 8-bit PNG (zlib + struct: no imaging library needed)."""
    a = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    color_type = 2 if a.ndim == 3 else 0
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[row].tobytes() for row in range(h))  # filter type 0 per scanline

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))


def image_grid(images: torch.Tensor, nrow: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """images [N, 1, H, W] in [0, 1] -> one [rows*(H*scale+pad)+pad, ...] grayscale grid, white-padded."""
    x = images.detach().float().cpu().clamp(0, 1)
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)[:, 0].numpy()
    n, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = x[i]
    return grid


def write_histogram(path: str, before: np.ndarray, after: np.ndarray, k: int) -> None:
    """Sorted hit frequencies x K (1 = uniform) before and after Split-and-Prune, as bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        # Without matplotlib: two bar charts drawn as pixels, before on top, after below.
        height, panels = 60, []
        for freq in (before, after):
            v = np.sort(freq)[::-1] * k
            top = max(float(v.max()), 2.0)
            panel = np.ones((height, len(v) * 3), dtype=np.float32)
            for i, val in enumerate(v):
                panel[height - int(round(val / top * (height - 1))):, 3 * i:3 * i + 2] = 0.2
            panel[height - int(round(1.0 / top * (height - 1))) - 1, :] = 0.6  # the uniform level
            panels += [panel, np.ones((4, panel.shape[1]), dtype=np.float32)]
        write_png(path, np.concatenate(panels))
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, freq, title in ((axes[0], before, "before Split-and-Prune"), (axes[1], after, "after Split-and-Prune")):
        v = np.sort(freq)[::-1] * k
        ax.bar(np.arange(len(v)), v, width=1.0, color="tab:blue")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.axhline(0.5, color="tab:red", lw=0.8, ls=":")
        ax.set_title(f"{title}\nmax-min = {(freq.max() - freq.min()) * k:.2f}/K, "
                     f"dead (<0.5/K) = {(freq < 0.5 / k).sum()}/{k}", fontsize=9)
        ax.set_xlabel("node (sorted by hits)")
    axes[0].set_ylabel("hit frequency x K (last layer)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- statistics ---------------------------------------------------------------------------------------

@torch.no_grad()
def dataset_hit_frequencies(model, data: torch.Tensor, batch: int = 256) -> np.ndarray:
    """float64 [L, K]: how often each node is the nearest over the data set (encode, no training)."""
    latents = torch.cat([model.encode(data[i:i + batch]) for i in range(0, len(data), batch)])  # [N, L]
    counts = torch.stack([torch.bincount(latents[:, l], minlength=model.k) for l in range(latents.shape[1])])
    return (counts.double() / latents.shape[0]).numpy()


def spread(freq: np.ndarray, k: int) -> dict:
    """Per-layer hit-frequency spread: (p_max - p_min) * K and dead nodes (p < 0.5/K), averaged over layers."""
    gap = (freq.max(axis=1) - freq.min(axis=1)) * k
    dead = (freq < 0.5 / k).sum(axis=1)
    return {"max_minus_min_times_K": [round(float(g), 3) for g in gap], "mean_max_minus_min_times_K":
            round(float(gap.mean()), 3), "dead_nodes": [int(d) for d in dead], "mean_dead_nodes":
            round(float(dead.mean()), 2)}


# --- the pipeline -------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="fastcomp demo ddn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="ddn-demo", help="output directory (created)")
    p.add_argument("--quick", action="store_true", help="the whole pipeline in seconds (tiny model, few steps)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 3000; --quick: 40)")
    p.add_argument("--minutes", type=float, default=4.0,
                   help="stop training after this many minutes even if steps remain")
    p.add_argument("--k", type=int, default=None, help="candidates per layer (default 64; --quick: 8)")
    p.add_argument("--width", type=int, default=None, help="trunk channels (default 32; --quick: 8)")
    p.add_argument("--layers-per-stage", type=int, nargs="+", default=None,
                   help="DDLs per resolution 2, 4, 8, 16 (default 2 3 3 2; --quick: 1)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=float, default=0.1,
                   help="fraction of the steps trained before Split-and-Prune is switched on")
    p.add_argument("--sp-interval", type=int, default=2, help="steps between Split-and-Prune checks")
    p.add_argument("--sp-max-splits", type=int, default=2, help="splits per layer per check")
    p.add_argument("--chain-dropout", type=float, default=0.05)
    p.add_argument("--backend", default=None, help="ddn_select/ddn_gather backend (default: fastest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    steps = args.steps if args.steps is not None else (40 if args.quick else 3000)
    k = args.k if args.k is not None else (8 if args.quick else 64)
    width = args.width if args.width is not None else (8 if args.quick else 32)
    per_stage = args.layers_per_stage if args.layers_per_stage is not None else ([1] if args.quick else [2, 3, 3, 2])
    per_stage = per_stage[0] if len(per_stage) == 1 else per_stage
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    data = load_digits_16(16)
    if args.quick:
        data = data[:256]
    gen = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(data), generator=gen)
    test, train = data[perm[:64]], data[perm[64:]]

    model = DDN(channels=1, image_size=16, k=k, layers_per_stage=per_stage, width=width,
                chain_dropout=args.chain_dropout, backend=args.backend)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    # perturb: the split twins must differ a little, or the smaller index wins every tie and the copy stays dead.
    sp = SplitAndPrune(model.ddls, opt, interval=args.sp_interval, max_splits=args.sp_max_splits,
                       perturb=0.05, seed=args.seed)
    warmup_steps = int(round(args.warmup * steps))
    print(f"DDN: L={model.num_layers} layers at {model.layer_resolutions}, K={k}, width={width}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters, {len(train)} training images; "
          f"{steps} steps ({warmup_steps} before Split-and-Prune)", file=sys.stderr)

    freq_before = None
    t0, seen, losses = time.perf_counter(), 0, []
    bar = tqdm(range(steps), desc="train DDN", unit="step", file=sys.stderr, mininterval=0.5)
    for step in bar:
        # S&P switches on after the warm-up fraction of the steps or of the time budget, whichever is first.
        if freq_before is None and (step >= warmup_steps or
                                    time.perf_counter() - t0 > args.warmup * args.minutes * 60):
            warmup_steps = step
            freq_before = dataset_hit_frequencies(model, train)
            for layer in model.ddls:  # S&P starts from counts gathered from now on
                layer.hits.zero_()
        idx = torch.randint(0, len(train), (args.batch,), generator=gen)
        loss = model.training_step(train[idx], opt, sp if freq_before is not None else None)
        seen += args.batch
        if step % 10 == 0 or step == steps - 1:
            losses.append(float(loss))  # a host sync, every 10 steps only
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{seen / elapsed:.0f}", splits=len(sp.history))
        if time.perf_counter() - t0 > args.minutes * 60:
            bar.write(f"time limit of {args.minutes} min reached after {step + 1} steps")
            steps = step + 1
            break
    bar.close()
    train_seconds = time.perf_counter() - t0
    if freq_before is None:  # stopped before S&P started
        freq_before = dataset_hit_frequencies(model, train)
    freq_after = dataset_hit_frequencies(model, train)

    model.eval()
    with torch.no_grad():
        test_loss = float(model(test, train=False).loss)
        samples = model.sample(64, generator=torch.Generator().manual_seed(args.seed + 1))
        recon = model.reconstruct(test[:32])
        low = F.adaptive_avg_pool2d(test[:16], 4)
        sr = model.guided_sample(16, SuperResolutionScorer(low), chunk_size=32)
        known = torch.zeros(16, 1, 16, 16)
        known[..., :8] = 1.0
        inp = model.guided_sample(16, InpaintingScorer(test[:16], known), chunk_size=32)
        sr_mse = float((sr - test[:16]).square().mean())
        inp_mse = float((inp - test[:16]).square().mean())
        rand_mse = float((samples[:16] - test[:16]).square().mean())

    write_png(os.path.join(args.out, "samples.png"), image_grid(samples, nrow=8))
    write_png(os.path.join(args.out, "reconstructions.png"),
              image_grid(torch.cat([test[:8], recon[:8], test[8:16], recon[8:16]]), nrow=8))
    low_up = F.interpolate(low, size=(16, 16), mode="nearest")
    write_png(os.path.join(args.out, "guided_superres.png"),
              image_grid(torch.stack([low_up, sr, test[:16]], dim=1).flatten(0, 1), nrow=6))
    write_png(os.path.join(args.out, "guided_inpainting.png"),
              image_grid(torch.stack([test[:16] * known + 0.25 * (1 - known), inp, test[:16]], dim=1).flatten(0, 1),
                         nrow=6))
    write_histogram(os.path.join(args.out, "hit_frequencies.png"), freq_before[-1], freq_after[-1], k)

    metrics = {
        "steps": steps, "train_seconds": round(train_seconds, 1),
        "images_per_second": round(steps * args.batch / train_seconds, 1),
        "final_train_loss": losses[-1] if losses else None,
        "final_train_loss_mean_last_10pct": round(float(np.mean(losses[-max(1, len(losses) // 10):])), 5),
        "test_loss": round(test_loss, 5), "splits": len(sp.history),
        "guided_superres_mse_vs_truth": round(sr_mse, 5), "guided_inpainting_mse_vs_truth": round(inp_mse, 5),
        "unconditional_sample_mse_vs_truth": round(rand_mse, 5),
        "hit_spread_before_split_and_prune": spread(freq_before, k),
        "hit_spread_after_split_and_prune": spread(freq_after, k),
        "config": {"k": k, "width": width, "layers": model.num_layers, "resolutions": model.layer_resolutions,
                   "batch": args.batch, "lr": args.lr, "warmup_steps": warmup_steps,
                   "sp_interval": args.sp_interval, "chain_dropout": args.chain_dropout},
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    b, a = metrics["hit_spread_before_split_and_prune"], metrics["hit_spread_after_split_and_prune"]
    print(f"final loss {metrics['final_train_loss_mean_last_10pct']:.4f} (test {test_loss:.4f}); "
          f"{metrics['images_per_second']:.0f} img/s; {len(sp.history)} splits; hit spread (p_max-p_min)*K "
          f"{b['mean_max_minus_min_times_K']:.2f} -> {a['mean_max_minus_min_times_K']:.2f}, dead nodes/layer "
          f"{b['mean_dead_nodes']:.1f} -> {a['mean_dead_nodes']:.1f}; guided super-res MSE {sr_mse:.4f} vs "
          f"random {rand_mse:.4f}; wrote {args.out}/", file=sys.stderr)
    return 0
