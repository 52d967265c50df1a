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
#
# Why these once stalled (1 in 4 full-suite runs, nearly always on the first DDP test after the OpenMP-
# heavy ones): a deadlock in torch's teardown, not in the collectives. A worker whose DDP module outlived
# dist.destroy_process_group() dropped the last reference to the gloo process group from the DDP
# Reducer's destructor, which runs with the GIL held (ProcessGroupGloo's own Python binding releases
# it; the Reducer's does not: pytorch/pytorch#56297). ~ProcessGroupGloo joins its worker threads, and a
# worker thread still releasing the last all_reduce's work object must take the GIL to free that work's
# Python-owned tensors (native stacks: main thread in std::thread::join under ~Reducer ->
# ~ProcessGroupGloo; "pt_gloo_runloop" in take_gil under ~AsyncAllreduceWork). The window is that
# release, normally microseconds; on two busy cores (the parent's OpenMP threads still spinning, the
# other worker, other jobs) the gloo thread gets descheduled inside it, and the worker hangs until its
# faulthandler deadline. The rule: a DDP module dies while its process group is alive (see
# tests/test_split_and_prune.py's worker and fastcomp.train.loop.train), so the group is destroyed by
# destroy_process_group, which releases the GIL.
#
# The rendezvous store is hosted by the test process on a port it already holds (TCPStore port 0), and
# the workers connect as clients, as under torchrun (TORCHELASTIC_USE_AGENT_STORE): no window between
# picking a free port and binding it in which another process on a shared machine could take it.

def ddp_worker_env(rank: int, world: int, port: int, *, set_rank_env: bool = True) -> None:
    """Inside a spawned worker: the test process's rendezvous store on `port` (as torchrun's agent store),
    one torch thread, a stack dump + exit after 90 s stuck (so a hang fails instead of stalling CI).
    set_rank_env also sets RANK / WORLD_SIZE as torchrun does, for code that initializes the process
    group itself; init_process_group("gloo", rank=..., world_size=...) works either way."""
    import faulthandler
    import os

    faulthandler.dump_traceback_later(90, exit=True)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # connect to the parent's store, never host one
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no lookup of the host's own name
    if set_rank_env:
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
        os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(rank), str(world)
    torch.set_num_threads(1)


class DDPRetryWarning(UserWarning):
    """run_spawned's workers hung and were started again: a stall to investigate, not a pass."""


def run_spawned(fn, args: tuple, nprocs: int = 2, *, deadline_s: float = 150.0, retries: int = 1,
                on_retry=None) -> None:
    """Run fn(rank, *args) in `nprocs` spawned processes, with a rendezvous store hosted here; args[0]
    must be None, the placeholder for the store's port (pass it to ddp_worker_env). A hung attempt (its
    workers' faulthandler deadline or `deadline_s`) is retried `retries` times with a DDPRetryWarning (a
    collective mismatch would hang every attempt, so a retry separates the two); a Python error in a
    worker re-raises here. Fails the test if every attempt hung.

    spawn, not fork: a child forked after OpenMP has started its thread pool deadlocks in the OpenMP
    runtime."""
    import datetime
    import time
    import warnings

    import pytest
    import torch.distributed as dist
    import torch.multiprocessing as mp

    assert args and args[0] is None, "args[0] is the placeholder for the store's port"
    for attempt in range(retries + 1):
        # A fresh store per attempt: nothing left from a hung one.
        store = dist.TCPStore("127.0.0.1", 0, nprocs, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=deadline_s))
        call_args = (store.port,) + tuple(args[1:])
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
        finally:
            del store
        for proc in workers.processes:
            proc.kill()
        if on_retry is not None:
            on_retry()
        if attempt < retries:
            warnings.warn(f"the {nprocs} spawned worker processes hung (attempt {attempt + 1}); retrying. "
                          "Their stacks are in the captured stderr", DDPRetryWarning, stacklevel=2)
    pytest.fail(f"the {nprocs} spawned worker processes hung {retries + 1} times "
                "(their stacks are in the captured stderr)")
