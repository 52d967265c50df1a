"""Compile fastcomp's C++ and CUDA extensions on first use, cache them, and check the CUDA sources.

The sources live in csrc/ (installed as the package ``fastcomp.csrc``); :data:`EXTENSIONS` lists which
files make up each extension. ``load("cpu")`` compiles on first use with
``torch.utils.cpp_extension.load`` (ninja) into a cache directory and imports the result; later
processes import the cached library directly. ``fastcomp build`` (:func:`main`) compiles ahead of time.

Convention for every C++/CUDA op
--------------------------------
1. Python allocates every output with ``torch.empty*`` and passes it in; C++/CUDA never allocates
   outputs. The tests fill ``torch.empty`` with NaN, so an element a kernel forgot to write fails the
   comparison with the reference instead of passing by luck.
2. ``.cu`` files include only CUDA runtime headers and fastcomp headers (``common.h``, ``launchers.h``,
   ``cuda_utils.h``), never torch headers: the CPU torch wheel's CUDA headers do not compile
   (c10/cuda/impl/cuda_cmake_macros.h and cusparse.h are missing). Each exports a plain launcher declared
   in ``launchers.h``: raw pointers, sizes, the device index and a ``void* stream``; it returns nullptr
   or a static CUDA error string (``cuda_utils.h`` has DeviceGuard and launch_result for that).
3. The CUDA binding (``cuda_ops.cpp``) is compiled by g++ against torch's headers and includes no CUDA
   header. It takes tensors plus the stream as an int64 handle that Python passes
   (``torch.cuda.current_stream(device).cuda_stream``), checks them (with ``tensor_checks.h``, which the
   CPU binding shares, so both refuse the same misuse) and calls the launchers.
   So every .cu compiles with bare nvcc and the binding with g++ on a machine without a GPU (or with a
   CPU build of torch): :func:`compile_check_cuda` proves that in CI, and ``fastcomp build --check-cuda``
   runs it by hand.
4. CPU ops (``cpu_ops.cpp``) are plain loops over contiguous tensors, parallel with OpenMP over
   ``at::get_num_threads()`` threads, written for the compiler to vectorize.
5. Exactness: the extensions are compiled with ``-ffp-contract=off`` and device code computes
   boundary-deciding sums with ``__dmul_rn``/``__dadd_rn`` (``fastcomp::sum_of_squares``), so
   ``a * a + b * b`` is rounded exactly as in the float64 PyTorch reference (an FMA would round once
   less and move points lying exactly on a boundary). Use ``std::fma`` where a fused result is wanted.

Cache
-----
``$FASTCOMP_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastcomp``, else ``~/.cache/fastcomp``; below it one
directory per torch version, Python version and CUDA version (or cpu), and in that one build directory
per extension named by a hash of the sources, the headers, the flags and the compiler, so an edited
source rebuilds and an unchanged one never does. A build holds an ``fcntl.flock`` on a lock file in its
build directory: a second process that wants the same build waits, then imports the finished library.

CPU target: ``-march=native`` by default. The ops are loops for the compiler to vectorize, and
AVX2/AVX-512 vectors are 2-4x wider than those of the x86-64 baseline (SSE2) a portable build gets. A
``-march=native`` library can crash with SIGILL on an older CPU that shares the cache (an NFS home, a
container image with a baked-in cache), so the build hash includes a tag of this CPU's instruction-set
flags: each kind of CPU gets its own build. ``FASTCOMP_MARCH=x86-64-v3`` (any -march value) overrides
the target, e.g. to build one library for a whole cluster; ``FASTCOMP_MARCH=`` (empty) gives the
compiler's default, portable target.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

# The sources of each extension, relative to csrc/. A .cu file that is not listed here is a mistake
# (it would never be built): compile_check_cuda refuses it.
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu_ops.cpp", "attention_cpu.cpp", "attention_jvp_cpu.cpp", "probe_cpu.cpp", "ddn_cpu.cpp"),
    "cuda": ("cuda_ops.cpp", "disk_mask.cu", "ddn_cuda_ops.cpp", "ddn.cu"),
}

# Device code for Ampere (A100) and Hopper (H100/H200), plus PTX so newer GPUs can JIT it; the present
# device's own architecture is added at build time.
CUDA_ARCHS = ("80", "90")

_STAMP = "fastcomp-build.json"  # written once a build has been compiled and imported successfully
_LOCK = "fastcomp.lock"
_TAIL_LINES = 30


class BuildError(RuntimeError):
    """An extension cannot be compiled or loaded; the message says why and how to fix it."""


# --- where things are ------------------------------------------------------------------------------

def source_dir() -> Path:
    """The installed csrc/ directory (package ``fastcomp.csrc``)."""
    from . import csrc

    for entry in csrc.__path__:
        if Path(entry, EXTENSIONS["cpu"][0]).is_file():
            return Path(entry)
    raise BuildError(f"fastcomp: the C++ sources are missing from {list(csrc.__path__)}; reinstall fastcomp "
                     f"(pip install -e . from a checkout)")


def cache_root() -> Path:
    """$FASTCOMP_CACHE_DIR, else $XDG_CACHE_HOME/fastcomp, else ~/.cache/fastcomp."""
    explicit = os.environ.get("FASTCOMP_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fastcomp"


def cache_dir(root: Optional[Path] = None) -> Path:
    """The cache of this torch + Python + CUDA combination; builds of other combinations sit beside it."""
    cuda = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    tag = f"torch-{torch.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}-{cuda}"
    return Path(root or cache_root()) / re.sub(r"[^A-Za-z0-9._+-]", "_", tag)


# --- what this machine has ---------------------------------------------------------------------------

def _find_cxx() -> tuple[Optional[str], Optional[str]]:
    """(compiler command, problem): CXX if set, else c++, g++ or clang++ from PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        words = shlex.split(cxx)
        if not words or shutil.which(words[0]) is None:
            return None, (f"the C++ compiler CXX={cxx!r} is not found: install it, or unset CXX to use "
                          f"c++/g++ from PATH")
        return cxx, None
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found, None
    return None, "no C++ compiler found: install g++ (apt-get install g++) or set CXX to one"


