"""`fastcomp study length-generalization`: does length generalization follow conditioner locality, across the
conditioning designs people use, and does making only the conditioner path local restore it on the same
network? (Bradley, arXiv 2509.16447, tested quantitatively.)

Trains every design of fastcomp.models.VARIANTS (tokens-rope, tokens-abs, unet, vector) x {every object
labelled, one label} x {as is, intervention: local_conditioners=True}, plus the fully local model of
experiment 3 on one-label data, on ShapeScenes with 1-3 objects; asks each for 0-8 objects and measures:

    score      one-to-one: the detected objects match the requests exactly (fastcomp.data.length_generalization)
    recall     requested objects found at their place (a maximum matching within the tolerance)
    extras     detected objects nobody asked for, per image (one-label data teaches them: a one-label
               model that reproduces its data scores about 0.32 at k = 1)
    r50 / r95  pixel Jacobian mass radii at three noise levels and the leakage beyond the probe radius
               (fastcomp.probe.locality_vs_noise)
    inside     the fraction of each conditioner's influence on the output within INSIDE_RADIUS px of it
               (fastcomp.probe.conditioner_locality)

and relates the mean score on 4-6 objects to the inside fraction over models (Spearman's rank correlation
with a bootstrap interval over models). `--seeds 2` repeats the one-label rows with a second seed.

Each model is cached under --cache (default OUT/cache, which holds a .gitignore): its training checkpoint,
its metrics and its sample images, keyed by a hash of everything that determines them, so an interrupted
or extended study resumes and skips finished models (change an evaluation setting and only the evaluation
reruns). Writes into --out:

    results.md                    the tables and the correlation
    results.json                  every number (per model: scores, recall, extras per count, probes, timings)
    generalization-vs-locality.png  mean score on 4-6 objects against the conditioner inside fraction
    samples-<variant>.png         sample grids per design (requests marked; ok / miss per sample)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import disk_mask
from ..data import ShapeScenes, length_generalization, plot_grid, request_locations, request_recall
from ..demos import _options
from ..models import VARIANTS, build_denoiser, edm_loss, sample
from ..probe import LeakageWarning, conditioner_locality, locality_vs_noise
from ..train import TrainConfig, train

# Bump when the code changes what a cached model means: TRAIN_VERSION retrains every model, EVAL_VERSION
# re-samples and re-probes the trained ones.
TRAIN_VERSION = 1
EVAL_VERSION = 1
LABELLINGS = ("all", "one")
DEFAULT_VARIANTS = ("tokens-rope", "tokens-abs", "unet", "vector", "local")

# Defaults: the committed length-generalization demo's model and schedule (its exp1 / exp2 / exp3 are this
# study's tokens-rope/all, tokens-rope/one and local/one), 17 models. CPU cost on one thread: training
# 0.12 (unet) to 0.46 (vector + intervention) s a step, ~6 CPU-hours in all... see results.md for the run.
DEFAULTS = dict(steps=1500, batch_size=32, channels=64, depth=3, kernel_size=3, patch_size=2, cond_radius=5.0,
                lr=1e-3, samples=48, sampler_steps=12, max_objects_eval=8, probe_images=1, cond_probe_images=4,
                probe_radius=6, sigma_dist="laplace")
QUICK = dict(steps=4, batch_size=4, channels=16, depth=1, kernel_size=3, patch_size=2, cond_radius=5.0,
             lr=2e-3, samples=2, sampler_steps=2, max_objects_eval=4, probe_images=1, cond_probe_images=1,
             probe_radius=2, sigma_dist="laplace")
PROBE_SIGMAS = (0.05, 0.5, 5.0)
QUICK_PROBE_SIGMAS = (0.5,)
COND_SIGMA = 0.5
INSIDE_RADIUS = 10.0  # pixels: the conditioner-locality disk (objects have radius 3), as in the demo
FAR = (4, 5, 6)  # "generalization": the mean over these requested counts (training saw 1-3 objects)
GRID_COUNTS = (1, 4, 6, 8)
N_SHOW = 6
BOOTSTRAP = 2000


@dataclass(frozen=True)
class ModelSpec:
    """One model of the study: a design, as is or with its intervention, trained on one labelling, one seed."""

    variant: str
    intervention: bool
    labelling: str
    seed: int

    @property
    def design(self) -> str:
        return self.variant + ("+local-cond" if self.intervention else "")

    @property
    def name(self) -> str:
        return f"{self.design}/{self.labelling}" + (f"#{self.seed}" if self.seed else "")

    @property
    def slug(self) -> str:
        return f"{self.design}_{self.labelling}_s{self.seed}"


def plan(variants, seeds: int) -> list:
    """The models: every variant x labelling x {as is, intervention}; the local model on one-label data only
    (it is experiment 3); seeds > 1 repeats the one-label rows."""

    specs = []
    for variant in variants:
        has_intervention = VARIANTS[variant][1]
        for labelling in (("one",) if variant == "local" else LABELLINGS):
            for seed in range(seeds if labelling == "one" else 1):
                for intervention in ((False, True) if has_intervention else (False,)):
                    specs.append(ModelSpec(variant, intervention, labelling, seed))
    return specs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcomp study length-generalization", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the whole pipeline on tiny settings (about a minute; "
                   "checks the plumbing, not the science)")
    p.add_argument("--out", default=os.path.join("results", "study-length-generalization"), help="output directory")
    p.add_argument("--cache", default=None, help="model cache (default OUT/cache; it writes a .gitignore there)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of {','.join(DEFAULT_VARIANTS)}")
    p.add_argument("--seeds", type=int, default=1, help="seeds of the one-label rows (the every-label rows use "
                   "seed 0 only)")
    for key, kind, help_ in (("steps", int, "training steps per model"), ("batch_size", int, "batch size"),
                             ("channels", int, "width of the token and vector models (the U-Net: 7/16 of it)"),
                             ("depth", int, "blocks of the token and vector models"),
                             ("kernel_size", int, "the local model's attention window (tokens)"),
                             ("patch_size", int, "pixels per token side"),
                             ("cond_radius", float, "pixels around a conditioner that see it (local model and "
                                                    "every intervention)"),
                             ("lr", float, "peak learning rate"), ("samples", int, "generated images per object count"),
                             ("sampler_steps", int, "Heun steps of the sampler"),
                             ("max_objects_eval", int, "evaluate 0..N requested objects")):
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                       help=f"{help_} (default {DEFAULTS[key]}, --quick {QUICK[key]})")
    _options.add_noise_level_arguments(p, DEFAULTS["sigma_dist"])
    p.add_argument("--no-probes", action="store_true", help="skip the locality probes (no correlation then)")
    p.add_argument("--seed", type=int, default=0, help="base seed (model i of seed s trains with base + s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice; on a busy "
                   "machine 1 is often faster)")
    p.add_argument("--jobs", type=int, default=1, help="models trained at once, each in its own process sharing "
                   "the cache, the cores split among them (small models use 2 processes of 1 thread better than 1 "
                   "of 2: --jobs 2 on 2 cores)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set by --jobs for its helpers
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _start_workers(argv: list, jobs: int, threads: Optional[int]) -> list:
    """jobs - 1 helper processes of this same study: each walks the model list from another starting point
    and trains what is not cached yet (the per-model lock keeps two from training one model); this process
    walks it from the start and writes the results once every model is cached."""
    child, drop_next = [], False
    for a in argv:  # this invocation's arguments without "--jobs N" / "--jobs=N" / "--threads N"
        if drop_next:
            drop_next = False
        elif a in ("--jobs", "--threads"):
            drop_next = True
        elif not a.startswith(("--jobs=", "--threads=")):
            child.append(a)
    child += ["--no-progress", "--threads", str(threads or 1)]
    code = "import sys; from fastcomp.study.length_generalization import main; sys.exit(main(sys.argv[1:]))"
    return [subprocess.Popen([sys.executable, "-c", code, *child, "--worker", str(k), "--jobs", str(jobs)])
            for k in range(1, jobs)]


def _log(msg: str, progress) -> None:
    if progress is not False:
        print(msg, file=sys.stderr, flush=True)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class _Clock:
    """Wall and process CPU seconds of a phase, and the 1-minute load average at its start and end."""

    def __init__(self):
        self.t, self.c, self.load = time.perf_counter(), time.process_time(), os.getloadavg()[0]

    def done(self) -> dict:
        return dict(wall=time.perf_counter() - self.t, cpu=time.process_time() - self.c,
                    load=[self.load, os.getloadavg()[0]])


# ----------------------------------------------------------------------------------------------- one model

def model_kwargs(spec: ModelSpec, s: dict) -> dict:
    return dict(local_conditioners=spec.intervention, channels=s["channels"], depth=s["depth"],
                num_heads=max(1, s["channels"] // 16), kernel_size=s["kernel_size"], cond_radius=s["cond_radius"],
                patch_size=s["patch_size"])


def train_key(spec: ModelSpec, s: dict, base_seed: int) -> dict:
    keys = ("steps", "batch_size", "lr", "sigma_dist", "sigma_loc", "sigma_scale")
    return dict(version=TRAIN_VERSION, variant=spec.variant, labelling=spec.labelling, seed=base_seed + spec.seed,
                model=model_kwargs(spec, s), train={k: s[k] for k in keys})


def eval_key(s: dict, quick: bool) -> dict:
    keys = ("samples", "sampler_steps", "max_objects_eval", "probe_images", "cond_probe_images", "probe_radius")
    return dict(version=EVAL_VERSION, eval={k: s[k] for k in keys}, probe_sigmas=_probe_sigmas(quick),
                cond_sigma=COND_SIGMA, inside_radius=INSIDE_RADIUS)


def _probe_sigmas(quick: bool) -> tuple:
    return QUICK_PROBE_SIGMAS if quick else PROBE_SIGMAS


def train_model(spec: ModelSpec, s: dict, base_seed: int, out_dir: str, progress):
    """Train (or resume, or load when finished) one model; returns (EMA net, info)."""

    seed = base_seed + spec.seed
    data = ShapeScenes(size=32, min_objects=1, max_objects=3, labelling=spec.labelling, radius=3, seed=seed)
    torch.manual_seed(seed)  # as-is and intervention start from the same weights
    model = build_denoiser(spec.variant, **model_kwargs(spec, s))
    config = TrainConfig(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"],
                         warmup_steps=min(100, max(1, s["steps"] // 10)), grad_clip=1.0,
                         ema_decay=0.995 if s["steps"] >= 1000 else (0.98 if s["steps"] >= 200 else 0.5),
                         seed=seed, log_every=max(1, min(25, s["steps"] // 4)), out_dir=out_dir,
                         checkpoint_every=max(1, s["steps"] // 6), keep_checkpoints=1, precision="auto",
                         compile=False)
    sigma_dist = _options.distribution(s)

    def loss_fn(m, batch, generator):  # no conditioner dropout: every design trains on exactly the same task
        return edm_loss(m, batch, sigma_dist, generator=generator)

    resume = out_dir if os.path.isdir(out_dir) and any(f.endswith(".json") for f in os.listdir(out_dir)) else None
    params = sum(p.numel() for p in model.parameters())
    _log(f"[{spec.name}] {params} parameters, {s['steps']} steps of batch {s['batch_size']}"
         + (" (resuming)" if resume else ""), progress)
    result = train(model, data, config, loss_fn=loss_fn, resume=resume, progress=progress)
    net = (result.ema if result.ema is not None else result.model).eval()
    tail = result.losses[-50:]
    return net, dict(parameters=params, config=net.config, final_loss=sum(tail) / max(1, len(tail)),
                     losses_every_25=[float(v) for v in result.losses[::25]])


def evaluate(net, s: dict, base_seed: int) -> tuple:
    """Sample s['samples'] images per requested count 0..max; the requests and the initial noise depend only on
    (base seed, count), so every model answers the same questions from the same noise. Returns (per-count
    metrics, the first N_SHOW samples per count for the grids)."""

    counts, shown = {}, {}
    K = s["max_objects_eval"]
    for k in range(K + 1):
        g_req = torch.Generator().manual_seed(base_seed * 1000 + 17 + k)
        points, valid = request_locations(s["samples"], k, size=32, max_objects=K, radius=3, generator=g_req)
        g_noise = torch.Generator().manual_seed(base_seed * 1000 + 500 + k)
        with torch.no_grad():
            imgs = sample(net, points, valid, steps=s["sampler_steps"], generator=g_noise, progress=False)
        match = length_generalization(imgs, points, valid)
        rec = request_recall(imgs, points, valid)
        counts[k] = dict(score=float(match.score), recall=rec.recall, extras=float(rec.extras.float().mean()),
                         mean_detected=float(match.num_detected.float().mean()),
                         exact_count=float((match.num_detected == k).float().mean()))
        shown[k] = dict(images=imgs[:N_SHOW].clamp(-1, 1).contiguous(), points=points[:N_SHOW].contiguous(),
                        valid=valid[:N_SHOW].contiguous(), matched=match.matched[:N_SHOW].contiguous())
    return counts, shown


def reference_copy(net):
    """The same weights on the reference attention (plain PyTorch), so forward-mode and vmapped probes run."""
    twin = type(net)(**{**net.config, "backend": "reference"})
    twin.load_state_dict(net.state_dict())
    return twin.eval()


def probe(net, s: dict, base_seed: int, quick: bool) -> dict:
    """Pixel locality vs noise (on probe_images scenes of 3 objects) and conditioner locality (the fraction of
    each of 3 requested conditioners' influence within INSIDE_RADIUS px of it, cond_probe_images scenes)."""

    twin = reference_copy(net)
    n = max(s["probe_images"], s["cond_probe_images"])
    g = torch.Generator().manual_seed(base_seed + 99)
    points, valid = request_locations(n, 3, size=32, max_objects=3, radius=3, generator=g)
    x0 = ShapeScenes(size=32, min_objects=3, max_objects=3, labelling="all", radius=3,
                     seed=base_seed + 7).sample(n, generator=g).images
    npix = s["probe_images"]
    with warnings.catch_warnings():
        # a global model is not radius-local: the probe reports its sampled leakage instead of aliasing
        warnings.simplefilter("ignore", LeakageWarning)
        noise = locality_vs_noise(lambda x, sigma: twin(x, sigma, points[:npix], valid[:npix]), x0[:npix],
                                  _probe_sigmas(quick), radius=s["probe_radius"], quantiles=(0.5, 0.95),
                                  on_leakage="report", progress=False)
    nc = s["cond_probe_images"]
    x = x0[:nc] + COND_SIGMA * torch.randn(x0[:nc].shape, generator=g)
    inside_mask = disk_mask(points[:nc], INSIDE_RADIUS, 32, 32) & valid[:nc, :, None, None]
    cond = conditioner_locality(lambda t, c: twin(t, COND_SIGMA, c, valid[:nc]), x, points[:nc], inside_mask,
                                progress=False)
    inside = cond.inside_fraction[valid[:nc]]
    inside = inside[torch.isfinite(inside)]
    return dict(pixel=noise.rows(), cond_inside_fraction=float(inside.mean()) if inside.numel() else float("nan"),
                cond_inside_per_conditioner=[float(v) for v in inside])


@contextlib.contextmanager
def _model_lock(folder: str, name: str, progress):
    """An exclusive lock on one model's cache folder, so studies running side by side on one cache (say one
    per core, with --variants in different orders) never train the same model twice: the second waits and
    then finds the first one's result."""
    import fcntl  # POSIX only: imported where the lock is taken, so the module imports everywhere
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"[{name}] another study process holds it; waiting", progress)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_model(spec: ModelSpec, s: dict, args, cache: str, progress) -> dict:
    """One model's record, from the cache when its training and evaluation keys match; else trains (resuming a
    partial checkpoint), samples, probes and caches. The record's timings are those of the run that made it."""
    folder = os.path.join(cache, spec.slug)
    with _model_lock(folder, spec.name, progress):
        return _run_model(spec, s, args, folder, progress)


