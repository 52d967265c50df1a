"""`fastcomp probe MODEL`: Jacobian locality of a saved model, as text, JSON and a PNG.

MODEL is one of:
  - what `fastcomp train` writes: its run folder (the newest checkpoint that verifies) or one of its
    checkpoint-*.safetensors files. The model is rebuilt from the checkpoint's recorded config (EMA
    weights unless --weights model); no pickle is read. A ConditionalDenoiser is a denoiser: pass --sigmas,
    and it is conditioned on --points random points per image (seeded);
  - TorchScript, ``torch.jit.save(torch.jit.script(model), path)``;
  - a whole module saved with ``torch.save(model, path)``. Unpickling it can run any code the file names,
    so it is only read with --trust-pickle (files you made or trust); without it the file is loaded with
    ``weights_only=True``, which refuses pickled classes.
A state_dict alone is not enough: the probe needs the architecture. The model maps [B, C, H, W] ->
[B, C', H, W]; with --sigmas it is a denoiser called as model(x, sigma) (or model(x, sigma, points, valid))
and the probe reports the mass radius per noise level. NaN in the output means not measured (a NaN or
inf Jacobian); probe.json writes it as null.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path

import torch

from .. import _cli
from .._cli import CommandError
from ..train import load_checkpoint
from .noise import locality_vs_noise
from .pixel import pixel_locality


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        H, W = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be N or HxW (e.g. 32 or 32x48), got {text!r}") from None
    if len(parts) > 2 or H < 1 or W < 1:
        raise argparse.ArgumentTypeError(f"--size must be N or HxW with positive sides, got {text!r}")
    return H, W


def _sigmas(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sigmas must be comma-separated numbers, got {text!r}") from None
    if not values or any(not v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--sigmas must be noise levels >= 0, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcomp probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a fastcomp train run folder or checkpoint, a TorchScript file, or "
                   "a torch.save'd module (with --trust-pickle)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a torch.save'd module: unpickling runs code from the file, so only for files you trust")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="a fastcomp train checkpoint's EMA or raw weights (default ema)")
    p.add_argument("--points", type=int, default=1,
                   help="conditioner points per image for a conditional denoiser (default 1)")
    p.add_argument("--radius", type=int, default=4, help="probe radius R: the profile is (2R+1)^2 (default 4)")
    p.add_argument("--method", choices=("auto", "exact", "colored"), default="auto")
    p.add_argument("--size", type=_size, default=None,
                   help="image size N or HxW (default: a checkpoint's image size, else 32)")
    p.add_argument("--channels", type=int, default=None,
                   help="input channels C (default: a checkpoint's image channels, else 3)")
    p.add_argument("--batch", type=int, default=2, help="random inputs probed (default 2)")
    p.add_argument("--input", type=Path, default=None,
                   help="a torch.save'd [B, C, H, W] tensor to probe at instead of random normal inputs")
    p.add_argument("--sigmas", type=_sigmas, default=None,
                   help="comma-separated noise levels: the model is a denoiser model(x, sigma)")
    p.add_argument("--n-noise", type=int, default=1, help="noise draws per level with --sigmas (default 1)")
    p.add_argument("--chunk-size", type=int, default=None, help="probes per batched pass (default: automatic)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.png (OUT is a path prefix)")
    return p


def _is_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return any(path.glob("checkpoint-*.json"))
    return path.suffix in (".safetensors", ".json") and path.with_suffix(".json").is_file()


def load_checkpoint_model(path: Path, device, weights: str = "ema"):
    """(model, its config) rebuilt from a fastcomp train checkpoint's recorded class and config."""
    ckpt = load_checkpoint(str(path))
    name, config = ckpt.meta.get("model_class") or "", ckpt.model_config
    module_name, _, cls_name = name.rpartition(".")
    # Only fastcomp's own classes: a recorded name must not make the probe import arbitrary modules.
    if not module_name.startswith("fastcomp.") or not isinstance(config, dict):
        raise CommandError(f"{ckpt.path} records model class {name!r} with config {config!r}, which the probe "
                           "cannot rebuild (only fastcomp models with a recorded config)",
                           "save that model with torch.jit.save(torch.jit.script(model), path) and probe that")
    model = getattr(importlib.import_module(module_name), cls_name)(**config)
    if weights == "ema" and not ckpt.meta.get("has_ema"):
        weights = "model"  # trained without an EMA: the raw weights are all there is
    model.load_state_dict(ckpt.state_dict(weights))
    print(f"{path}: {cls_name} from {ckpt.path} (step {ckpt.step}, {weights} weights)")
    return model.to(device).eval(), config


