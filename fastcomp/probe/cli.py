"""`fastcomp probe MODEL`: Jacobian locality of a saved model, as text, JSON and a PNG.

Checkpoint format: the whole nn.Module, saved either with ``torch.save(model, path)`` (loaded with
``torch.load(path, weights_only=False)``, which runs pickled code: only probe files you trust) or as
TorchScript with ``torch.jit.save(torch.jit.script(model), path)``. A state_dict alone is not enough: the
probe needs the architecture. The model maps [B, C, H, W] -> [B, C', H, W]; with --sigmas it is a
denoiser called as model(x, sigma) and the probe reports the mass radius per noise level.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


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
    p.add_argument("model", type=Path, help="torch.save(module) or TorchScript file")
    p.add_argument("--radius", type=int, default=4, help="probe radius R: the profile is (2R+1)^2 (default 4)")
    p.add_argument("--method", choices=("auto", "exact", "colored"), default="auto")
    p.add_argument("--size", type=_size, default=(32, 32), help="image size N or HxW (default 32)")
    p.add_argument("--channels", type=int, default=3, help="input channels C (default 3)")
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


def load_model(path: Path, device) -> torch.nn.Module:
    """A TorchScript file or a torch.save'd module, in eval mode on `device`."""
    if not path.is_file():
        raise SystemExit(f"fastcomp probe: model file {path} does not exist")
    try:
        model = torch.jit.load(str(path), map_location=device)
    except RuntimeError:
        model = torch.load(path, map_location=device, weights_only=False)
    if isinstance(model, dict):
        raise SystemExit(f"fastcomp probe: {path} holds a state_dict; save the whole module instead "
                         f"(torch.save(model, path) or torch.jit.save(torch.jit.script(model), path))")
    if not callable(model):
        raise SystemExit(f"fastcomp probe: {path} holds a {type(model).__name__}, not a callable model")
    if isinstance(model, torch.nn.Module):
        model.eval()
    return model


def main(argv=None) -> int:
    from . import locality_vs_noise, pixel_locality

    args = parser().parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, device)
    if isinstance(model, torch.nn.Module):
        model.to(dtype)
    if args.input is not None:
        x = torch.load(args.input, map_location=device, weights_only=True).to(dtype)
    else:
        H, W = args.size
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.batch, args.channels, H, W, generator=g, dtype=torch.float64).to(device, dtype)
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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        json_path = args.out.with_name(args.out.name + ".json")
        json_path.write_text(json.dumps(summary, indent=1))
        try:
            import matplotlib

            matplotlib.use("Agg")
            ax = plot()
            png_path = args.out.with_name(args.out.name + ".png")
            ax.figure.savefig(png_path, dpi=120, bbox_inches="tight")
            print(f"wrote {json_path} and {png_path}")
        except ImportError:
            print(f"wrote {json_path} (no PNG: pip install 'fastcomp[plot]' for matplotlib)", file=sys.stderr)
    return 0
