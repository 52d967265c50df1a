"""Compile every Triton kernel of fastcomp ahead of time for CUDA targets, with no GPU, and report on each.

    python -m fastcomp.kernels._aot [--arch 80,90] [--jobs N] [--json PATH]

What it compiles is what the ops launch: the real launchers (lca_forward / lca_backward, the DDN select
and gather, probe_demux, disk_mask) run on meta tensors (shapes, dtypes and strides, no memory) with the
launch recorded instead of run (`capture`), so the block sizes, num_warps, num_stages, constexprs and
integer specializations are the launchers' own, at fp32/fp16/bf16 and D = 32, 64, 128 for the attention.
Each recorded launch goes through Triton's own binder (the code that turns a launch's arguments into a
signature and specialization) and `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`;
ptxas ships with Triton. From each cubin, `cuobjdump --dump-resource-usage` (cuobjdump ships with Triton
too) gives registers and stack / local bytes (> 0: the registers spilled); the PTX counts the warpgroup
MMAs (`wgmma.mma_async`, Hopper's tensor-core path, HGMMA in SASS) and `mma.sync` (the Ampere path);
Triton's metadata gives the shared memory. `--sass` also disassembles (about a second more per kernel) to
count HGMMA / HMMA / LDL / STL.

The compiled kernels land in Triton's own cache (TRITON_CACHE_DIR, default ~/.triton/cache), keyed by the
kernel's source and every helper it calls, the options, the target and Triton's version: a rerun with
unchanged kernels is a cache hit, and any change to a kernel recompiles it. Safe to share across runs.

Must run with TRITON_INTERPRET unset (kernels decorated under the interpreter cannot be compiled), so
tests/test_triton_aot.py runs it in a subprocess. Uses Triton's binder (`create_function_from_signature`,
`JITFunction._pack_args`), which triton 3.6 (the GPU machines) and 3.9 (here) share; a Triton that changed
them fails here with a message saying so, not silently.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional
from unittest import mock

import torch

ARCHS = (80, 90)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEAD_DIMS = (32, 64, 128)
# The attention case every configuration is recorded at (the benchmark size): B4 128x128 h8 k13
# M16. Only the integer specialization (divisibility by 16) depends on it, not the code's shape.
ATTN_SHAPE = dict(B=4, H=128, W=128, heads=8, kernel=13, M=16)


@dataclass
class Launch:
    """One recorded launch: the kernel (a JITFunction), its arguments and its launch options."""

    op: str  # e.g. "attention bf16 D64", "ddn bf16"
    kernel: Callable
    device: torch.device  # the device the launcher asked to launch on
    args: tuple
    meta: dict
    dtype: str = ""
    head_dim: Optional[int] = None
    arch: Optional[int] = None  # the compute capability the launcher configured for (None: any)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    def constexprs(self) -> dict:
        names = self.kernel.arg_names
        return {k: v for k, v in self.meta.items() if k in names}

    def label(self) -> str:
        flags = [k for k, v in self.constexprs().items() if v is True]
        return f"{self.name}[{','.join(flags)}]" if flags else self.name


def _require_compiled_kernels():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("fastcomp.kernels._aot compiles kernels for CUDA: run it with TRITON_INTERPRET unset "
                           "(kernels imported under the interpreter cannot be compiled)")


def capture(call: Callable[[], object], op: str, arch: Optional[int] = None, **tags) -> list[Launch]:
    """Run `call` (a launcher on meta tensors) with every kernel launch recorded instead of run; `arch`
    (e.g. 90) is the compute capability the launchers configure for, as on such a GPU."""
    from . import attention, ddn, disk_mask, probe_demux

    launches: list[Launch] = []

    def record(kernel, grid, device, *args, **meta):
        launches.append(Launch(op, kernel, device, args, meta, arch=arch, **tags))

    with contextlib.ExitStack() as stack:
        for module in (attention, ddn, probe_demux, disk_mask):
            stack.enter_context(mock.patch.object(module, "launch", record))
        # the launchers' input checks accept CUDA tensors (or the interpreter); meta tensors stand in for them
        stack.enter_context(mock.patch.object(attention, "_interpreting", lambda: False))
        stack.enter_context(mock.patch.object(attention, "_check_inputs", lambda *a, **k: None))
        capability = None if arch is None else (arch // 10, arch % 10)
        stack.enter_context(mock.patch.object(attention, "_capability", lambda device: capability))
        call()
    return launches


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def attention_launches(dtype_name: str, D: int, arch: int) -> list[Launch]:
    """Every launch of the attention forward, backward and jvp, with and without conditioners, as configured on
    a GPU of compute capability `arch` (the block sizes depend on it)."""
    from . import attention as la

    s, dt = ATTN_SHAPE, DTYPES[dtype_name]
    B, H, W, heads, M, ks = s["B"], s["H"], s["W"], s["heads"], s["M"], (s["kernel"], s["kernel"])
    q, k, v, do, out = (_meta(B, H, W, heads, D, dtype=dt) for _ in range(5))
    ck, cv = _meta(B, M, heads, D, dtype=dt), _meta(B, M, heads, D, dtype=dt)
    mask = torch.empty(B, M, H, W, dtype=torch.bool, device="meta")
    lse = _meta(B, heads, H, W)
    tags = dict(dtype=dtype_name, head_dim=D, arch=arch)
    op = f"attention {dtype_name} D{D}"
    found = []
    for cond in ((ck, cv, mask), (None, None, None)):
        found += capture(lambda: la.lca_forward(q, k, v, *cond, ks, D ** -0.5), op, **tags)
        found += capture(lambda: la.lca_backward(do, q, k, v, *cond, out, lse, ks, D ** -0.5), op, **tags)
        tangents = (q, k, v, *((ck, cv) if cond[0] is not None else (None, None)))
        found += capture(lambda: la.lca_jvp(q, k, v, *cond, out, lse, *tangents, ks, D ** -0.5), op, **tags)
    return found


def ddn_launches(dtype_name: str) -> list[Launch]:
    """ddn_select's distances kernel and the gather kernel (bias and residual present, l2), the issue's
    benchmark layer: Cin 64, Cout 3, K 512, 64x64."""
    from . import ddn

    dt = DTYPES[dtype_name]
    B, Cin, Cout, K, H, W = 64, 64, 3, 512, 64, 64
    f, r, t = _meta(B, Cin, H, W, dtype=dt), _meta(B, Cout, H, W, dtype=dt), _meta(B, Cout, H, W, dtype=dt)
    w, b = _meta(K, Cout, Cin, dtype=dt), _meta(K, Cout, dtype=dt)
    index = torch.empty(B, dtype=torch.int64, device="meta")
    op = f"ddn {dtype_name}"
    return (capture(lambda: ddn.ddn_distances_triton(f, w, t, b, r, "l2"), op, dtype=dtype_name)
            + capture(lambda: ddn.ddn_gather_forward_triton(f, w, index, b, r), op, dtype=dtype_name))


def other_launches() -> list[Launch]:
    """probe_demux (float32 probes, radius 4) and disk_mask."""
    from . import disk_mask, probe_demux

    N, B, K, H, W, R = 81, 4, 3, 32, 32, 4
    g = _meta(N, B, K, H, W)
    origins = torch.empty(N, 2, dtype=torch.int64, device="meta")
    sums, counts = (torch.empty(N, (2 * R + 1) ** 2, dtype=torch.float64, device="meta") for _ in range(2))
    outside = torch.empty(N, dtype=torch.float64, device="meta")
    found = capture(lambda: probe_demux.probe_demux_triton(g, origins, 2 * R + 1, R, False, sums, counts, outside),
                    "probe_demux fp32", dtype="fp32")
    points = _meta(4, 16, 2, dtype=torch.float64)
    found += capture(lambda: disk_mask.disk_mask_triton(points, 6.0, 128, 128), "disk_mask", dtype="fp64")
    return found


KERNEL_MODULES = ("attention", "ddn", "probe_demux", "disk_mask")  # kernels/<op>.py, one per op


def all_kernels() -> dict[str, object]:
    """Every @triton.jit kernel (a function with a launch grid, not a device helper) of fastcomp.kernels:
    {name: kernel}. Helpers are jit functions too; kernels are those whose name ends in _kernel."""
    import importlib

    found = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"{__package__}.{module_name}")
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and hasattr(obj, "arg_names"):
                found[name] = obj
    return found


def all_launches(archs=ARCHS) -> list[Launch]:
    """Every distinct launch of every op at the configurations above (duplicates dropped); the attention's
    per arch (its block sizes depend on it), the others for any arch."""
    _require_compiled_kernels()
    found = []
    for arch in archs:
        for dtype_name in DTYPES:
            for D in HEAD_DIMS:
                found += attention_launches(dtype_name, D, arch)
    for dtype_name in DTYPES:
        found += ddn_launches(dtype_name)
    found += other_launches()
    unique, seen = [], set()
    for launch in found:
        key = (launch.op, launch.arch, launch.name, repr(_binder_key(launch)))
        if key not in seen:
            seen.add(key)
            unique.append(launch)
    return unique


# --- compiling one launch ----------------------------------------------------------------------------

def _binder_key(launch: Launch):
    """What distinguishes two compiles of one kernel: the specialization of its arguments and the options."""
    tensor_types = tuple((a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor) else a for a in launch.args)
    return tensor_types, sorted(launch.meta.items())


def _compile_source(launch: Launch, arch: int):
    """(ASTSource, target, options dict) for the launch on sm_<arch>, through Triton's own binder."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    if not hasattr(jit, "create_function_from_signature") or not hasattr(kernel, "_pack_args"):
        raise RuntimeError(f"triton {triton.__version__} changed the launcher API fastcomp.kernels._aot uses "
                           f"(triton.runtime.jit.create_function_from_signature, JITFunction._pack_args); "
                           f"update _compile_source")
    binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.meta, bound_args, specialization,
                                                              options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options.__dict__


