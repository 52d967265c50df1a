"""Shared test machinery: seeds, the float64-reference comparison, NaN poisoning, GPU/Triton markers."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels can only run in the interpreter. `@triton.jit` decides between a compiled
# and an interpreted kernel when the kernel's module is imported (triton reads TRITON_INTERPRET lazily, at
# decoration time), and fastcomp imports its kernel modules lazily, on first use. Setting the variable here,
# in the root conftest, therefore precedes every kernel import of the session; test_harness.py checks it.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def pytest_sessionstart(session):
    """Compile the C++ extensions the suite loads (every op family for its own target and for the extra
    targets of tests/test_cpu_variants.py) before the first test, as many builds at once as there are
    cores. One at a time, on first use, they took ~10 of the suite's ~23 minutes on a 2-core AVX2 machine,
    one core idle while the attention's largest file compiled. Each build is a `fastcomp build` process
    (its own cache lock); one that fails is left to the tests, which build again in-process and report it.
    FASTCOMP_TEST_PREBUILD=0 skips this."""
    if os.environ.get("FASTCOMP_TEST_PREBUILD", "1") == "0":
        return
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from fastcomp import _build
    from helpers import extra_cpu_variants

    if _build.compiler_problem() is not None:
        return
    targets = list(dict.fromkeys([*_build.variants(), *extra_cpu_variants()]))
    families = _build.cpu_extensions()  # the attention, the largest, first: fewer idle cores at the end
    jobs = [(f, v) for f in families for v in targets]
    print(f"conftest: compiling or finding {len(jobs)} C++ extension builds ({', '.join(families)} for "
          f"{', '.join(v.name for v in targets)}) before the tests; minutes on 2 cores when the cache is empty",
          file=sys.stderr, flush=True)

    def build(job):
        family, variant = job
        march = "" if variant == _build.DEFAULT else variant.name
        return subprocess.run([sys.executable, "-m", "fastcomp._build", family, "--march", march],
                              capture_output=True, text=True, timeout=900)

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        list(pool.map(build, jobs))


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_triton = pytest.mark.skip(reason="needs triton (pip install triton)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(no_gpu)
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(no_triton)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def triton_device() -> str:
    """Where Triton tests run: CUDA when present, else CPU tensors through the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"


# --- NaN poisoning ---------------------------------------------------------------------------------
# Kernels allocate outputs with torch.empty*; filling those with NaN (integers with a sentinel) makes an
# element a kernel forgot to write fail the comparison instead of passing by luck. Backends allocate their
# outputs in Python (torch.empty, or ops/_outputs.cpu_empty for the C++ kernels' cached blocks) and hand
# them to C++/CUDA, so this reaches every backend. Opt out with
# @pytest.mark.no_poison.

POISON_INT = -(2**31) + 7


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype in (torch.int32, torch.int64):
        t.fill_(POISON_INT)
    return t


@pytest.fixture(autouse=True)
def _nan_poison(request, monkeypatch):
    if "no_poison" in request.keywords:
        yield
        return
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return _poison(real_new_empty(self, *args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    from fastcomp.ops import _outputs  # the C++ kernels' cached output blocks

    real_cpu_empty = _outputs.cpu_empty
    monkeypatch.setattr(_outputs, "cpu_empty", lambda *args, **kwargs: _poison(real_cpu_empty(*args, **kwargs)))
    yield


@pytest.fixture
def one_thread():
    """Run a test on one torch thread. Tiny convolutions finish faster on one thread than OpenMP can hand
    work out, and on busy shared cores two spinning threads were measured 15-40x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
