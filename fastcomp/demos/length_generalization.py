"""`fastcomp demo length-generalization`: Bradley's experiments 1-3 (arXiv 2509.16447) in miniature.

Train conditional diffusion models on ShapeScenes with 1-3 objects, conditioned on object locations, then
ask for 0 and 1..6 objects and score whether the generated image holds exactly the requested objects
(fastcomp.data.length_generalization: detected objects match the requests one-to-one within a tolerance):

    exp1  global model, every object labelled          -> should length-generalize
    exp2  global model, one random object labelled     -> should not
    exp3  local model (disk-masked local conditional attention, local convs), exp2's data
                                                       -> local conditional scores: generalizes again
    exp2/exp3 + composed: the same trained models sampled with projective composition
          (sum_i D(x | c_i) - (k - 1) D(x | none)), which builds the composition into the sampler

Next to each score the table shows the trained model's locality: the pixel radius holding 50 / 95 % of
the denoiser's Jacobian mass (fastcomp.probe.locality_vs_noise), the Jacobian mass beyond the probe radius
(leakage), and the fraction of each conditioner's influence inside a disk around it
(fastcomp.probe.conditioner_locality).

Writes into --out:
    results.md     the table (experiment x object count, locality columns) and the settings
    results.json   every number (scores, detections, losses, probe rows, timings, settings)
    samples.png    sample grids per experiment with the requested locations marked
    locality.png   locality vs noise level per experiment
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings

import torch

from fastcomp import disk_mask
from fastcomp.data import ShapeScenes, length_generalization, plot_grid, request_locations
from fastcomp.models import ConditionalDenoiser, composed_sample, edm_loss, sample
from fastcomp.probe import LeakageWarning, conditioner_locality, locality_vs_noise
from fastcomp.train import TrainConfig, train

from . import _options

EXPERIMENTS = {  # name -> (locality, labelling, what it shows)
    "exp1": ("global", "all", "global model, every object labelled"),
    "exp2": ("global", "one", "global model, one object labelled"),
    "exp3": ("local", "one", "local model, one object labelled"),
}

# Defaults: about 36 CPU-minutes on one thread (training ~0.35 s a step, ~75 %; sampling ~15 %; probes ~10 %),
# so roughly 20-25 minutes on 2 idle cores. The prototype at 800 steps (32 samples per count) gave exp3 0.05-0.10
# and exp2 0.00 on 4-6 objects; the objects are still blurry there, hence the longer default.
DEFAULTS = dict(steps=1500, batch_size=32, channels=64, depth=3, kernel_size=3, patch_size=2, cond_radius=5.0,
                lr=1e-3, samples=48, sampler_steps=12, max_objects_eval=6, cond_dropout=0.1, probe_images=1,
                probe_radius=6, sigma_dist="laplace", global_rope=True)
QUICK = dict(steps=12, batch_size=8, channels=16, depth=1, kernel_size=3, patch_size=2, cond_radius=5.0,
             lr=2e-3, samples=4, sampler_steps=3, max_objects_eval=4, cond_dropout=0.1, probe_images=1,
             probe_radius=3, sigma_dist="laplace", global_rope=True)
PROBE_SIGMAS = (0.05, 0.5, 5.0)
INSIDE_RADIUS = 10.0  # pixels: the conditioner-locality disk (objects have radius 3)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcomp demo length-generalization", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny run of the whole pipeline (< 2 minutes; "
                   "checks the plumbing, not the science)")
    p.add_argument("--out", default=os.path.join("results", "demo-length-generalization"), help="output directory")
    p.add_argument("--experiments", default="exp1,exp2,exp3", help="comma-separated subset of exp1,exp2,exp3")
    p.add_argument("--no-composed", action="store_true", help="skip the projective-composition rows")
    for key, kind, help_ in (("steps", int, "training steps per model"), ("batch_size", int, "batch size"),
                             ("channels", int, "model width"), ("depth", int, "denoiser blocks"),
                             ("kernel_size", int, "local attention window (tokens)"),
                             ("patch_size", int, "pixels per token side"),
                             ("cond_radius", float, "pixels around a conditioner that attend it (local model)"),
                             ("lr", float, "peak learning rate"), ("samples", int, "generated images per object count"),
                             ("sampler_steps", int, "Heun steps of the sampler"),
                             ("max_objects_eval", int, "evaluate 0..N requested objects"),
                             ("cond_dropout", float, "training the global models: probability of dropping a sample's "
                                                     "conditioners (teaches D(x | none) for the composed sampler; "
                                                     "a local model learns it far from its conditioners, and "
                                                     "dropping the label would teach it unlabelled objects)")):
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                       help=f"{help_} (default {DEFAULTS[key]}, --quick {QUICK[key]})")
    _options.add_noise_level_arguments(p, DEFAULTS["sigma_dist"])
    p.add_argument("--no-global-rope", dest="global_rope", action="store_const", const=False, default=None,
                   help="global models without the rotary position embedding (ConditionalDenoiser(rope=False)): "
                        "in our runs they then ignore their conditioners and score 0 even in experiment 1")
    p.add_argument("--tolerance", type=float, default=None, help="matching tolerance in pixels (default: the "
                   "metric's own)")
    p.add_argument("--no-probes", action="store_true", help="skip the locality probes")
    _options.add_run_arguments(p, "checkpoints-<exp>")
    return p


def _log(msg: str, progress) -> None:
    if progress is not False:
        print(msg, file=sys.stderr, flush=True)


def train_model(name: str, s: dict, args, progress):
    """Train one experiment's model on ShapeScenes(1..3 objects, its labelling); returns (net, info)."""
    locality, labelling, _ = EXPERIMENTS[name]
    data = ShapeScenes(size=32, min_objects=1, max_objects=3, labelling=labelling, radius=3, seed=args.seed)
    torch.manual_seed(args.seed)
    model = ConditionalDenoiser(img_channels=3, image_size=32, channels=s["channels"], depth=s["depth"],
                                num_heads=max(1, s["channels"] // 16), kernel_size=s["kernel_size"],
                                locality=locality, cond_radius=s["cond_radius"], patch_size=s["patch_size"],
                                rope=bool(s["global_rope"]))
    config = TrainConfig(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"],
                         warmup_steps=min(100, max(1, s["steps"] // 10)), grad_clip=1.0,
                         ema_decay=0.995 if s["steps"] >= 1000 else (0.98 if s["steps"] >= 200 else 0.5),
                         seed=args.seed, log_every=max(1, min(25, s["steps"] // 4)),
                         out_dir=os.path.join(args.out, f"checkpoints-{name}") if args.checkpoints else None,
                         precision="auto", compile=False)
    sigma_dist = _options.distribution(s)
    dropout = s["cond_dropout"] if locality == "global" else 0.0

    def loss_fn(m, batch, generator):
        return edm_loss(m, batch, sigma_dist, generator=generator, cond_dropout=dropout)

    _log(f"[{name}] {locality} model on labelling={labelling!r}: {s['steps']} steps, batch {s['batch_size']}, "
         f"{sum(p.numel() for p in model.parameters())} parameters", progress)
    result = train(model, data, config, loss_fn=loss_fn, progress=progress)
    net = (result.ema if result.ema is not None else result.model).eval()
    tail = result.losses[-50:]
    info = dict(locality=locality, labelling=labelling, config=net.config, cond_dropout=dropout,
                train_seconds=result.seconds,
                samples_per_second=result.samples_per_second, final_loss=sum(tail) / len(tail),
                losses_every_25=[float(v) for v in result.losses[::25]])
    return net, info


def evaluate(net, s: dict, args, progress, composed: bool) -> dict:
    """Sample s['samples'] images for each requested object count 0..max and score them. The requests and
    the initial noise depend only on (seed, count), so every model answers the same questions."""
    sampler = composed_sample if composed else sample
    counts, images = {}, {}
    for k in range(s["max_objects_eval"] + 1):
        g_req = torch.Generator().manual_seed(args.seed * 1000 + 17 + k)
        points, valid = request_locations(s["samples"], k, size=32, max_objects=s["max_objects_eval"], radius=3,
                                          generator=g_req)
        g_noise = torch.Generator().manual_seed(args.seed * 1000 + 500 + k)
        imgs = sampler(net, points, valid, steps=s["sampler_steps"], generator=g_noise, progress=False)
        kw = {} if args.tolerance is None else {"tolerance": args.tolerance}
        match = length_generalization(imgs, points, valid, **kw)
        counts[k] = dict(score=float(match.score), mean_detected=float(match.num_detected.float().mean()),
                         exact_count=float((match.num_detected == k).float().mean()))
        images[k] = (imgs, points, valid, match.matched)
    return dict(counts=counts, images=images)


def reference_copy(net):
    """The same weights on the reference attention: plain PyTorch, so forward-mode and vmapped probes run."""
    twin = ConditionalDenoiser(**{**net.config, "backend": "reference"})
    twin.load_state_dict(net.state_dict())
    return twin.eval()


def probe(net, s: dict, args) -> dict:
    """Pixel locality vs noise and conditioner locality of a trained model, on requests of 3 objects."""
    twin = reference_copy(net)
    n = s["probe_images"]
    g = torch.Generator().manual_seed(args.seed + 99)
    points, valid = request_locations(n, 3, size=32, max_objects=3, radius=3, generator=g)
    x0 = ShapeScenes(size=32, min_objects=3, max_objects=3, labelling="all", radius=3,
                     seed=args.seed + 7).sample(n, generator=g).images
    with warnings.catch_warnings():
        # a global model is not radius-local: the probe reports its sampled leakage instead of aliasing
        warnings.simplefilter("ignore", LeakageWarning)
        noise = locality_vs_noise(lambda x, sigma: twin(x, sigma, points, valid), x0, PROBE_SIGMAS,
                                  radius=s["probe_radius"], quantiles=(0.5, 0.95), on_leakage="report", progress=False)
    sigma_mid = 0.5
    x = x0 + sigma_mid * torch.randn(x0.shape, generator=g)
    inside_mask = disk_mask(points, INSIDE_RADIUS, 32, 32) & valid[:, :, None, None]
    cond = conditioner_locality(lambda t, c: twin(t, sigma_mid, c, valid), x, points, inside_mask,
                                progress=False)
    inside = cond.inside_fraction[valid]
    return dict(pixel=noise.rows(), noise_locality=noise,
                cond_inside_fraction=float(inside[torch.isfinite(inside)].mean()) if inside.numel() else float("nan"),
                cond_sigma=sigma_mid, cond_radius_px=INSIDE_RADIUS)


def write_samples(path: str, rows: list, counts: tuple, n_show: int) -> None:
    """rows: (label, eval result); one grid row per (experiment, object count)."""
    import matplotlib.pyplot as plt  # optional (fastcomp[demo]): imported only to plot

    images, points, valid, titles = [], [], [], []
    width = max(counts)
    for label, ev in rows:
        for k in counts:
            imgs, pts, val, matched = ev["images"][k]
            images.append(imgs[:n_show].clamp(-1, 1))
            pts, val = pts[:n_show], val[:n_show]
            pad = width - pts.shape[1]  # every row to the same number of request slots
            points.append(torch.cat([pts, pts.new_zeros(pts.shape[0], max(pad, 0), 2)], 1)[:, :max(width, 1)])
            valid.append(torch.cat([val, val.new_zeros(val.shape[0], max(pad, 0))], 1)[:, :max(width, 1)])
            titles += [(f"{label} k={k}: " if j == 0 else "") + ("ok" if bool(m) else "miss")
                       for j, m in enumerate(matched[:n_show].tolist())]
    fig = plot_grid(torch.cat(images), torch.cat(points), torch.cat(valid), path=path, ncol=n_show, titles=titles)
    plt.close(fig)


def write_locality_plot(path: str, probes: dict) -> None:
    import matplotlib  # optional (fastcomp[demo]): imported only to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(probes)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        probes[name]["noise_locality"].plot(ax=ax, title=f"{name}: {EXPERIMENTS[name][2]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list, probes: dict, max_k: int) -> str:
    """Experiment x object count scores, the mean over 4+ objects, and the locality columns."""
    ks = list(range(max_k + 1))
    far = [k for k in ks if k >= 4]
    head = (["experiment", "model", "labels", "sampler"] + [f"k={k}" for k in ks]
            + ([f"mean k={far[0]}-{far[-1]}"] if far else [])
            + ["r50 / r95 px (sigma 0.05, 0.5, 5)", "leakage", "cond. inside"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, name, sampler, ev in rows:
        loc, lab, _ = EXPERIMENTS[name]
        scores = [ev["counts"][k]["score"] for k in ks]
        cells = [label, loc, lab, sampler] + [f"{v:.2f}" for v in scores]
        if far:
            cells.append(f"**{sum(scores[k] for k in far) / len(far):.2f}**")
        p = probes.get(name)
        if p is None:
            cells += ["", "", ""]
        else:
            cells.append(", ".join(f"{r['radius_50']}/{r['radius_95']}" for r in p["pixel"]))
            cells.append(", ".join(f"{r['leakage']:.2g}" for r in p["pixel"]))
            cells.append(f"{p['cond_inside_fraction']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    s = _options.settings(args, DEFAULTS, QUICK)
    prog = "fastcomp demo length-generalization"
    names = _options.names(prog, "--experiments", args.experiments, EXPERIMENTS)
    if names is None:
        return 2
    try:
        import fastcomp.data  # noqa: F401
        import fastcomp.train  # noqa: F401
    except ImportError as e:  # pragma: no cover - the message is the point
        raise SystemExit(f"fastcomp demo length-generalization needs fastcomp.data and fastcomp.train ({e})") from e
    if args.threads:
        torch.set_num_threads(args.threads)
    if not _options.positive(prog, s, ("steps", "batch_size", "channels", "depth", "samples", "sampler_steps",
                                       "max_objects_eval")):
        return 2
    os.makedirs(args.out, exist_ok=True)
    progress = False if args.no_progress else None
    t0 = time.perf_counter()
    rows, probes, trained, timings = [], {}, {}, {}
    for name in names:
        t = time.perf_counter()
        net, info = train_model(name, s, args, progress)
        trained[name] = info
        timings[f"{name} train"] = time.perf_counter() - t
        t = time.perf_counter()
        _log(f"[{name}] sampling {s['samples']} images per object count 0..{s['max_objects_eval']}", progress)
        rows.append((name, name, "heun", evaluate(net, s, args, progress, composed=False)))
        if not args.no_composed and EXPERIMENTS[name][1] == "one":
            rows.append((f"{name}+composed", name, "composed", evaluate(net, s, args, progress, composed=True)))
        timings[f"{name} sample"] = time.perf_counter() - t
        if not args.no_probes:
            t = time.perf_counter()
            _log(f"[{name}] locality probes", progress)
            probes[name] = probe(net, s, args)
            timings[f"{name} probe"] = time.perf_counter() - t
        _log(f"[{name}] " + ", ".join(f"k={k} {c['score']:.2f}" for k, c in rows[-1][3]["counts"].items()), progress)
    total = time.perf_counter() - t0

    table = markdown_table(rows, probes, s["max_objects_eval"])
    counts = tuple(k for k in (1, 3, 5, s["max_objects_eval"]) if k <= s["max_objects_eval"])
    write_samples(os.path.join(args.out, "samples.png"), [(r[0], r[3]) for r in rows], tuple(sorted(set(counts))),
                  n_show=min(6, s["samples"]))
    if probes:
        write_locality_plot(os.path.join(args.out, "locality.png"), probes)
    results = {
        "demo": "length-generalization", "quick": args.quick, "settings": s, "seed": args.seed,
        "torch_threads": torch.get_num_threads(), "total_seconds": total, "timings_seconds": timings,
        "training": trained,
        "scores": {label: {str(k): c for k, c in ev["counts"].items()} for label, _, _, ev in rows},
        "probes": {name: {k: v for k, v in p.items() if k != "noise_locality"} for name, p in probes.items()},
        "probe_settings": dict(sigmas=PROBE_SIGMAS, radius_px=s["probe_radius"], inside_radius_px=INSIDE_RADIUS),
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("# fastcomp demo length-generalization\n\n"
                f"ShapeScenes 32x32, trained on 1-3 objects; score = fraction of {s['samples']} samples whose "
                f"detected objects match the k requested locations one-to-one (fastcomp.data.length_generalization). "
                f"Models: {s['channels']} channels, depth {s['depth']}, patch {s['patch_size']}, window "
                f"{s['kernel_size']} tokens, cond radius {s['cond_radius']:g} px; {s['steps']} steps of batch "
                f"{s['batch_size']}, lr {s['lr']:g}, conditioner dropout {s['cond_dropout']:g} (global models only; they attend with{'' if s['global_rope'] else 'out'} a 2-D rotary position embedding), "
                f"noise levels {s['sigma_dist']}({s['sigma_loc']:g}, {s['sigma_scale']:g}); EMA weights; Heun with {s['sampler_steps']} steps. Locality columns: mass radii (50 % / 95 %) "
                f"of the denoiser's "
                f"pixel Jacobian within a {2 * s['probe_radius'] + 1}-px square, its leakage beyond it, and the "
                f"fraction of each conditioner's influence within {INSIDE_RADIUS:g} px of it (sigma 0.5). "
                f"Total {total:.0f} s.\n\n{table}\n")
    print(table)
    print(f"\nwrote {args.out}/results.md, results.json, samples.png" + (", locality.png" if probes else "")
          + f" ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