@functools.lru_cache(maxsize=None)
def _compiler_problem(cxx_env: Optional[str], path_env: Optional[str]) -> Optional[str]:
    cxx, problem = _find_cxx()
    if problem:
        return problem
    try:
        run = subprocess.run([*shlex.split(cxx), "--version"], capture_output=True, text=True, timeout=60)
        if run.returncode != 0:
            raise OSError((run.stderr or run.stdout).strip().splitlines()[-1:] or f"exit status {run.returncode}")
    except (OSError, subprocess.SubprocessError) as e:
        return f"the C++ compiler {cxx} does not run ({e}): reinstall it or set CXX to another compiler"
    if shutil.which("ninja") is None:
        return "ninja is not installed (torch compiles extensions with it): pip install ninja"
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        return ("the Python development headers (Python.h) are missing: install your Python's -dev package "
                "(apt-get install python3-dev)")
    return None


def compiler_problem() -> Optional[str]:
    """None if the C++ extension can be compiled here (compiler, ninja, Python headers), else why not."""
    return _compiler_problem(os.environ.get("CXX"), os.environ.get("PATH"))


def _find_nvcc() -> Optional[str]:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and Path(home, "bin", "nvcc").is_file():
            return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc") or (str(Path("/usr/local/cuda/bin/nvcc"))
                                    if Path("/usr/local/cuda/bin/nvcc").is_file() else None)


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> Optional[str]:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def nvcc_problem() -> Optional[str]:
    """None if the CUDA extension can be compiled here (CUDA torch, matching nvcc, C++ compiler), else why."""
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU build (torch.version.cuda is None): install a CUDA build "
                f"of torch (https://pytorch.org/get-started/locally/) to use the cuda backends")
    nvcc = _find_nvcc()
    if nvcc is None:
        return (f"nvcc is not found: install the CUDA toolkit {torch.version.cuda} and put its bin/ on PATH, "
                f"or set CUDA_HOME")
    version = _nvcc_version(nvcc)
    if version is None:
        return f"{nvcc} --version does not run: reinstall the CUDA toolkit or set CUDA_HOME to a working one"
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"nvcc {version} ({nvcc}) does not match torch's CUDA {torch.version.cuda}: install CUDA "
                f"toolkit {torch.version.cuda.split('.')[0]}.x and set CUDA_HOME to it")
    return compiler_problem()


