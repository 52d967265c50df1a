"""The C++ kernels' output cache (csrc/output_cache.h, fastcomp/ops/_outputs.py): blocks of >= 256 KiB are
reused by the next call of their size class instead of coming back as fresh pages, the idle ones are bounded
by FASTCOMP_CPU_CACHE_MB and freed by release_cpu_cache, and the attention's outputs come from it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastcomp
from fastcomp import _build
from fastcomp import backends as _b
from fastcomp.ops import _outputs
from helpers import assert_close

pytestmark = pytest.mark.skipif(_b.cpp_problem("attention")() is not None,
                                reason=f"the attention C++ extension cannot run here: {_b.cpp_problem('attention')()}")

BIG = (1, 32, 32, 4, 32)  # 512 KiB of float32: cached
SMALL = (4, 1000)          # 16 KB: torch's allocator


def _ext():
    return _build.load("attention")


def test_blocks_are_reused_after_free_and_small_ones_bypass_the_cache():
    ext = _ext()
    t = _outputs.cpu_empty(ext, BIG, torch.float32)
    assert t.shape == BIG and t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
    assert t.data_ptr() % 64 == 0
    t.fill_(1.0)
    ptr, before = t.data_ptr(), ext.output_cache_info()
    del t
    assert ext.output_cache_info()["idle_bytes"] >= before["idle_bytes"] + 512 * 1024
    again = _outputs.cpu_empty(ext, BIG, torch.float32)
    info = ext.output_cache_info()
    assert again.data_ptr() == ptr and info["reused_blocks"] == before["reused_blocks"] + 1
    small = _outputs.cpu_empty(ext, SMALL, torch.float64)
    assert small.shape == SMALL and small.dtype == torch.float64
    assert ext.output_cache_info()["fresh_blocks"] == info["fresh_blocks"]  # not from the cache


def test_cached_tensors_behave_like_torch_empty():
    t = _outputs.cpu_empty(_ext(), BIG, torch.float64)
    t.copy_(torch.arange(t.numel(), dtype=torch.float64).view(BIG))
    t.resize_(2 * t.numel())  # storage grows through the same allocator
    assert t.numel() == 2 * 32 * 32 * 4 * 32 and float(t[5]) == 5.0
    view = t[:10].view(2, 5)
    del t
    assert view.tolist()[1] == [5.0, 6.0, 7.0, 8.0, 9.0]  # a view keeps its block alive


def test_release_frees_the_idle_blocks():
    ext = _ext()
    blocks = [_outputs.cpu_empty(ext, BIG, torch.float32) for _ in range(3)]
    del blocks
    assert ext.output_cache_info()["idle_bytes"] >= 3 * 512 * 1024
    assert fastcomp.ops.release_cpu_cache() >= 3 * 512 * 1024
    assert ext.output_cache_info()["idle_bytes"] == 0
    assert "attention" in fastcomp.ops.cpu_cache_info()


def test_attention_outputs_and_gradients_come_from_the_cache():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*BIG, generator=g, requires_grad=True) for _ in range(3))
    ext = _ext()

    def step():
        out = fastcomp.local_conditional_attention(q, k, v, 5, backend="cpu")
        return out, torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    first = step()
    del first
    before = ext.output_cache_info()
    out, grads = step()
    after = ext.output_cache_info()
    assert after["reused_blocks"] - before["reused_blocks"] >= 4  # out, dq, dk, dv (lse is 64 KiB)
    assert after["fresh_blocks"] == before["fresh_blocks"]
    ref = fastcomp.reference.local_conditional_attention_reference(
        *(x.detach().double().requires_grad_() for x in (q, k, v)), (5, 5))
    assert_close(out, ref)


LIMIT_PROBE = """
import warnings
warnings.simplefilter("always")
import torch
from fastcomp import _build
from fastcomp.ops import _outputs
ext = _build.load("attention")
blocks = [_outputs.cpu_empty(ext, (1, 32, 32, 4, 32), torch.float32) for _ in range(4)]
del blocks
info = ext.output_cache_info()
print(info["limit_bytes"], info["idle_bytes"], info["fresh_blocks"])
"""


def _probe_limit(mb: str):
    """LIMIT_PROBE in a fresh process with FASTCOMP_CPU_CACHE_MB=mb (the cache reads it once): its
    (limit_bytes, idle_bytes, fresh_blocks) and its stderr."""
    env = dict(os.environ, FASTCOMP_CPU_CACHE_MB=mb)
    done = subprocess.run([sys.executable, "-c", LIMIT_PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(map(int, done.stdout.split())), done.stderr


def test_the_limit_bounds_the_idle_blocks_and_zero_turns_the_cache_off():
    (limit, idle, fresh), _ = _probe_limit("1")
    assert limit == 1 << 20 and idle <= limit and idle >= 512 * 1024 and fresh == 4
    (limit, idle, fresh), _ = _probe_limit("0")
    assert (limit, idle, fresh) == (0, 0, 0)


def test_the_profiler_and_the_benchmarks_peak_memory_see_cached_blocks():
    # A block handed out counts as allocated (torch.profiler's memory view, fastcomp bench's peak MB), also
    # when it is a reused one: the cache must not make a kernel's outputs look free.
    from fastcomp.bench import harness

    ext = _ext()
    warm = _outputs.cpu_empty(ext, BIG, torch.float32)
    del warm  # the next block of this size is a reused one
    keep = []
    peak = harness.cpu_peak_bytes(lambda: keep.append(_outputs.cpu_empty(ext, BIG, torch.float32)))
    assert ext.output_cache_info()["in_use_bytes"] >= 512 * 1024
    assert peak is not None and peak >= 512 * 1024


def test_a_malformed_limit_keeps_the_default_and_says_so():
    (limit, _, _), stderr = _probe_limit("1G")
    assert "FASTCOMP_CPU_CACHE_MB='1G' is not a whole number of MiB" in stderr
    assert limit == 512 << 20
