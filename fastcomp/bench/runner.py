"""`fastcomp bench`: time every op's providers against the reference and write JSON, CSV and a plot.

    fastcomp bench                       # default cases for this device (CPU: about 1 min on 2 cores)
    fastcomp bench --quick               # small sizes, no torch.compile peers (~10-15 s)
    fastcomp bench --op ddn_select,ddn_gather --device cuda --dtype bfloat16 --out results/
    fastcomp bench --list                # the cases and their candidate providers

Every (case, provider) pair is timed on the same inputs in the same process; speedup = reference median /
provider median. A provider that cannot run (backend unavailable, peer missing or failing) is reported
as not measured, with the reason; it never stops the run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from fastcomp.backends import BackendUnavailable

from . import attention_extras
from . import cases as _cases
from . import harness

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
BUDGET_S = {"quick": 0.5, "cpu": 3.0, "gpu": 1.0}  # seconds of timed calls per (case, provider)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcomp bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and a short time budget, no compile peers")
    p.add_argument("--op", action="append", default=None, metavar="OP",
                   help=f"op(s) to run, repeatable or comma-separated (default: all): {', '.join(_cases.OPS)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="default: float32 on cpu, bfloat16 on cuda (probes and disk masks always float32)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the JSON/CSV/PNG go (default: ./benchmarks/results)")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="timed calls per provider (default: adaptive, within a time budget)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG speedup chart")
    p.add_argument("--list", action="store_true", help="print the cases and their providers, run nothing")
    return p


def _parse_ops(values: Optional[list[str]]) -> list[str]:
    if not values:
        return list(_cases.OPS)
    ops = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = [o for o in ops if o not in _cases.OPS]
    if unknown:
        raise ValueError(f"unknown op{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"choose from: {', '.join(_cases.OPS)}")
    return list(dict.fromkeys(ops))


def _error(msg: str) -> int:
    print(f"fastcomp bench: error: {msg}", file=sys.stderr)
    return 2


class _LineProgress:
    """Progress for logs (CI, pipes): one line per measurement, where a redrawn bar would be noise."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def set_description(self, text: str, refresh: bool = True) -> None:
        print(f"[{self.done + 1}/{self.total} {time.perf_counter() - self.start:5.0f} s] {text}",
              file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n

    def close(self) -> None:
        pass


def _progress(total: int):
    if not sys.stderr.isatty():
        return _LineProgress(total)
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a progress bar is not worth failing over
        return _LineProgress(total)
    return tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True, leave=False)


def run_case(case: _cases.Case, device: torch.device, dtype: torch.dtype, options: _cases.Options, *,
             budget_s: float, repeats: Optional[int], bar=None) -> list[harness.Result]:
    """Time every provider of one case on one set of inputs; failures become not-measured rows."""
    dtype = case.dtype(dtype)
    base = dict(op=case.op, shape=case.shape, dtype=_cases.dtype_name(dtype), mode=case.mode)
    names = case.provider_names()
    torch.manual_seed(0)
    try:
        inputs = case.make_inputs(device, dtype)
        providers = case.make_providers(inputs, options)
    except Exception as e:
        if bar is not None:
            bar.update(len(names))
        reason = f"could not build inputs: {_cases._first_line(e)}"
        return [harness.Result(provider=n, note=reason, **base) for n in names]

    results = []
    for prov in providers:
        if bar is not None:
            bar.set_description(f"{case.op} {case.shape} {case.mode} / {prov.name}", refresh=True)
        if prov.skip is not None:
            results.append(harness.Result(provider=prov.name, note=prov.skip, **base))
        else:
            results.append(_measure(prov, base, device, budget_s, repeats))
        if bar is not None:
            bar.update(1)
    extra = len(names) - len(providers)  # providers that appeared or vanished since listing
    if bar is not None and extra > 0:
        bar.update(extra)
    del inputs, providers
    _free(device)
    return results