@functools.lru_cache(maxsize=None)
def _cpu_tag() -> str:
    """A short tag of this CPU's instruction sets: -march=native builds differ between CPU kinds."""
    isa_prefixes = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "abm", "lzcnt", "popcnt", "movbe", "aes",
                    "vaes", "pclmul", "vpclmul", "gfni", "sha", "adx", "amx", "xsave", "3dnow")
    features: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                words = value.split()
                if key.strip() == "flags":  # x86: keep the instruction sets, not kernel/mitigation flags
                    words = [w for w in words if w.startswith(isa_prefixes)]
                features = sorted(set(words))
                break
    text = " ".join(features) or platform.processor()
    return f"{platform.machine()}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _cuda_archs() -> list[str]:
    archs = list(CUDA_ARCHS)
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            archs.append(f"{major}{minor}")
    return sorted(set(archs), key=int)


def _gencode_flags(archs) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def _flags(cuda: bool) -> dict[str, list[str]]:
    march = os.environ.get("FASTCOMP_MARCH", "native")
    cflags = ["-O3", "-ffp-contract=off"]
    if cuda:
        # The binding only checks tensors and calls launchers; the kernels are in the .cu files.
        return {"extra_cflags": cflags, "extra_ldflags": [],
                "extra_cuda_cflags": ["-O3", *_gencode_flags(_cuda_archs())]}
    cflags = [*cflags, "-fopenmp"] + ([f"-march={march}"] if march else [])
    return {"extra_cflags": cflags, "extra_ldflags": ["-fopenmp"], "extra_cuda_cflags": []}


# --- building and loading ------------------------------------------------------------------------------

