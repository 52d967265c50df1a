"""Outputs of the C++ CPU kernels from an extension's cache of mapped blocks (csrc/output_cache.h).

A training step that allocates and frees the same megabytes of outputs every call makes glibc hand back
fresh pages each time: a page fault and a page of zeroing per 4 KiB written, ~15% of the attention's
forward+backward on 2 threads (benchmarks/results/portability-20261201/notes.md). An extension that binds
the cache (today the attention's) keeps its freed output blocks of >= 256 KiB for the next call of that
size: at most ``FASTCOMP_CPU_CACHE_MB`` (default 512) MiB of idle blocks, 0 turns the cache off;
:func:`release_cpu_cache` frees the idle ones.
Blocks in use are reported to torch's profiler as torch's CPU allocator reports its own (torch.profiler's
memory view and the benchmarks' peak memory see them).

The launchers call :func:`cpu_empty` (looked up on this module at call time: the tests' NaN poisoning
wraps it as it wraps ``torch.empty``).
"""

from __future__ import annotations

import os
import warnings

import torch

from .. import _build

_LIMIT_VARIABLE = "FASTCOMP_CPU_CACHE_MB"


def _check_limit_setting() -> None:
    """The C++ cache reads FASTCOMP_CPU_CACHE_MB as a whole number of MiB and keeps its default (512) for
    anything else: say so instead of silently ignoring a typo."""
    value = os.environ.get(_LIMIT_VARIABLE, "")
    if value and not (value.isascii() and value.isdigit() and len(value) < 12):  # the C++ rule exactly
        warnings.warn(f"{_LIMIT_VARIABLE}={value!r} is not a whole number of MiB: the CPU output cache keeps its "
                      f"default of 512 MiB (set it to e.g. 256, or 0 to turn the cache off)", RuntimeWarning,
                      stacklevel=2)


_check_limit_setting()


def cpu_empty(ext, shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU from extension ``ext``'s cache (contiguous, uninitialized)."""
    return ext.output_empty(list(shape), dtype)


def cpu_cache_info() -> dict:
    """Per loaded extension that has an output cache: limit_bytes, idle_bytes, in_use_bytes, fresh_blocks,
    reused_blocks."""
    return {name: ext.output_cache_info() for name, ext in _loaded_with_cache()}


def release_cpu_cache() -> int:
    """Frees the idle blocks of every loaded extension's output cache (as ``torch.cuda.empty_cache`` does
    for CUDA memory); returns the bytes freed. Tensors in use are not touched."""
    return sum(ext.release_output_cache() for _, ext in _loaded_with_cache())


def _loaded_with_cache():
    for name in _build.EXTENSIONS:
        if _build.loaded(name):
            ext = _build.load(name)
            if hasattr(ext, "output_empty"):  # the extensions that bind the cache
                yield name, ext
