"""Comparison helpers: every fast path is checked against the float64 reference through these."""

from __future__ import annotations

import numpy as np
import torch

# --- comparison with a float64 reference -----------------------------------------------------------

# RMS(ref - out) / RMS(ref) allowed per dtype of the tested output.
RMS_RATIO = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 4e-2,
}


def rms_error_ratio(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    denom = ref64.square().mean().sqrt().item()
    num = (ref64 - out64).square().mean().sqrt().item()
    if denom == 0.0:
        return num  # reference is all zeros: compare absolutely
    return num / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, *, ratio: float | None = None, name: str = "output",
                 dtype: torch.dtype | None = None) -> None:
    """Assert RMS(ref - out) / RMS(ref) < ratio, ref in float64; the message reports the worst element."""
    assert out.shape == ref.shape, f"{name}: shape {list(out.shape)} != reference {list(ref.shape)}"
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if out64.numel() == 0:
        return
    bad = ~torch.isfinite(out64) & torch.isfinite(ref64)
    if bool(bad.any()):
        where = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite element(s) where the reference is finite "
                             f"(unwritten output?), first at {where}: {out64[where].item()}")
    limit = RMS_RATIO[dtype or out.dtype] if ratio is None else ratio
    err = rms_error_ratio(out64, ref64)
    if not err < limit:
        diff = (out64 - ref64).abs()
        where = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), diff.shape))
        raise AssertionError(f"{name}: RMS error ratio {err:.3e} >= {limit:.1e}; worst element at {where}: "
                             f"got {out64[where].item():.8g}, reference {ref64[where].item():.8g}")


def assert_low_precision_close(out: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor, *,
                               name: str = "output", factor: float = 2.0) -> None:
    """Low precision passes when its error vs the float64 reference is at most ~factor x that of plain
    PyTorch computing the same thing in the same dtype (flash-attention's rule)."""
    ours = rms_error_ratio(out, ref64)
    theirs = rms_error_ratio(torch_same_dtype, ref64)
    assert ours <= factor * theirs + 1e-6, (f"{name}: error {ours:.3e} vs float64 exceeds {factor}x plain "
                                           f"PyTorch's {theirs:.3e} in {out.dtype}")


# --- CPU targets the C++ kernels are also tested on --------------------------------------------------

def extra_cpu_variants():
    """The CPU targets built and tested besides the suite's own (tests/test_cpu_variants.py): x86-64-v3
    and the compiler's default on x86-64 (only the default elsewhere), plus x86-64-v4 unless the suite's
    own build is AVX-512 already, so that every instruction-set path of csrc/simd.h compiles in CI."""
    from fastcomp import _build

    out = [_build.X86_64_V3, _build.DEFAULT] if _build._is_x86_64() else [_build.DEFAULT]
    own = _build.variants()[0]
    if _build._is_x86_64() and own != _build.X86_64_V4:
        native_is_avx512 = own == _build.NATIVE and "avx512f" in (_build._cpu_flags() or frozenset())
        if not native_is_avx512:
            out.append(_build.X86_64_V4)
    return [v for v in out if v != own]


# --- which backend ran --------------------------------------------------------------------------------

def count_cpu_extension_calls(monkeypatch) -> dict:
    """Count calls into the C++ CPU extensions (every op family), by function name (e.g.
    "local_attention_forward_cpu"): a test that a fast path is taken asserts the counts. Wraps
    fastcomp._build.load for the test's duration."""
    from fastcomp import _build

    real_load = _build.load
    calls: dict = {}

    class Counted:
        def __init__(self, ext):
            self._ext = ext

        def __getattr__(self, name):
            fn = getattr(self._ext, name)

            def counted(*args):
                calls[name] = calls.get(name, 0) + 1
                return fn(*args)

            return counted

    monkeypatch.setattr(_build, "load", lambda name: real_load(name) if name == "cuda" else Counted(real_load(name)))
    return calls


# --- multi-process (DDP) tests on gloo CPU processes ------------------------------------------------

def free_port() -> int:
    """A TCP port nobody listens on right now (for MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker_env(rank: int, world: int, port: int, *, set_rank_env: bool = True) -> None:
    """Inside a spawned worker: loopback rendezvous on `port`, one torch thread, a stack dump + exit after
    90 s stuck (so a hang fails instead of stalling CI). set_rank_env also sets RANK / WORLD_SIZE as
    torchrun does, for code that initializes the process group itself."""
    import faulthandler
    import os

    faulthandler.dump_traceback_later(90, exit=True)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no lookup of the host's own name
    if set_rank_env:
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
        os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(rank), str(world)
    torch.set_num_threads(1)


def run_spawned(fn, args: tuple, nprocs: int = 2, *, deadline_s: float = 150.0, retries: int = 1,
                on_retry=None) -> None:
    """Run fn(rank, *args) in `nprocs` spawned processes; a hung attempt (its workers' faulthandler
    deadline or `deadline_s`) is retried `retries` times, on a fresh port when args[0] is the port
    placeholder None. A Python error in a worker re-raises here. Fails the test if every attempt hung.

    spawn, not fork: a child forked after OpenMP has started its thread pool deadlocks in the OpenMP
    runtime. Gloo's rendezvous on a shared CI box has been seen to stall once in many runs; a collective
    mismatch would hang every attempt, so a retry separates the two."""
    import time

    import pytest
    import torch.multiprocessing as mp

    for attempt in range(retries + 1):
        call_args = (free_port(),) + tuple(args[1:]) if args and args[0] is None else tuple(args)
        workers = mp.start_processes(fn, args=call_args, nprocs=nprocs, join=False, start_method="spawn")
        deadline = time.monotonic() + deadline_s
        try:
            while not workers.join(timeout=2):
                if time.monotonic() > deadline:
                    break
            else:
                return
        except mp.ProcessExitedException:  # killed by its faulthandler deadline (a Python error re-raises)
            pass
        for proc in workers.processes:
            proc.kill()
        if on_retry is not None:
            on_retry()
    pytest.fail(f"the {nprocs} spawned worker processes hung {retries + 1} times "
                "(their stacks are in the captured stderr)")