def _build_key(name: str, sources: list[Path], src: Path, flags: dict, cuda: bool) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"name": name, "flags": flags, "torch": torch.__version__, "cxx": _find_cxx()[0],
                         "python": sys.version, "march": os.environ.get("FASTCOMP_MARCH", "native"),
                         "cpu": _cpu_tag() if not cuda else None}, sort_keys=True).encode())
    headers = sorted(p for ext in ("*.h", "*.cuh") for p in src.glob(ext))
    for path in [*sources, *headers]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _exclusive(lock_path: Path, what: str):
    """Hold an exclusive flock on lock_path; say so once if another process holds it already."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock in the build directory still serializes builds
        yield
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"fastcomp: waiting for another process to finish building {what} ({lock_path.parent})",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _import_built(build_dir: Path):
    """Import the library a finished build recorded in its stamp; None if there is no finished build."""
    stamp = build_dir / _STAMP
    if not stamp.is_file():
        return None
    try:
        record = json.loads(stamp.read_text())
        library = build_dir / record["library"]
        spec = importlib.util.spec_from_file_location(record["module"], library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception as e:  # noqa: BLE001 - anything here means the cached library is unusable
        raise BuildError(f"fastcomp: the cached extension in {build_dir} cannot be loaded ({type(e).__name__}: "
                         f"{e}); delete that directory to rebuild it") from None


def _tail(text: str, n: int = _TAIL_LINES) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    first_error = next((line for line in lines if re.search(r"\berror\b( #\S+)?:", line, re.I)), None)
    tail = lines[-n:]
    head = [f"first error: {first_error.strip()}", "..."] if first_error and first_error not in tail else []
    return "\n".join(head + tail)


def _compile(name: str, sources: list[Path], src: Path, build_dir: Path, flags: dict, cuda: bool,
             verbose: bool):
    from torch.utils import cpp_extension

    what = f"the {'CUDA' if cuda else 'C++'} extension {name!r}"
    print(f"fastcomp: compiling {what} (first use, ~{'1-2 min' if cuda else '30 s'}; cached in {build_dir})",
          file=sys.stderr, flush=True)
    (build_dir / "lock").unlink(missing_ok=True)  # torch's own lock, stale if a build was killed; we hold ours
    cxx, _ = _find_cxx()
    saved_cxx = os.environ.get("CXX")
    os.environ["CXX"] = cxx  # torch compiles with $CXX or `c++`; this machine may only have g++
    try:
        module = cpp_extension.load(
            name=f"fastcomp_{name}", sources=[str(s) for s in sources], extra_include_paths=[str(src)],
            build_directory=str(build_dir), verbose=verbose, with_cuda=cuda, **flags)
    except Exception as e:  # noqa: BLE001 - compiler, linker and import failures all end up here
        raise BuildError(f"fastcomp: building {what} failed; build dir {build_dir} (`ninja -v -C "
                         f"{build_dir}` reruns it with the full log). Compiler output, last lines:\n"
                         f"{_tail(str(e))}") from None
    finally:
        if saved_cxx is None:
            os.environ.pop("CXX", None)
        else:
            os.environ["CXX"] = saved_cxx
    record = {"module": module.__name__, "library": Path(module.__file__).name, "torch": torch.__version__,
              "sources": [s.name for s in sources], "flags": flags}
    tmp = build_dir / f"{_STAMP}.{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, build_dir / _STAMP)  # atomic: readers see no stamp or a whole one
    return module


def _plan(name: str, sources=None, source_dir_=None, cache=None):
    """(source paths, source dir, flags, is CUDA, build directory) of extension ``name``."""
    if sources is None:
        if name not in EXTENSIONS:
            raise ValueError(f"unknown extension {name!r}; known: {', '.join(EXTENSIONS)}")
        sources = EXTENSIONS[name]
    src = Path(source_dir_) if source_dir_ is not None else source_dir()
    paths = [src / s for s in sources]
    cuda = any(p.suffix == ".cu" for p in paths)
    flags = _flags(cuda)
    build_dir = cache_dir(cache) / f"{name}-{_build_key(name, paths, src, flags, cuda)}"
    return paths, src, flags, cuda, build_dir


def _build(name: str, sources=None, source_dir_=None, cache=None, verbose=False):
    """(module, seconds spent compiling or None when it came from the cache)."""
    paths, src, flags, cuda, build_dir = _plan(name, sources, source_dir_, cache)
    module = _import_built(build_dir)
    if module is not None:
        return module, None
    problem = nvcc_problem() if cuda else compiler_problem()
    if problem:
        raise BuildError(f"fastcomp: cannot build the {'CUDA' if cuda else 'C++'} extension {name!r}: {problem}")
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        (build_dir / _LOCK).touch()
    except OSError as e:
        raise BuildError(f"fastcomp: cannot write the build cache {build_dir} ({e}): set FASTCOMP_CACHE_DIR to a "
                         f"writable directory") from None
    with _exclusive(build_dir / _LOCK, f"the extension {name!r}"):
        module = _import_built(build_dir)  # another process may have built it while we waited
        if module is not None:
            return module, None
        start = time.perf_counter()
        module = _compile(name, paths, src, build_dir, flags, cuda, verbose)
        return module, time.perf_counter() - start


def build(name: str, *, sources=None, source_dir=None, cache=None, verbose: bool = False):
    """Compile (unless cached) and import extension ``name``; no in-process caching, see :func:`load`.

    sources/source_dir: other sources than EXTENSIONS[name] in csrc/ (tests). cache: another cache root.
    Raises BuildError, with the compiler's output when compiling fails.
    """
    return _build(name, sources, source_dir, cache, verbose)[0]


_loaded: dict[str, object] = {}
_load_lock = threading.Lock()


def load(name: str):
    """The extension ``name`` ("cpu" or "cuda"), compiled on first use; one import per process.

    A failure is remembered too: the ops call this on every use and must not recompile each time.
    """
    found = _loaded.get(name)
    if found is None:
        with _load_lock:
            found = _loaded.get(name)
            if found is None:
                try:
                    found = build(name)
                except BuildError as e:
                    found = e
                _loaded[name] = found
    if isinstance(found, BuildError):
        raise found
    return found


def failure(name: str) -> Optional[str]:
    """Why ``load(name)`` failed earlier in this process (None if it has not failed)."""
    found = _loaded.get(name)
    if isinstance(found, BuildError):
        return f"the {name!r} extension failed to build in this process (`fastcomp build` shows the compiler output)"
    return None


# --- checking the CUDA sources without a GPU --------------------------------------------------------

_checked_cuda: set[str] = set()


def _run_checked(cmd: list[str], what: str) -> None:
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise BuildError(f"fastcomp: {what} failed:\n{_tail(run.stdout + run.stderr)}\ncommand: "
                         f"{shlex.join(cmd)}")


def compile_check_cuda(verbose: bool = False) -> list[str]:
    """Compile every csrc/*.cu with nvcc and syntax-check the CUDA binding with g++; no GPU needed.

    Returns what was checked (one line each). Raises BuildError with nvcc's or g++'s output on failure.
    """
    nvcc = _find_nvcc()
    if nvcc is None:
        raise BuildError("fastcomp: nvcc is not found: install the CUDA toolkit and put its bin/ on PATH, or "
                         "set CUDA_HOME")
    cxx, problem = _find_cxx()
    if problem:
        raise BuildError(f"fastcomp: {problem}")
    src = source_dir()
    cu_files = sorted(src.glob("*.cu"))
    unlisted = [p.name for p in cu_files if p.name not in EXTENSIONS["cuda"]]
    if unlisted:
        raise BuildError(f"fastcomp: {', '.join(unlisted)} in {src} not listed in EXTENSIONS['cuda'] in "
                         f"fastcomp/_build.py, so it would never be built: add it there")
    bindings = [src / s for s in EXTENSIONS["cuda"] if s.endswith(".cpp")]
    archs = list(CUDA_ARCHS)
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{src}", *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)

    jobs: list[tuple[list[str], str, str]] = []
    key = hashlib.sha256(f"{nvcc} {cxx} {archs} {torch.__version__}".encode())
    with tempfile.TemporaryDirectory(prefix="fastcomp-cuda-check-") as tmp:
        for cu in cu_files:
            key.update(cu.read_bytes())
            cmd = [nvcc, "-c", "-std=c++17", "-O2", *_gencode_flags(archs), f"-I{src}", str(cu),
                   "-o", str(Path(tmp, cu.stem + ".o"))]
            jobs.append((cmd, f"nvcc on {cu.name}", f"nvcc: {cu.name} compiles (sm_{', sm_'.join(archs)})"))
        for cpp in bindings:
            key.update(cpp.read_bytes())
            cmd = [*shlex.split(cxx), "-fsyntax-only", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                   "-DTORCH_EXTENSION_NAME=fastcomp_cuda_check", *includes, str(cpp)]
            jobs.append((cmd, f"g++ -fsyntax-only on {cpp.name}", f"g++: {cpp.name} parses against torch headers"))
        for header in sorted(src.glob("*.h")):
            key.update(header.read_bytes())
        digest = key.hexdigest()
        if digest in _checked_cuda:  # same tools, same sources: already passed in this process
            return [done for _, _, done in jobs]
        if verbose:
            for cmd, _, _ in jobs:
                print(shlex.join(cmd), file=sys.stderr)
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            for future in [pool.submit(_run_checked, cmd, what) for cmd, what, _ in jobs]:
                future.result()
    _checked_cuda.add(digest)
    return [done for _, _, done in jobs]


# --- `fastcomp build` ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastcomp build",
        description="Compile fastcomp's C++ extension (and the CUDA one where nvcc and a CUDA torch are "
                    "present) now, instead of on first use.")
    parser.add_argument("--check-cuda", action="store_true",
                        help="also compile every csrc/*.cu with nvcc and syntax-check the CUDA binding with "
                             "g++ (needs nvcc, not a GPU)")
    parser.add_argument("--cache-dir", action="store_true",
                        help="print the cache directory (set FASTCOMP_CACHE_DIR to move it) and exit")
    parser.add_argument("--clean", action="store_true",
                        help="delete cached builds of older sources (other torch/Python versions keep theirs)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)

    if args.cache_dir:
        print(cache_dir())
        return 0
    if args.clean:
        for name in EXTENSIONS:
            current = _plan(name)[-1]
            for old in sorted(current.parent.glob(f"{name}-*")):
                if old != current and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                    print(f"removed {old}")
    status = 0
    for name in EXTENSIONS:
        problem = nvcc_problem() if name == "cuda" else compiler_problem()
        if problem:
            print(f"{name}: not built: {problem}")
            status |= name == "cpu"  # no CUDA here is normal; no C++ compiler is not
            continue
        try:
            module, seconds = _build(name, verbose=args.verbose)
        except BuildError as e:
            print(f"{name}: FAILED\n{e}")
            status = 1
            continue
        how = "cached" if seconds is None else f"compiled in {seconds:.0f} s"
        print(f"{name}: ready, {how} ({module.__file__})")
        if name == "cpu":
            info = module.build_info()
            print(f"  {info['compiler']}; OpenMP {'on, ' + str(info['openmp_max_threads']) + ' threads' if info['openmp'] else 'off'}; "
                  f"SIMD: {', '.join(info['simd']) or 'baseline'}")
    if args.check_cuda:
        try:
            for line in compile_check_cuda(verbose=args.verbose):
                print(f"check-cuda: {line}")
        except BuildError as e:
            print(f"check-cuda: FAILED\n{e}")
            status = 1
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
