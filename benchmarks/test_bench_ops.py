"""pytest-benchmark suites over the `fastcomp bench` cases (quick sizes), one test per (case, provider).

    python -m pytest benchmarks/ -q                          # all ops, quick sizes
    python -m pytest benchmarks/ -q -k ddn_select            # one op
    FASTCOMP_BENCH_COMPILE=1 python -m pytest benchmarks/    # include torch.compile peers (slow on CPU)
    python -m pytest benchmarks/ --benchmark-json out.json   # pytest-benchmark's own reporting

Not part of the main test suite (pyproject's testpaths is tests/). Tests are grouped by case, so
pytest-benchmark's table compares the providers of one case side by side. A provider that cannot run
here (backend unavailable, peer missing, method not implemented) is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

from fastcomp.backends import BackendUnavailable
from fastcomp.bench import cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
OPTIONS = cases.Options(compile_peers=os.environ.get("FASTCOMP_BENCH_COMPILE", "0") == "1")
CASES = cases.cases_for("quick")
PARAMS = [pytest.param(c, name, id=re.sub(r"[^A-Za-z0-9+_.-]+", "_", f"{c.op}-{c.shape}-{c.mode}-{name}"))
          for c in CASES for name in c.provider_names()]
PEERS = {"flex_attention"}  # other libraries: a failure there is skipped, not ours to fix

_inputs_cache: dict[int, dict] = {}


def _inputs(case: cases.Case) -> dict:
    """One set of inputs per case, shared by its providers (they are timed on the same tensors)."""
    key = id(case)
    if key not in _inputs_cache:
        _inputs_cache.clear()  # keep one case's tensors alive at a time
        torch.manual_seed(0)
        _inputs_cache[key] = case.make_inputs(DEVICE, case.dtype(DTYPE))
    return _inputs_cache[key]


@pytest.mark.parametrize("case, provider", PARAMS)
def test_bench(benchmark, case: cases.Case, provider: str):
    inputs = _inputs(case)
    found = [p for p in case.make_providers(inputs, OPTIONS) if p.name == provider]
    if not found:
        pytest.skip(f"{provider} is not a provider of {case.name} here")
    prov = found[0]
    if prov.skip is not None:
        pytest.skip(prov.skip)
    try:
        fn = prov.build()
        t0 = time.perf_counter()
        fn()  # warmup: compiles / builds extensions outside the measurement
        first_s = time.perf_counter() - t0
    except (NotImplementedError, BackendUnavailable) as e:
        pytest.skip(f"{provider}: {e}")
    except Exception as e:
        if provider in PEERS:
            pytest.skip(f"{provider} failed: {type(e).__name__}: {e}")
        raise

    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.group = f"{case.op} [{case.shape}] {cases.dtype_name(case.dtype(DTYPE))} {case.mode}"
    benchmark.extra_info.update(op=case.op, shape=case.shape, dtype=cases.dtype_name(case.dtype(DTYPE)),
                                mode=case.mode, provider=provider, device=str(DEVICE))
    t0 = time.perf_counter()
    run()
    per_call_s = time.perf_counter() - t0
    if min(per_call_s, first_s) > 0.1:  # slow (the exact probe): a few rounds, not pytest-benchmark's second
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    else:
        benchmark(run)