def _cuobjdump() -> str:
    import triton

    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError):  # older Triton: the binary beside ptxas
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


_RESOURCE_FORMAT = 1  # bump when _read_cubin's fields change


def _resource_cache(kernel_hash: str, sass: bool) -> Optional[str]:
    """Where the cuobjdump reading of a compiled kernel is kept: keyed by Triton's hash of the compile
    (kernel source and every helper it calls, options, target, Triton version), like the cubin itself."""
    try:
        from fastcomp._build import cache_root

        name = f"{kernel_hash}-v{_RESOURCE_FORMAT}{'-sass' if sass else ''}.json"
        return os.path.join(str(cache_root()), "triton-aot", name)
    except Exception:  # noqa: BLE001 - no cache is only slower
        return None


def _resources(cubin: bytes, kernel_hash: str = "", sass: bool = False) -> dict:
    """Registers, stack and local bytes of a cubin, and with `sass` its HGMMA/HMMA/LDL/STL counts (about a
    second more per kernel: nvdisasm). Cached by `kernel_hash`."""
    cache = _resource_cache(kernel_hash, sass) if kernel_hash else None
    if cache and os.path.exists(cache):
        with contextlib.suppress(OSError, ValueError):
            with open(cache) as fh:
                return json.load(fh)
    usage = _read_cubin(cubin, sass)
    if cache:
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp"
            with open(tmp, "w") as fh:
                json.dump(usage, fh)
            os.replace(tmp, cache)  # atomic: concurrent runs never read half a file
    return usage


