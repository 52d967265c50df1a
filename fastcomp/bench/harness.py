"""Benchmark machinery: timing, peak memory, the environment record, and the result writers.

Timing: warm up (the first call may compile or build an extension), then time N calls one by one and
report the median and the 20th/80th percentiles in milliseconds. N adapts to the call's cost so a 10 us
op gets hundreds of samples and a 3 s reference gets a few, within a per-measurement time budget.
On CUDA each call is bracketed by CUDA events (GPU time, launch queue kept full); on CPU by perf_counter.

Peak memory: the extra memory one call needs on top of what is already allocated.
CUDA: the caching allocator's peak counter. CPU: torch's profiler records every allocation and free of
the CPU allocator; the peak of their running sum, in order, is the call's high-water mark.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

import fastcomp
from fastcomp.info import cpu_name, package_version

# Columns of the CSV, in order; the JSON rows carry these and a few more (repeats, first call time, note).
COLUMNS = ("op", "provider", "shape", "dtype", "mode", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
           "speedup_vs_reference", "device", "torch", "triton", "commit")


# --- timing ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    first_call_ms: float  # the first warmup call: includes compilation / extension builds / autotuning


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]) of a non-empty sequence."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of an empty sequence")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_calls(fn: Callable[[], Any], n: int, device: torch.device, deadline: Optional[float] = None
                 ) -> list[float]:
    """Milliseconds of each of n calls; on CPU, stops early (after one call at least) past ``deadline``
    (a perf_counter time), so a machine that turns slow mid-run cannot stretch a run without bound."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        _sync(device)
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        _sync(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        out.append((t1 - t0) * 1e3)
        if deadline is not None and t1 > deadline:
            break
    return out


def time_fn(fn: Callable[[], Any], *, device="cpu", warmup: int = 1, repeats: Optional[int] = None,
            budget_s: float = 1.0, min_repeats: int = 3, max_repeats: int = 500) -> Timing:
    """Time ``fn()``: median, p20 and p80 in ms over the timed calls.

    warmup: untimed calls before timing (at least one; the first may compile). Tiny ops get extra
    warmup calls, up to ~5% of the budget, so caches and the allocator settle.
    repeats: a fixed number of timed calls; None chooses budget_s / (time per call), clamped to
    [min_repeats, max_repeats]. first_call_ms reports the first call (compilation included).
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    if warmup > 1:
        _timed_calls(fn, warmup - 1, device)
    # The first call may have compiled, so the cost estimate comes from a second call, which is kept as
    # a sample: a 3 s reference then costs 1 + repeats calls, not 2 + repeats.
    times = _timed_calls(fn, 1, device)
    per_call_ms = times[0]
    if per_call_ms < 1.0:  # settle tiny ops a little longer; costs at most ~5% of the budget
        extra = int(min(200, 0.05 * budget_s * 1e3 / max(per_call_ms, 1e-3)))
        if extra:
            per_call_ms = statistics.median(_timed_calls(fn, extra, device))
            times = []
    if repeats is None:
        n = int(budget_s * 1e3 / max(per_call_ms, 1e-3))
        n = max(min_repeats, min(max_repeats, n))
    else:
        n = max(1, int(repeats))
    if n > len(times):
        # 1.5x the planned time: room for noise, but a machine that turns slow ends the sampling early.
        deadline = None if repeats is not None else (
            time.perf_counter() + 1.5 * max(budget_s, n * per_call_ms / 1e3))
        times = times + _timed_calls(fn, n - len(times), device, deadline)
    else:
        times = times[:n]
    return Timing(median_ms=statistics.median(times), p20_ms=percentile(times, 20),
                  p80_ms=percentile(times, 80), repeats=len(times), first_call_ms=first_ms)


# --- peak memory ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence fd 2 (Kineto prints start/stop lines from C++ that would break the progress bar)."""
    try:
        sys.stderr.flush()
        fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else 2
        saved = os.dup(fd)
    except (OSError, AttributeError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def cpu_peak_bytes(fn: Callable[[], Any]) -> Optional[int]:
    """Peak extra CPU-allocator bytes during one ``fn()`` call, via the profiler's memory events.

    Walks the allocation (+) and free (-) events in chronological order and returns the maximum of
    their running sum (0 when fn allocates nothing). None when the profiler gives no usable events.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    try:
        events = prof.profiler.kineto_results.events()
        mem = [(e.start_ns(), e.nbytes()) for e in events
               if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:
        # The raw event stream is private API. The public EventList folds allocations into the ops that
        # made them (and frees into none), so it cannot give a running sum: report "unavailable".
        return None
    if not mem:
        return 0 if len(events) else None  # ops recorded but no allocation; or nothing recorded at all
    mem.sort(key=lambda t: t[0])
    running = peak = 0
    for _, nbytes in mem:
        running += nbytes
        peak = max(peak, running)
    return peak


def cuda_peak_bytes(fn: Callable[[], Any], device) -> int:
    device = torch.device(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base)


def peak_memory_mb(fn: Callable[[], Any], device="cpu", *, call_ms: Optional[float] = None,
                   cpu_limit_ms: float = 5000.0) -> Optional[float]:
    """Peak extra memory of one ``fn()`` call in MiB, or None when it cannot be measured here.

    On CPU the profiler records every op, which roughly doubles a call made of thousands of small ops;
    calls known (call_ms) to take longer than cpu_limit_ms are not profiled (None).
    """
    device = torch.device(device)
    if device.type == "cpu" and call_ms is not None and call_ms > cpu_limit_ms:
        return None
    try:
        if device.type == "cuda":
            nbytes = cuda_peak_bytes(fn, device)
        elif device.type == "cpu":
            nbytes = cpu_peak_bytes(fn)
        else:
            return None
    except Exception:  # a profiler that cannot start must not lose the timing already taken
        return None
    return None if nbytes is None else nbytes / 2**20


# --- environment ----------------------------------------------------------------------------------

def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    s = re.sub(r"\(.*?\)", "", text.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "device"


@functools.lru_cache(maxsize=None)
def git_commit(where: Optional[str] = None) -> str:
    """Short commit of the repository holding ``where`` (default: the fastcomp sources), else "unknown"."""
    if where is None:
        where = str(Path(fastcomp.__file__).resolve().parent)
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def environment(device) -> dict[str, Any]:
    device = torch.device(device)
    name = device_name(device)
    return {
        "device": name,
        "device_type": device.type,
        "device_slug": slug(f"cpu {cpu_name()}" if device.type == "cpu" else name),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda or "none",
        "commit": git_commit(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        # Other processes on the cores skew CPU timings (a 2-thread op waits for a descheduled thread):
        # the load at the start of the run says how much to trust them.
        "loadavg_1min": _loadavg(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# --- results --------------------------------------------------------------------------------------

@dataclass
class Result:
    """One (case, provider) pair: measured (median_ms set) or skipped (note says why)."""

    op: str
    provider: str
    shape: str
    dtype: str
    mode: str
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    speedup_vs_reference: Optional[float] = None
    repeats: Optional[int] = None
    first_call_ms: Optional[float] = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.median_ms is not None

    def row(self, env: dict) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d.update({"device": env["device"], "torch": env["torch"], "triton": env["triton"],
                  "commit": env["commit"]})
        return d


def fill_speedups(results: list[Result]) -> None:
    """speedup = reference median / provider median, within each (op, shape, dtype, mode) case."""
    refs = {(r.op, r.shape, r.dtype, r.mode): r.median_ms for r in results
            if r.provider == "reference" and r.measured}
    for r in results:
        ref = refs.get((r.op, r.shape, r.dtype, r.mode))
        if r.measured and ref is not None and r.median_ms > 0:
            r.speedup_vs_reference = ref / r.median_ms


def output_stem(env: dict) -> str:
    stamp = _dt.datetime.strptime(env["timestamp_utc"], "%Y-%m-%dT%H:%M:%SZ").strftime("%Y%m%d-%H%M%S")
    return f"bench-{env['device_slug']}-{stamp}"


def _round(x, nd=4):
    return None if x is None else float(f"{x:.{nd}g}")


def write_json(path: Path, env: dict, settings: dict, results: list[Result]) -> Path:
    payload = {
        "environment": env,
        "settings": settings,
        "columns": list(COLUMNS),
        "results": [r.row(env) for r in results if r.measured],
        "skipped": [{"op": r.op, "provider": r.provider, "shape": r.shape, "dtype": r.dtype, "mode": r.mode,
                     "reason": r.note} for r in results if not r.measured],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_csv(path: Path, env: dict, results: list[Result]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in results:
            if r.measured:
                row = r.row(env)
                for key in ("median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "speedup_vs_reference"):
                    row[key] = "" if row[key] is None else f"{row[key]:.6g}"
                w.writerow(row)
    return path


def write_plot(path: Path, env: dict, results: list[Result]) -> Optional[Path]:
    """Log-scale bars of speedup over the reference per case and provider; None when matplotlib is
    missing or there is nothing but the reference to show."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception:
        return None
    rows = [r for r in results if r.measured and r.provider != "reference" and r.speedup_vs_reference]
    if not rows:
        return None
    cases = list(dict.fromkeys((r.op, r.shape, r.dtype, r.mode) for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(cases) + 2), 4.8))
    labelled = set()
    for c_i, case in enumerate(cases):
        here = [r for r in rows if (r.op, r.shape, r.dtype, r.mode) == case]
        width = 0.8 / len(here)
        for p_i, r in enumerate(here):
            x = c_i + (p_i - (len(here) - 1) / 2) * width
            y = r.speedup_vs_reference
            # Bars grow from 1x, so a slowdown points down on the log axis.
            ax.bar(x, y - 1.0, bottom=1.0, width=width * 0.9, color=colors[r.provider],
                   label=None if r.provider in labelled else r.provider)
            labelled.add(r.provider)
            ax.annotate(f"{y:.2g}x", (x, y), ha="center", va="bottom" if y >= 1 else "top", fontsize=7)
    ys = [r.speedup_vs_reference for r in rows]
    ax.set_ylim(min(0.5, min(ys) / 2), max(2.0, max(ys) * 2))
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{op}\n{shape}\n{dtype} {mode}" for op, shape, dtype, mode in cases], fontsize=7)
    ax.set_ylabel("speedup over reference (x, log scale)")
    ax.set_title(f"fastcomp bench on {env['device']}\ntorch {env['torch']}, commit {env['commit']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(out_dir, env: dict, settings: dict, results: list[Result], *, plot: bool = True
                  ) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(env)
    paths = {"json": write_json(out_dir / f"{stem}.json", env, settings, results),
             "csv": write_csv(out_dir / f"{stem}.csv", env, results)}
    if plot:
        png = write_plot(out_dir / f"{stem}.png", env, results)
        if png is not None:
            paths["png"] = png
    return paths


def _fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def format_table(results: list[Result]) -> str:
    """The printed table (measured rows), then the providers that were skipped and why."""
    header = ("op", "shape", "dtype", "mode", "provider", "median ms", "p20-p80", "speedup", "peak MB")
    rows = []
    for r in results:
        if not r.measured:
            continue
        rows.append((r.op, r.shape, r.dtype, r.mode, r.provider, _fmt_ms(r.median_ms),
                     f"{_fmt_ms(r.p20_ms)}-{_fmt_ms(r.p80_ms)}",
                     "-" if r.speedup_vs_reference is None else f"{r.speedup_vs_reference:.2f}x",
                     "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = {5, 6, 7, 8}

    def line(cells):
        return " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "-+-".join("-" * w for w in widths)]
    prev_case = None
    for row in rows:
        case = row[:4]
        out.append(line(row if case != prev_case else ("", "", "", "", *row[4:])))
        prev_case = case
    skipped = [r for r in results if not r.measured]
    if skipped:
        out.append("")
        out.append("not measured:")
        for r in skipped:
            out.append(f"  {r.op} {r.shape} {r.dtype} {r.mode} / {r.provider}: {r.note}")
    return "\n".join(out)