def load_model(path: Path, device, trust_pickle: bool = False):
    """(the model in eval mode on `device`, its constructor config or None): a fastcomp train checkpoint,
    TorchScript, or (trust_pickle) a torch.save'd module."""
    if _is_checkpoint(path):
        return load_checkpoint_model(path, device)
    if not path.is_file():
        raise CommandError(f"model file {path} does not exist",
                           "pass a fastcomp train run folder or checkpoint, a TorchScript file or a torch.save'd module")
    with open(path, "rb") as f:
        head = f.read(2)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):  # torch.save writes a zip, older ones a pickle
        raise CommandError(f"{path} is not a model file (neither TorchScript, a torch.save archive, nor a "
                           "fastcomp checkpoint)", "pass the file the model was saved to")
    try:
        model = torch.jit.load(str(path), map_location=device)
    except RuntimeError:
        try:
            model = torch.load(path, map_location=device, weights_only=True)
        except pickle.UnpicklingError as e:
            if not trust_pickle:
                found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
                reason = f"it names {found.group(1)}" if found else ""
                raise CommandError(f"{path} is a pickled module, which weights_only=True refuses to load"
                                   + (f" ({reason})" if reason else ""),
                                   "if you made or trust the file, rerun with --trust-pickle: unpickling runs any "
                                   "code the file names; or probe a fastcomp train checkpoint or TorchScript "
                                   "file instead") from None
            warnings.warn(f"--trust-pickle: unpickling {path} with weights_only=False; this runs any code the "
                          "file names, so only do it for files you made or trust", UserWarning, stacklevel=2)
            model = torch.load(path, map_location=device, weights_only=False)
    if isinstance(model, dict):
        raise CommandError(f"{path} holds a state_dict, not a model",
                           "save the whole module (torch.jit.save(torch.jit.script(model), path) or "
                           "torch.save(model, path)), or probe the fastcomp train checkpoint it came from")
    if not callable(model):
        raise CommandError(f"{path} holds a {type(model).__name__}, not a callable model",
                           "save the model itself")
    if isinstance(model, torch.nn.Module):
        model.eval()
    return model, getattr(model, "config", None)


def _conditional(model) -> bool:
    """Does model's forward take conditioner points (a ConditionalDenoiser-like signature)?"""
    try:
        params = inspect.signature(model.forward if isinstance(model, torch.nn.Module) else model).parameters
    except (TypeError, ValueError):
        return False
    return "points" in params


def _json_safe(value):
    """NaN and inf -> None, so the file is standard JSON (json.dumps would write bare NaN tokens)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    device = _cli.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.points < 0:
        raise CommandError(f"--points {args.points} is negative", "pass a count >= 0")
    if args.out is not None:  # before the probes run, not after
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CommandError(f"--out {args.out}: cannot create {args.out.parent} ({e.strerror or e})",
                               "pass a path prefix in a directory you can write to") from None
    model, config = load_model(args.model, device, args.trust_pickle)
    if isinstance(model, torch.nn.Module):
        model.to(dtype)
    config = config if isinstance(config, dict) else {}
    if args.input is not None:
        x = torch.load(args.input, map_location=device, weights_only=True).to(dtype)
    else:
        size = config.get("image_size")
        H, W = args.size or ((size, size) if isinstance(size, int) else (32, 32))
        channels = args.channels or config.get("img_channels") or 3
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.batch, channels, H, W, generator=g, dtype=torch.float64).to(device, dtype)
    if _conditional(model):
        if args.sigmas is None:
            raise CommandError(f"{args.model} is a conditional denoiser, model(x, sigma, points)",
                               "pass --sigmas, e.g. --sigmas 0.1,1,10")
        B, _, H, W = x.shape
        g = torch.Generator().manual_seed(args.seed + 1)
        points = (torch.rand(B, args.points, 2, generator=g, dtype=torch.float64)
                  * torch.tensor([H - 1, W - 1], dtype=torch.float64)).to(device, dtype)
        denoiser = model

        def model(t, sigma):  # noqa: F811 - the probe's view of the conditional denoiser
            return denoiser(t, sigma, points)
    try:  # one plain call first: an input the model refuses is the user's to fix, not a probe failure
        with torch.no_grad():
            model(x) if args.sigmas is None else model(x, args.sigmas[0])
    except (RuntimeError, ValueError, TypeError) as e:
        raise CommandError(f"{args.model} refused an input of shape {list(x.shape)}"
                           + ("" if args.sigmas is None else f" at sigma {args.sigmas[0]}")
                           + f": {e}", "pass the --channels and --size it takes (or --sigmas for a denoiser "
                           "model(x, sigma))") from None
    common = dict(radius=args.radius, method=args.method, chunk_size=args.chunk_size)
    if args.sigmas is None:
        res = pixel_locality(model, x, **common)
        summary = {"model": str(args.model), "shape": list(x.shape), "radius": res.radius, "method": res.method,
                   "leakage": res.leakage, "mass_radius": {f"{100 * q:g}": res.mass_radius(q)
                                                           for q in (0.5, 0.75, 0.95, 1.0)},
                   "profile": res.profile.tolist()}
        print(f"{args.model}: {res.method} probe at radius {res.radius}, leakage {res.leakage:.3g}; mass radius "
              + ", ".join(f"{k}%: {v}" for k, v in summary["mass_radius"].items()))
        plot = res.plot
    else:
        res = locality_vs_noise(model, x, args.sigmas, n_noise=args.n_noise, seed=args.seed, **common)
        summary = {"model": str(args.model), "shape": list(x.shape), "radius": res.radius, "method": res.method,
                   "levels": res.rows()}
        for row in res.rows():
            print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        plot = res.plot
    if args.out is not None:
        json_path = args.out.with_name(args.out.name + ".json")
        json_path.write_text(json.dumps(_json_safe(summary), indent=1, allow_nan=False))
        try:
            import matplotlib  # optional (fastcomp[plot]): only needed for the PNG

            matplotlib.use("Agg")
            ax = plot()
            png_path = args.out.with_name(args.out.name + ".png")
            ax.figure.savefig(png_path, dpi=120, bbox_inches="tight")
            print(f"wrote {json_path} and {png_path}")
        except ImportError:
            print(f"wrote {json_path} (no PNG: pip install 'fastcomp[plot]' for matplotlib)", file=sys.stderr)
    return 0