def _read_cubin(cubin: bytes, sass: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        tool = _cuobjdump()
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                               timeout=120, check=True).stdout
        fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
        found = dict(regs=int(fields.get("REG", -1)), stack=int(fields.get("STACK", -1)),
                     local=int(fields.get("LOCAL", -1)), hgmma=-1, hmma=-1, ldl=-1, stl=-1)
        if sass:
            text = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, timeout=120,
                                  check=True).stdout
            found.update({name.lower(): len(re.findall(rf"\b{name}\b", text))
                          for name in ("HGMMA", "HMMA", "LDL", "STL")})
    return found


@dataclass
class Result:
    op: str
    kernel: str
    arch: int
    dtype: str
    head_dim: Optional[int]
    num_warps: int
    num_stages: int
    enable_fp_fusion: Optional[bool]
    constexprs: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: Optional[str] = None
    regs: int = -1
    spill_bytes: int = -1  # stack + local memory per thread: > 0 means the registers spilled
    smem: int = -1  # shared memory per program (bytes), as Triton allocates it
    wgmma: int = 0  # wgmma.mma_async instructions in the PTX (Hopper's warpgroup MMA; HGMMA in SASS)
    mma: int = 0  # mma.sync instructions in the PTX (Ampere-style tensor core MMA; HMMA in SASS)
    hgmma: int = -1  # SASS counts, read only with sass=True (-1: not read)
    hmma: int = -1
    ldl: int = -1
    stl: int = -1


def compile_launch(launch: Launch, arch: int, sass: bool = False) -> Result:
    import triton

    res = Result(op=launch.op, kernel=launch.label(), arch=arch, dtype=launch.dtype, head_dim=launch.head_dim,
                 num_warps=launch.meta.get("num_warps", 4), num_stages=launch.meta.get("num_stages", 3),
                 enable_fp_fusion=launch.meta.get("enable_fp_fusion"),
                 constexprs={k: v for k, v in launch.constexprs().items() if not isinstance(v, bool)})
    t0 = time.perf_counter()
    try:
        src, target, options = _compile_source(launch, arch)
        compiled = triton.compile(src, target=target, options=options)
        usage = _resources(compiled.asm["cubin"], getattr(compiled, "hash", ""), sass)
        res.regs, res.smem = usage["regs"], int(compiled.metadata.shared)
        res.spill_bytes = max(usage["stack"], 0) + max(usage["local"], 0)
        res.hgmma, res.hmma, res.ldl, res.stl = usage["hgmma"], usage["hmma"], usage["ldl"], usage["stl"]
        ptx = compiled.asm.get("ptx", "")
        res.wgmma, res.mma = ptx.count("wgmma.mma_async"), ptx.count("mma.sync")
    except Exception as e:  # noqa: BLE001 - reported per kernel; the caller decides
        res.error = f"{type(e).__name__}: {e}"[:4000]
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