def _run_model(spec: ModelSpec, s: dict, args, folder: str, progress) -> dict:

    tkey, ekey = train_key(spec, s, args.seed), eval_key(s, args.quick)
    ekey = dict(ekey, probes=not args.no_probes)
    train_dir = os.path.join(folder, f"train-{_hash(tkey)}")
    stem = os.path.join(train_dir, f"eval-{_hash(ekey)}")
    if os.path.exists(stem + ".json") and os.path.exists(stem + ".safetensors"):
        with open(stem + ".json") as f:
            record = json.load(f)
        tensors = load_file(stem + ".safetensors")
        record["shown"] = {int(k): {f: tensors[f"{k}.{f}"] for f in ("images", "points", "valid", "matched")}
                           for k in record["counts"]}
        record["counts"] = {int(k): v for k, v in record["counts"].items()}
        record["cached"] = True
        _log(f"[{spec.name}] cached ({stem})", progress)
        return record
    os.makedirs(train_dir, exist_ok=True)
    timings = {}
    clock = _Clock()
    net, info = train_model(spec, s, args.seed, train_dir, progress)
    timings["train"] = clock.done()
    clock = _Clock()
    counts, shown = evaluate(net, s, args.seed)
    timings["sample"] = clock.done()
    probes = None
    if not args.no_probes:
        clock = _Clock()
        probes = probe(net, s, args.seed, args.quick)
        timings["probe"] = clock.done()
    record = dict(name=spec.name, variant=spec.variant, design=spec.design, intervention=spec.intervention,
                  labelling=spec.labelling, seed=spec.seed, train_key=tkey, eval_key=ekey, **info,
                  counts=counts, probes=probes, timings=timings, torch_threads=torch.get_num_threads())
    tensors = {f"{k}.{f}": v[f] for k, v in shown.items() for f in v}
    save_file(tensors, stem + ".safetensors")
    with open(stem + ".json.tmp", "w") as f:  # JSON last, atomically: a record whose JSON exists is complete
        json.dump(_jsonable(record), f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")
    record.update(shown=shown, cached=False)
    return record


def _jsonable(obj):
    """NaN -> None (standard JSON), tuples -> lists, int keys -> str."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


# ------------------------------------------------------------------------------------------ the analysis

def far_mean(record: dict, key: str) -> float:
    """Mean of a per-count metric over the FAR counts the run evaluated (NaN if none)."""
    vals = [record["counts"][k][key] for k in FAR if k in record["counts"]]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _ranks(v: list) -> list:
    """Ranks 1..n, ties averaged."""
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list, y: list) -> float:
    """Spearman's rank correlation (Pearson correlation of the tie-averaged ranks); NaN if either is constant
    or fewer than 3 points."""
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def correlation(x: list, y: list, n_boot: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Spearman's rho of (x, y) and a 95 % percentile bootstrap interval over points (resampled with
    replacement; resamples with a constant side are dropped and counted)."""
    rho = spearman(x, y)
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    boots = []
    if n >= 3:
        idx = torch.randint(n, (n_boot, n), generator=g).tolist()
        for row in idx:
            r = spearman([x[i] for i in row], [y[i] for i in row])
            if math.isfinite(r):
                boots.append(r)
    boots.sort()

    def pct(q: float) -> float:
        return boots[min(len(boots) - 1, int(q * len(boots)))] if boots else float("nan")

    return dict(rho=rho, low=pct(0.025), high=pct(0.975), n=n, bootstrap=n_boot, used=len(boots))


def correlations(records: list) -> dict:
    """rho(inside fraction, mean score on 4-6 objects) over all probed models, and over the one-label models."""
    out = {}
    for subset, keep in (("all models", lambda r: True), ("one-label models", lambda r: r["labelling"] == "one")):
        pts = [(r["probes"]["cond_inside_fraction"], far_mean(r, "score")) for r in records
               if keep(r) and r.get("probes") and math.isfinite(r["probes"]["cond_inside_fraction"] or float("nan"))
               and math.isfinite(far_mean(r, "score"))]
        out[subset] = correlation([p[0] for p in pts], [p[1] for p in pts])
    return out


def _fmt(v, digits=2) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def markdown_tables(records: list, K: int) -> str:
    ks = list(range(K + 1))
    far = [k for k in FAR if k <= K]
    far_tag = f"{far[0]}-{far[-1]}" if far else ""
    lines = []

    def table(title: str, key: str, digits: int) -> None:
        head = ["model", "design", "labels", "params"] + [f"k={k}" for k in ks] + ([f"mean k={far_tag}"] if far else [])
        lines.extend([f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
        for r in records:
            cells = [r["name"], r["design"], r["labelling"], f"{r['parameters'] / 1e3:.0f}k"]
            cells += [_fmt(r["counts"][k][key], digits) for k in ks]
            if far:
                cells.append(f"**{_fmt(far_mean(r, key), digits)}**")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    table("One-to-one score (the detected objects match the requests exactly)", "score", 2)
    table("Recall (fraction of requested objects drawn at their place)", "recall", 2)
    table("Extras (detected objects per image that nobody asked for)", "extras", 2)
    if any(r.get("probes") for r in records):
        lines += ["### Locality (fastcomp.probe) and generalization", "",
                  f"| model | r50 / r95 px (sigma {', '.join(f'{x:g}' for x in _sigmas_of(records))}) | leakage | "
                  f"cond. inside {INSIDE_RADIUS:g} px | score k={far_tag} | recall k={far_tag} | extras k={far_tag} |",
                  "|---|---|---|---|---|---|---|"]
        for r in records:
            p = r.get("probes")
            if not p:
                continue
            lines.append("| " + " | ".join([
                r["name"], ", ".join(f"{row['radius_50']}/{row['radius_95']}" for row in p["pixel"]),
                ", ".join(_fmt(row["leakage"], 3) for row in p["pixel"]), _fmt(p["cond_inside_fraction"]),
                _fmt(far_mean(r, "score")), _fmt(far_mean(r, "recall")), _fmt(far_mean(r, "extras"))]) + " |")
        lines.append("")
    return "\n".join(lines)


def _sigmas_of(records: list) -> list:
    for r in records:
        if r.get("probes"):
            return [row["sigma"] for row in r["probes"]["pixel"]]
    return []


VARIANT_COLORS = {"tokens-rope": "tab:blue", "tokens-abs": "tab:orange", "unet": "tab:green",
                  "vector": "tab:purple", "local": "tab:red"}


def write_figure(path: str, records: list, corr: dict) -> None:
    """Mean score on 4-6 objects against the conditioner inside fraction: a point per model, colour by design,
    filled for interventions (and the local model), open as is; circles every-label, triangles one-label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for r in records:
        p = r.get("probes")
        if not p or p["cond_inside_fraction"] is None:
            continue
        x, y = p["cond_inside_fraction"], far_mean(r, "score")
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        color = VARIANT_COLORS.get(r["variant"], "k")
        filled = r["intervention"] or r["variant"] == "local"
        ax.scatter([x], [y], s=64, marker="o" if r["labelling"] == "all" else "^", edgecolors=color,
                   facecolors=color if filled else "none", linewidths=1.6)
    for variant, color in VARIANT_COLORS.items():
        if any(r["variant"] == variant for r in records):
            ax.scatter([], [], marker="s", color=color, label=variant)
    ax.scatter([], [], marker="o", edgecolors="k", facecolors="none", label="every object labelled")
    ax.scatter([], [], marker="^", edgecolors="k", facecolors="none", label="one label")
    ax.scatter([], [], marker="o", color="k", label="filled: local conditioners")
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    c = corr.get("all models", {})
    ax.set_title(f"Spearman rho {_fmt(c.get('rho'))} (95 % bootstrap {_fmt(c.get('low'))} .. "
                 f"{_fmt(c.get('high'))}, {c.get('n', 0)} models)", fontsize=9)
    ax.set_xlabel(f"conditioner inside fraction (influence within {INSIDE_RADIUS:g} px, sigma {COND_SIGMA:g})")
    ax.set_ylabel(f"mean one-to-one score, {FAR[0]}-{FAR[-1]} objects")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sample_grids(out: str, records: list, K: int) -> list:
    """samples-<variant>.png: for each model of the design, a row of up to N_SHOW samples per count in
    GRID_COUNTS (requests marked by crosses, ok / miss above each), labelled on the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    counts = [k for k in GRID_COUNTS if k <= K]
    written = []
    for variant in dict.fromkeys(r["variant"] for r in records):
        images, points, valid, titles, rows = [], [], [], [], []
        for r in (r for r in records if r["variant"] == variant):
            for k in counts:
                sh = r["shown"][k]
                n = sh["images"].shape[0]
                images.append(sh["images"])
                pad = K - sh["points"].shape[1]
                points.append(torch.cat([sh["points"], sh["points"].new_zeros(n, max(pad, 0), 2)], 1)[:, :max(K, 1)])
                valid.append(torch.cat([sh["valid"], sh["valid"].new_zeros(n, max(pad, 0))], 1)[:, :max(K, 1)])
                titles += ["ok" if bool(m) else "miss" for m in sh["matched"].tolist()]
                rows.append(f"{r['name']}\nk={k}: {r['counts'][k]['score']:.2f}")
        ncol = images[0].shape[0]
        fig = plot_grid(torch.cat(images), torch.cat(points), torch.cat(valid), ncol=ncol, titles=titles)
        w, h = fig.get_size_inches()
        fig.set_size_inches(w + 2.4, h)  # room for the row labels on the left
        fig.subplots_adjust(left=2.4 / (w + 2.4), right=0.99)
        for i, label in enumerate(rows):
            fig.axes[i * ncol].text(-0.12, 0.5, label, transform=fig.axes[i * ncol].transAxes, ha="right",
                                    va="center", fontsize=8)
        path = os.path.join(out, f"samples-{variant}.png")
        fig.savefig(path, dpi=60)
        plt.close(fig)
        written.append(os.path.basename(path))
    return written


NOTES_HEADING = "## Notes"


def _notes_of(md_path: str) -> str:
    """The hand-written notes of an earlier results.md (from its NOTES_HEADING line on), so re-running the
    study (say, to add a seed) rewrites the tables but keeps what people wrote about them."""
    if not os.path.exists(md_path):
        return ""
    with open(md_path) as f:
        text = f.read()
    at = text.find("\n" + NOTES_HEADING)
    return "" if at < 0 else "\n" + text[at + 1:]


def _total(records: list, phase: str, what: str) -> float:
    return sum(r["timings"][phase][what] for r in records if phase in r["timings"])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    s = _options.settings(args, DEFAULTS, QUICK)

    prog = "fastcomp study length-generalization"
    variants = _options.names(prog, "--variants", args.variants, VARIANTS)
    if variants is None or not _options.positive(prog, dict(s, seeds=args.seeds, jobs=args.jobs), (
            "steps", "batch_size", "channels", "depth", "samples", "sampler_steps", "max_objects_eval", "seeds",
            "jobs")):
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.jobs > 1:  # the cores shared among the processes, not each process taking them all
        torch.set_num_threads(max(1, torch.get_num_threads() // args.jobs))
    cache = args.cache or os.path.join(args.out, "cache")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(cache, exist_ok=True)
    ignore = os.path.join(cache, ".gitignore")
    if not os.path.exists(ignore):
        with open(ignore, "w") as f:  # checkpoints and sample tensors stay out of git
            f.write("# written by fastcomp study: the model cache (checkpoints, metrics) is not for git\n*\n")
    progress = False if args.no_progress else None
    specs = plan(variants, args.seeds)
    if args.worker is not None:  # a helper of --jobs: train from its own starting point, report nothing
        start = args.worker * len(specs) // args.jobs
        for spec in specs[start:] + specs[:start]:
            run_model(spec, s, args, cache, progress)
        return 0
    _log(f"fastcomp study length-generalization: {len(specs)} models, cache {cache}"
         + (f", {args.jobs} processes" if args.jobs > 1 else ""), progress)
    t0 = time.perf_counter()
    workers = _start_workers(argv, args.jobs, torch.get_num_threads()) if args.jobs > 1 else []
    records = []
    try:
        bar = tqdm(specs, desc="study", unit="model", disable=None if progress is None else not progress,
                   file=sys.stderr)
        for spec in bar:
            bar.set_postfix_str(spec.name)
            record = run_model(spec, s, args, cache, progress)
            records.append(record)
            _log(f"[{spec.name}] score " + ", ".join(f"k={k} {c['score']:.2f}" for k, c in record["counts"].items())
                 + (f"; inside {record['probes']['cond_inside_fraction']:.2f}" if record.get("probes") else ""),
                 progress)
        bar.close()
        failed = [w.args for w in workers if w.wait() != 0]
    finally:  # interrupted or failed: no helper keeps training alone (the cache keeps what they finished)
        for w in workers:
            if w.poll() is None:
                w.terminate()
    if failed:  # every model is cached and reported above; a helper's failure is still said
        _log(f"warning: {len(failed)} helper process(es) of --jobs exited with an error (see above)", progress)
    wall = time.perf_counter() - t0

    K = s["max_objects_eval"]
    corr = correlations(records) if not args.no_probes else {}
    tables = markdown_tables(records, K)
    figures = write_sample_grids(args.out, records, K)
    if corr:
        write_figure(os.path.join(args.out, "generalization-vs-locality.png"), records, corr)
        figures.append("generalization-vs-locality.png")
    totals = {phase: {what: _total(records, phase, what) for what in ("wall", "cpu")}
              for phase in ("train", "sample", "probe")}
    model_wall = sum(t["wall"] for t in totals.values())
    model_cpu = sum(t["cpu"] for t in totals.values())
    loads = [x for r in records for t in r["timings"].values() for x in t["load"]]
    results = {
        "study": "length-generalization", "quick": args.quick, "settings": s, "seed": args.seed, "seeds": args.seeds,
        "variants": variants, "torch_threads": torch.get_num_threads(),
        "this_invocation_seconds": wall, "models_cached": sum(r["cached"] for r in records),
        "time": dict(wall_seconds=model_wall, cpu_seconds=model_cpu, by_phase=totals,
                     load_min=min(loads) if loads else None, load_max=max(loads) if loads else None,
                     load_mean=sum(loads) / len(loads) if loads else None),
        "correlation": corr, "far_counts": [k for k in FAR if k <= K],
        "probe_settings": dict(sigmas=_probe_sigmas(args.quick), radius_px=s["probe_radius"],
                               inside_radius_px=INSIDE_RADIUS, cond_sigma=COND_SIGMA),
        "models": [{k: v for k, v in r.items() if k not in ("shown", "cached")} for r in records],
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(_jsonable(results), f, indent=1)
    corr_lines = [f"- {subset}: Spearman rho = {_fmt(c['rho'])} (95 % bootstrap interval {_fmt(c['low'])} .. "
                  f"{_fmt(c['high'])}; {c['n']} models, {c['used']} of {c['bootstrap']} resamples usable)"
                  for subset, c in corr.items()]
    md_path = os.path.join(args.out, "results.md")
    notes = _notes_of(md_path)
    with open(md_path, "w") as f:
        f.write("# fastcomp study length-generalization\n\n"
                f"ShapeScenes 32x32, trained on 1-3 objects, asked for 0-{K}. {len(records)} models "
                f"(fastcomp.models.VARIANTS; `+local-cond` = the same network with local_conditioners=True). "
                f"Token/vector models {s['channels']} channels x {s['depth']} blocks, patch {s['patch_size']}; "
                f"local model window {s['kernel_size']} tokens; conditioner disks {s['cond_radius']:g} px. "
                f"{s['steps']} steps of batch {s['batch_size']}, lr {s['lr']:g}, noise levels "
                f"{s['sigma_dist']}({s['sigma_loc']:g}, {s['sigma_scale']:g}), no conditioner dropout; EMA weights; "
                f"Heun with {s['sampler_steps']} steps, {s['samples']} samples per count, the same requests and "
                f"noise for every model. Locality: mass radii (50 % / 95 %) of the pixel Jacobian within a "
                f"{2 * s['probe_radius'] + 1}-px square and its leakage beyond it; the fraction of each "
                f"conditioner's influence within {INSIDE_RADIUS:g} px of it (sigma {COND_SIGMA:g}, "
                f"{s['cond_probe_images']} scene(s) of 3 requests).\n\n"
                f"Time summed over the models (each as the run that made it measured it): {model_wall:.0f} s "
                f"wall, {model_cpu:.0f} s CPU (train "
                f"{totals['train']['wall']:.0f} / sample {totals['sample']['wall']:.0f} / probe "
                f"{totals['probe']['wall']:.0f} s wall), {torch.get_num_threads()} torch thread(s), 1-minute load "
                f"average {_fmt(results['time']['load_min'], 1)}-{_fmt(results['time']['load_max'], 1)} "
                f"(mean {_fmt(results['time']['load_mean'], 1)}).\n\n"
                + (f"## Correlation: conditioner inside fraction vs mean score on {FAR[0]}-{FAR[-1]} objects\n\n"
                   + "\n".join(corr_lines) + "\n\n" if corr else "")
                + tables + notes)
    print(tables)
    for line in corr_lines:
        print(line)
    print(f"\nwrote {args.out}/results.md, results.json, " + ", ".join(figures) + f" ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
