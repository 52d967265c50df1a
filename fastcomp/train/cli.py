"""`fastcomp train`: train a ConditionalDenoiser on generated bumps or shape scenes.

    fastcomp train --task shapes --locality local --labelling one --steps 2000 --batch-size 64 --out runs/s
    fastcomp train ... --resume runs/s                  # go on from the newest checkpoint in runs/s
    torchrun --nproc-per-node 2 -m fastcomp.cli train ... # DDP: the batch is the global batch

Writes checkpoints (safetensors + JSON) and run.json (the command's options) into --out and prints
where the last checkpoint went.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcomp train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=("shapes", "bumps"), default="shapes",
                   help="shapes: coloured discs/squares (3 channels); bumps: one Gaussian bump (1 channel)")
    p.add_argument("--locality", choices=("local", "global"), default="local",
                   help="local: disk-masked local conditional attention; global: full attention")
    p.add_argument("--labelling", choices=("all", "one"), default="all",
                   help="shapes: label every object, or one chosen at random")
    p.add_argument("--max-objects", type=int, default=3, help="shapes: 1..N objects per training image")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--sigma-dist", choices=("lognormal", "laplace"), default="lognormal",
                   help="noise-level distribution: EDM's log-normal or the Laplace-in-log-SNR schedule")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64, help="the GLOBAL batch (split across processes)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    p.add_argument("--ema-decay", type=float, default=0.999, help="0 disables the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=500, help="0: only a final checkpoint")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile; auto: on CUDA only")
    p.add_argument("--device", default=None,
                   help="default: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu")
    p.add_argument("--out", required=True, help="directory for checkpoints and run.json")
    p.add_argument("--resume", default=None, help="a checkpoint file, or a directory (its newest checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def build_model_and_dataset(args, model_config=None):
    """(ConditionalDenoiser, dataset) for the options; model_config (from a checkpoint) overrides them."""
    try:
        from fastcomp.data import GaussianBumps, ShapeScenes
        from fastcomp.models import ConditionalDenoiser
    except ImportError as e:  # pragma: no cover - the message is the point
        raise SystemExit(f"fastcomp train needs fastcomp.data and fastcomp.models ({e})") from e
    if args.task == "bumps":
        dataset = GaussianBumps(size=args.image_size, seed=args.seed)
        channels = 1
    else:
        dataset = ShapeScenes(size=args.image_size, min_objects=1, max_objects=args.max_objects,
                              labelling=args.labelling, seed=args.seed)
        channels = 3
    if model_config is None:
        model_config = dict(img_channels=channels, image_size=args.image_size, channels=args.channels,
                            depth=args.depth, locality=args.locality)
    return ConditionalDenoiser(**model_config), dataset


def build_loss(args):
    """loss_fn(model, batch, generator): EDM's loss with the chosen noise-level distribution."""
    from fastcomp.models import LaplaceLogSNR, LogNormalSigma, edm_loss
    sigma_dist = LaplaceLogSNR() if args.sigma_dist == "laplace" else LogNormalSigma()

    def loss_fn(model, batch, generator):
        return edm_loss(model, batch, sigma_dist, generator=generator)

    return loss_fn


def _device(arg) -> torch.device:
    if arg is not None:
        return torch.device(arg)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import load_checkpoint
    from .loop import TrainConfig, train

    device = _device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        config = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps, grad_clip=args.grad_clip or None,
            ema_decay=args.ema_decay or None, seed=args.seed, log_every=args.log_every,
            checkpoint_every=args.checkpoint_every, out_dir=args.out, precision=args.precision,
            compile={"auto": "auto", "on": True, "off": False}[args.compile])
    except ValueError as e:
        print(f"fastcomp train: {e}", file=sys.stderr)
        return 2
    model_config = None
    if args.resume:
        # Rebuild the model the checkpoint was trained with (its .config), whatever the options say.
        model_config = load_checkpoint(args.resume).model_config
    torch.manual_seed(args.seed)  # the same initial weights on every DDP rank
    model, dataset = build_model_and_dataset(args, model_config)
    model.to(device)
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump({"command": "fastcomp train", "args": vars(args), "model_config":
                       getattr(model, "config", None)}, f, indent=1, default=str)
    result = train(model, dataset, config, loss_fn=build_loss(args),
                   resume=args.resume, progress=False if args.no_progress else None)
    if rank == 0:
        last = result.losses[-1] if result.losses else float("nan")
        print(f"trained {result.step} steps: final loss {last:.4f}, "
              f"{result.samples_per_second:.1f} samples/s over {result.seconds:.1f} s")
        print(f"checkpoint: {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
