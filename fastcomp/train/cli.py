"""`fastcomp train`: train a ConditionalDenoiser on generated bumps or shape scenes.

    fastcomp train --task shapes --locality local --labelling one --steps 2000 --batch-size 64 --out runs/s
    fastcomp train ... --resume runs/s                  # go on from the newest checkpoint in runs/s
    torchrun --nproc-per-node 2 -m fastcomp.cli train ... # DDP: the batch is the global batch

Writes checkpoints (safetensors + JSON) and run.json (the command's options) into --out and prints
where the last checkpoint went.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

from fastcomp.models import LaplaceLogSNR, LogNormalSigma, edm_loss

from .. import _cli
from .._cli import CommandError
from .checkpoint import load_checkpoint
from .loop import TrainConfig, prepare_out_dir, train


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
    p.add_argument("--resume", default=None,
                   help="a checkpoint file, or a directory (its newest checkpoint that verifies); flags not "
                        "given are taken from the resumed run, and given ones must match it")
    p.add_argument("--overwrite", action="store_true",
                   help="--out may hold another run's checkpoints: delete them and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# Flags that define what a run computes: a resumed run takes them from its checkpoint, and refuses
# different values given on the command line. The others (steps, logging, checkpointing, compile, device,
# paths) may change when resuming.
RUN_FLAGS = ("task", "locality", "labelling", "max_objects", "image_size", "channels", "depth", "sigma_dist",
             "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "ema_decay", "seed", "precision")
KEPT_ON_RESUME = ("steps", "log_every", "checkpoint_every", "compile")  # unless given again


def explicit_flags(parser: argparse.ArgumentParser, argv) -> set:
    """The dests of the options given on the command line (not left at their defaults)."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(bare.parse_args(argv)))


def merge_resumed_args(args, explicit: set, recorded: dict) -> argparse.Namespace:
    """The resumed run's flags (recorded in its checkpoint) updated by those given now; a given RUN_FLAGS
    value that differs from the recorded one is refused, naming every such flag."""
    differ = [f"--{k.replace('_', '-')} {recorded[k]} (given: {getattr(args, k)})" for k in RUN_FLAGS
              if k in explicit and k in recorded and recorded[k] != getattr(args, k)]
    if differ:
        raise CommandError(f"--resume {args.resume}: the run was trained with " + ", ".join(differ),
                           "drop those flags (a resumed run keeps its own) or start a fresh run with another --out")
    merged = argparse.Namespace(**vars(args))
    for k in RUN_FLAGS + KEPT_ON_RESUME:
        if k not in explicit and k in recorded:
            setattr(merged, k, recorded[k])
    return merged


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
    sigma_dist = LaplaceLogSNR() if args.sigma_dist == "laplace" else LogNormalSigma()

    def loss_fn(model, batch, generator):
        return edm_loss(model, batch, sigma_dist, generator=generator)

    return loss_fn


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    device = _cli.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ckpt, model_config = None, None
    if args.resume:
        ckpt = load_checkpoint(args.resume)  # verified; a directory falls back to its newest intact one
        recorded = (ckpt.extra.get("run") or {}).get("args")
        if isinstance(recorded, dict):
            args = merge_resumed_args(args, explicit_flags(parser, argv), recorded)
        else:
            print(f"fastcomp train: {ckpt.path} records no command line (not written by fastcomp train): "
                  "its model is rebuilt from its config, the data flags are taken as given", file=sys.stderr)
        # Rebuild the model the checkpoint was trained with (its .config); train() refuses a mismatch.
        model_config = ckpt.model_config
    try:
        config = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps, grad_clip=args.grad_clip or None,
            ema_decay=args.ema_decay or None, seed=args.seed, log_every=args.log_every,
            checkpoint_every=args.checkpoint_every, out_dir=args.out, precision=args.precision,
            compile={"auto": "auto", "on": True, "off": False}[args.compile])
    except ValueError as e:
        raise _cli.CommandError(str(e), "fix the flag") from None
    rank = int(os.environ.get("RANK", 0))
    # Before run.json is written: a folder holding another run is refused here, not after overwriting it.
    prepare_out_dir(args.out, resume_from=args.resume, overwrite=args.overwrite, rank=rank)
    torch.manual_seed(args.seed)  # the same initial weights on every DDP rank
    model, dataset = build_model_and_dataset(args, model_config)
    model.to(device)
    run_info = {"command": "fastcomp train", "args": {k: v for k, v in vars(args).items()
                                                      if k not in ("resume", "overwrite", "no_progress")}}
    if rank == 0:
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump({**run_info, "resumed_from": ckpt.path if ckpt else None,
                       "model_config": getattr(model, "config", None)}, f, indent=1, default=str)
    result = train(model, dataset, config, loss_fn=build_loss(args), resume=ckpt if ckpt else None,
                   overwrite=args.overwrite, progress=not args.no_progress, run_info=run_info)
    if rank == 0:
        last = result.losses[-1] if result.losses else float("nan")
        print(f"trained {result.step} steps: final loss {last:.4f}, "
              f"{result.samples_per_second:.1f} samples/s over {result.seconds:.1f} s")
        print(f"checkpoint: {result.checkpoint}")
    return 0


if __name__ == "__main__":
    from .._cli import run

    sys.exit(run("train", main, sys.argv[1:]))