_LAUNCHES: list[Launch] = []


def _compile_indexed(item):
    index, arch, sass = item
    return compile_launch(_LAUNCHES[index], arch, sass)


def compile_all(archs=ARCHS, jobs: Optional[int] = None, select: Optional[Callable[[Launch], bool]] = None,
                progress: bool = True, sass: bool = False) -> list[Result]:
    """Compile every launch for every arch, `jobs` processes at a time (default: the CPU count)."""
    global _LAUNCHES
    _LAUNCHES = [x for x in all_launches(archs) if select is None or select(x)]
    items = [(i, arch, sass) for i, x in enumerate(_LAUNCHES) for arch in (archs if x.arch is None else [x.arch])]
    # The slowest compiles (attention backward at D = 128) first, so the pool does not end on one of them.
    items.sort(key=lambda it: -((_LAUNCHES[it[0]].head_dim or 0) + 64 * ("bwd" in _LAUNCHES[it[0]].name)))
    jobs = jobs or os.cpu_count() or 1
    results = []
    if jobs == 1:
        iterator = map(_compile_indexed, items)
    else:  # fork: the workers inherit the recorded launches; nothing here touches a GPU
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))
        iterator = pool.map(_compile_indexed, items)
    for n, res in enumerate(iterator, 1):
        results.append(res)
        if progress:
            print(f"[{n}/{len(items)}] sm_{res.arch} {res.op:22s} {res.kernel:40s} {res.seconds:5.1f} s"
                  + (f"  ERROR {res.error.splitlines()[0][:80]}" if res.error else ""), file=sys.stderr, flush=True)
    if jobs != 1:
        pool.shutdown()
    results.sort(key=lambda r: (r.arch, r.op, r.kernel))
    return results


def table(results: list[Result]) -> str:
    head = (f"{'arch':6s} {'op':22s} {'kernel':40s} {'warps':>5s} {'stages':>6s} {'regs':>4s} {'spill':>5s} "
            f"{'smem':>7s} {'wgmma':>5s} {'mma':>5s} {'LDL/STL':>7s} {'s':>5s}")
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"sm_{r.arch:<3d} {r.op:22s} {r.kernel:40s} ERROR {r.error.splitlines()[0][:100]}")
            continue
        lines.append(f"sm_{r.arch:<3d} {r.op:22s} {r.kernel:40s} {r.num_warps:5d} {r.num_stages:6d} {r.regs:4d} "
                     f"{r.spill_bytes:5d} {r.smem:7d} {r.wgmma:5d} {r.mma:5d} "
                     f"{f'{r.ldl}/{r.stl}' if r.ldl >= 0 else '-':>7s} {r.seconds:5.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=",".join(str(a) for a in ARCHS), help="compute capabilities, e.g. 80,90")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    ap.add_argument("--json", default=None, help="write the per-kernel results here")
    ap.add_argument("--quiet", action="store_true", help="no per-kernel progress lines on stderr")
    ap.add_argument("--sass", action="store_true", help="also count HGMMA/HMMA/LDL/STL in the SASS (slower)")
    args = ap.parse_args(argv)
    import triton

    t0 = time.perf_counter()
    archs = [int(a) for a in args.arch.split(",") if a]
    results = compile_all(archs, args.jobs, progress=not args.quiet, sass=args.sass)
    wall = time.perf_counter() - t0
    print(table(results))
    n_err = sum(r.error is not None for r in results)
    print(f"{len(results)} compiles (triton {triton.__version__}, torch {torch.__version__}) in {wall:.1f} s "
          f"wall, {sum(r.seconds for r in results):.1f} s summed; {n_err} failed")
    kernels = sorted(all_kernels())
    missing = sorted(set(kernels) - {r.kernel.split("[")[0] for r in results})
    if missing:
        print(f"kernels no launcher launched (not compiled): {', '.join(missing)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, wall_s=round(wall, 1),
                           kernels=kernels, missing_kernels=missing, results=[r.__dict__ for r in results]),
                      fh, indent=1)
    return 1 if n_err or missing else 0


if __name__ == "__main__":
    sys.exit(main())