def _measure(prov: _cases.Provider, base: dict, device: torch.device, budget_s: float,
             repeats: Optional[int]) -> harness.Result:
    t0 = time.perf_counter()
    try:
        fn = prov.build()
        setup_s = time.perf_counter() - t0
        timing = harness.time_fn(fn, device=device, repeats=repeats, budget_s=budget_s)
    except (NotImplementedError, BackendUnavailable) as e:
        return harness.Result(provider=prov.name, note=f"not available: {_cases._first_line(e)}", **base)
    except Exception as e:  # a peer or backend that breaks is reported, never fatal to the run
        _free(device)
        return harness.Result(provider=prov.name, note=f"failed: {_cases._first_line(e)}", **base)
    peak = harness.peak_memory_mb(fn, device, call_ms=timing.median_ms)
    notes = [f"setup {setup_s:.1f} s"] if setup_s >= 0.1 else []
    if peak is None:
        too_long = device.type == "cpu" and timing.median_ms > 5000
        notes.append("peak memory not measured" + (" (call too long to profile)" if too_long else ""))
    return harness.Result(provider=prov.name, median_ms=timing.median_ms, p20_ms=timing.p20_ms,
                          p80_ms=timing.p80_ms, peak_mem_mb=peak, repeats=timing.repeats,
                          first_call_ms=timing.first_call_ms,
                          note="; ".join(notes), **base)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _list(cases: list[_cases.Case], tier: str, dtype: torch.dtype) -> None:
    print(f"cases ({tier} sizes):")
    width = max(len(f"{c.op}  {c.shape}") for c in cases)
    for c in cases:
        print(f"  {c.op + '  ' + c.shape:<{width}}  {_cases.dtype_name(c.dtype(dtype)):<8}  {c.mode:<7}  "
              f"providers: {', '.join(c.provider_names())}")


def main(argv=None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own error message: return its code, do not exit
        return int(e.code or 0)
    try:
        ops = _parse_ops(args.op)
    except ValueError as e:
        return _error(str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        return _error(f"--device cuda, but torch {torch.__version__} sees no CUDA device; use --device cpu")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.repeats is not None and args.repeats < 1:
        return _error(f"--repeats must be >= 1, got {args.repeats}")
    tier = "quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")
    cases = _cases.select_cases(tier, ops)
    if args.list:
        _list(cases, tier, dtype)
        return 0

    options = _cases.Options(compile_peers=not args.quick)
    env = harness.environment(device)
    budget_s = BUDGET_S[tier]
    total = sum(len(c.provider_names()) for c in cases)
    print(f"fastcomp bench: {len(cases)} cases, {total} (case, provider) pairs on {env['device']}, "
          f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}"
          + (" (--quick: small sizes, no torch.compile peers)" if args.quick else ""), flush=True)
    load = env.get("loadavg_1min")
    if device.type == "cpu" and load is not None and load > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {load} before starting: other processes share these cores, so CPU "
              f"timings will be noisy", flush=True)
    matmul_before = attention_extras.matmul_gflops(device) if attention_extras.has_cases(cases) else None
    start = time.perf_counter()
    bar = _progress(total)
    results: list[harness.Result] = []
    try:
        for case in cases:
            results += run_case(case, device, dtype, options, budget_s=budget_s, repeats=args.repeats, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    harness.fill_speedups(results)
    elapsed = time.perf_counter() - start

    print(harness.format_table(results))
    attention, attention_lines = attention_extras.report(cases, results, device, matmul_before)
    if attention_lines:
        print("\n" + "\n".join(attention_lines))
    out_dir = Path(args.out) if args.out else Path.cwd() / "benchmarks" / "results"
    settings = {"tier": tier, "quick": args.quick, "ops": ops, "device": str(device),
                "dtype": _cases.dtype_name(dtype), "repeats": args.repeats, "budget_s": budget_s,
                "compile_peers": options.compile_peers, "elapsed_s": round(elapsed, 1),
                "argv": list(argv) if argv is not None else sys.argv[1:]}
    if attention:
        settings["local_conditional_attention"] = attention  # GFLOP/s vs matmul, memory scaling
    paths = harness.write_results(out_dir, env, settings, results, plot=not args.no_plot)
    print(f"\n{sum(r.measured for r in results)} measured, {sum(not r.measured for r in results)} not measured, "
          f"{elapsed:.0f} s")
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
