"""Compile fastcomp's C++ and CUDA extensions on first use, cache them, and check the CUDA sources.

The sources live in csrc/ (installed as the package ``fastcomp.csrc``): each op's in ``csrc/<op>/``, the
headers they share in csrc/ itself. :data:`EXTENSIONS` lists the files of each extension: one CPU
extension per op (``attention``, ``ddn``, ``probe_demux``, ``disk_mask``), so a source that does not
compile on some machine takes out only its own op, and the ``cuda`` extension. ``load(name)`` compiles on
first use with ``torch.utils.cpp_extension.load`` (ninja) into a cache directory and imports the result;
later processes import the cached library directly.
``fastcomp build`` (:func:`main`) compiles ahead of time and reports every extension.

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
4. CPU kernels (``<op>/<op>_cpu.cpp``) see only ``ATen/core/Tensor.h``-level torch headers; the
   op's ``PYBIND11_MODULE`` sits in ``<op>/<op>_module.cpp`` with ``cpu_module.h`` (pybind11 and
   torch's tensor casters, not ``torch/python.h``, which alone costs ~16 s of compile). They are loops
   over contiguous tensors, parallel with OpenMP over ``at::get_num_threads()`` threads, vectorized with
   ``#pragma omp simd`` or GCC/Clang vector types whose width and register tiles come from ``simd.h``.
5. Exactness: the extensions are compiled with ``-ffp-contract=off`` and device code computes
   boundary-deciding sums with ``__dmul_rn``/``__dadd_rn`` (``fastcomp::sum_of_squares``), so
   ``a * a + b * b`` is rounded exactly as in the float64 PyTorch reference (an FMA would round once
   less and move points lying exactly on a boundary). Use ``std::fma`` where a fused result is wanted.

CPU targets (``FASTCOMP_MARCH``)
--------------------------------
Every CPU extension is compiled for one or more *variants* (:func:`variants`):

- ``native`` (the default): ``-march=native``, this CPU's instruction sets. The build hash includes a
  tag of them, so a cache shared by different CPUs (an NFS home, a container image) gives each kind of
  CPU its own build instead of a SIGILL.
- ``x86-64-v3`` (AVX2 + FMA: most laptops, desktops and cluster nodes since ~2015), ``x86-64-v4``
  (AVX-512), ``x86-64-v2``, or any other ``-march`` value: one library for every CPU that has it.
- empty (``FASTCOMP_MARCH=``): the compiler's default target (SSE2 on x86-64); runs everywhere.
- ``dispatch``: the x86-64-v4, x86-64-v3 and default variants, all compiled, the best one this CPU
  runs picked when the library is loaded: one build for a mixed cluster (as PyTorch ships its CPU
  kernels per ISA). Elsewhere than x86-64 it is the default variant alone.

The kernels size their vectors and register tiles from the target (``csrc/simd.h``), so each variant is
compiled for its own register file, not one sized for AVX-512 and spilled on AVX2. A variant whose
instruction sets this CPU lacks is never loaded (it would die of SIGILL): loading it by name refuses with
the reason. ``FASTCOMP_CPU_VARIANT=x86-64-v3`` picks one variant of a dispatch build (tests, A/B timing).
``fastcomp info`` names the variant in use; ``fastcomp build`` reports each extension.

Cache
-----
``$FASTCOMP_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastcomp``, else ``~/.cache/fastcomp``; below it one
directory per torch version, Python version and CUDA version (or cpu), and in that one build directory
per extension and variant named by a hash of the sources, the headers, the flags and the compiler, so an
edited source rebuilds and an unchanged one never does. A build holds an ``fcntl.flock`` on a lock file
in its build directory: a second process that wants the same build waits, then imports the finished
library. A finished build writes ``fastcomp-build.json`` (library, variant, seconds); a failed compile
writes ``fastcomp-build-failed.json`` (the first compiler error) and ``build.log`` (the whole output), so
later processes fall back at once instead of recompiling, and ``fastcomp info`` can say why;
``fastcomp build`` retries it.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

# The sources of each extension, relative to csrc/: one CPU extension per op (its sources in csrc/<op>/;
# a source that fails to compile takes out only its own op), and the CUDA one (its binding csrc/cuda_ops.cpp
# and each op's .cu and binding part). The shared headers (simd.h, common.h, tensor_checks.h, cpu_module.h,
# cuda_utils.h, launchers.h) sit in csrc/ itself, on the include path. A .cu file that is not listed here is
# a mistake (it would never be built): compile_check_cuda refuses it. Source file names stay unique across
# the folders: torch's ninja build names each object file after its source's name.
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "attention": ("attention/attention_cpu.cpp", "attention/attention_jvp_cpu.cpp", "attention/attention_module.cpp"),
    "ddn": ("ddn/ddn_cpu.cpp", "ddn/ddn_module.cpp"),
    "probe_demux": ("probe_demux/probe_cpu.cpp", "probe_demux/probe_module.cpp"),
    "disk_mask": ("disk_mask/disk_mask_cpu.cpp",),
    "cuda": ("cuda_ops.cpp", "disk_mask/disk_mask.cu", "ddn/ddn_cuda_ops.cpp", "ddn/ddn.cu"),
}

# Device code for Ampere (A100) and Hopper (H100/H200), plus PTX so newer GPUs can JIT it; the present
# device's own architecture is added at build time.
CUDA_ARCHS = ("80", "90")

_STAMP = "fastcomp-build.json"  # written once a build has been compiled and imported successfully
_FAILED = "fastcomp-build-failed.json"  # written when compiling failed: the first error, the log's path
_LOCK = "fastcomp.lock"
_TAIL_LINES = 30


class BuildError(RuntimeError):
    """An extension cannot be compiled or loaded; the message says why and how to fix it.

    ``extension``: the name of the extension (None where the error is not about one)."""

    def __init__(self, message: str, extension: Optional[str] = None):
        super().__init__(message)
        self.extension = extension


# --- where things are ------------------------------------------------------------------------------

def source_dir() -> Path:
    """The installed csrc/ directory (package ``fastcomp.csrc``)."""
    from . import csrc

    for entry in csrc.__path__:
        if Path(entry, EXTENSIONS["attention"][0]).is_file():
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


def _flags(cuda: bool, variant: Optional[Variant] = None) -> dict[str, list[str]]:
    cflags = ["-O3", "-ffp-contract=off"]
    if cuda:
        # The binding only checks tensors and calls launchers; the kernels are in the .cu files.
        return {"extra_cflags": cflags, "extra_ldflags": [],
                "extra_cuda_cflags": ["-O3", *_gencode_flags(_cuda_archs())]}
    variant = variant or NATIVE
    cflags = [*cflags, "-fopenmp", *variant.flags, f"-DFASTCOMP_VARIANT={variant.ident}"]
    return {"extra_cflags": cflags, "extra_ldflags": ["-fopenmp"], "extra_cuda_cflags": []}


# --- CPU variants ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One CPU target an extension is compiled for: its name and its compiler flags."""

    name: str
    flags: tuple[str, ...]

    @property
    def ident(self) -> str:
        """The name as a Python identifier fragment (module names)."""
        return re.sub(r"[^A-Za-z0-9]", "_", self.name)


NATIVE = Variant("native", ("-march=native",))
DEFAULT = Variant("default", ())
# AVX-512 wants 512-bit vectors for the auto-vectorized loops too (GCC's generic tuning prefers 256).
X86_64_V4 = Variant("x86-64-v4", ("-march=x86-64-v4", "-mprefer-vector-width=512"))
X86_64_V3 = Variant("x86-64-v3", ("-march=x86-64-v3",))

# What /proc/cpuinfo must list for a CPU to run each x86-64 level (the psABI's microarchitecture
# levels; "abm" is how Linux names LZCNT).
_X86_LEVELS = {"x86-64-v2": {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}}
_X86_LEVELS["x86-64-v3"] = _X86_LEVELS["x86-64-v2"] | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm",
                                                       "movbe", "xsave"}
_X86_LEVELS["x86-64-v4"] = _X86_LEVELS["x86-64-v3"] | {"avx512f", "avx512bw", "avx512cd", "avx512dq",
                                                       "avx512vl"}

MARCH_MODES = ("native", "dispatch", "x86-64-v4", "x86-64-v3", "x86-64-v2", "")


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def march_setting() -> str:
    """FASTCOMP_MARCH as given ("native" when unset)."""
    return os.environ.get("FASTCOMP_MARCH", "native").strip()


def variants() -> tuple[Variant, ...]:
    """The variants FASTCOMP_MARCH asks for, best first (see the module docstring)."""
    march = march_setting()
    if march == "native":
        return (NATIVE,)
    if march == "":
        return (DEFAULT,)
    if march == "dispatch":
        return (X86_64_V4, X86_64_V3, DEFAULT) if _is_x86_64() else (DEFAULT,)
    known = {v.name: v for v in (X86_64_V4, X86_64_V3)}
    return (known.get(march) or Variant(march, (f"-march={march}",)),)


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> Optional[frozenset]:
    """This CPU's feature flags from /proc/cpuinfo (None where there is no such file)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.split())
    return None


def cpu_problem(variant: Variant) -> Optional[str]:
    """None if this CPU can run code built for ``variant``, else why not (it would die of SIGILL)."""
    needs = _X86_LEVELS.get(variant.name)
    if needs is None:  # native, default, or a -march the user chose for this machine
        return None
    if not _is_x86_64():
        return f"{variant.name} is an x86-64 target and this CPU is {platform.machine()}"
    flags = _cpu_flags()
    if flags is None:
        return f"cannot read this CPU's features (/proc/cpuinfo) to check that it runs {variant.name} code"
    missing = sorted(needs - flags)
    if missing:
        return f"this CPU lacks {', '.join(missing)}, which {variant.name} code uses (it would die of SIGILL)"
    return None


# --- building and loading ------------------------------------------------------------------------------

def _build_key(name: str, sources: list[Path], src: Path, flags: dict, cuda: bool,
               variant: Optional[Variant] = None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"name": name, "flags": flags, "torch": torch.__version__, "cxx": _find_cxx()[0],
                         "python": sys.version, "variant": variant.name if variant else None,
                         "cpu": _cpu_tag() if variant == NATIVE else None}, sort_keys=True).encode())
    for path in [*sources, *headers(src)]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def headers(src: Path) -> list[Path]:
    """Every header under ``src`` (the shared ones in csrc/, each op's in csrc/<op>/), in the order of their
    file names (unique), so the build key does not depend on which folder a header sits in."""
    return sorted((p for ext in ("*.h", "*.cuh") for p in src.rglob(ext)), key=lambda p: p.name)


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


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # atomic: readers see no file or a whole one


class NotLoaded:
    """A build for a CPU that is not this one (FASTCOMP_MARCH=dispatch builds every variant; the tests build
    x86-64-v4 everywhere): its library, never imported here. Even its module's initialization may use
    instructions this CPU lacks (an AVX-512 build's did, on an AVX2 machine: SIGILL)."""

    def __init__(self, module: str, library: Path):
        self.__name__, self.__file__ = module, str(library)


# Held by every in-process cpp_extension.load: _compile_only swaps a function of torch's module for the
# duration of one, which must not reach another thread's load of a variant that is to be imported.
_compile_lock = threading.Lock()


@contextlib.contextmanager
def _compile_only(module_name: str):
    """cpp_extension.load compiles and links, then returns a NotLoaded instead of importing the library."""
    from torch.utils import cpp_extension

    real = getattr(cpp_extension, "_import_module_from_library", None)
    if real is None:  # a torch without it: import as before (the tests of the variants then tell)
        yield
        return
    cpp_extension._import_module_from_library = \
        lambda name, path, is_python_module: NotLoaded(module_name, Path(path) / f"{name}{cpp_extension.LIB_EXT}")
    try:
        yield
    finally:
        cpp_extension._import_module_from_library = real


def _import_built(build_dir: Path, load: bool = True):
    """Import the library a finished build recorded in its stamp (a NotLoaded unless ``load``); None if
    there is no finished build."""
    record = _read_json(build_dir / _STAMP)
    if record is None:
        return None
    if not load:
        return NotLoaded(record["module"], build_dir / record["library"])
    try:
        library = build_dir / record["library"]
        spec = importlib.util.spec_from_file_location(record["module"], library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception as e:  # noqa: BLE001 - anything here means the cached library is unusable
        raise BuildError(f"fastcomp: the cached extension in {build_dir} cannot be loaded ({type(e).__name__}: "
                         f"{e}); delete that directory to rebuild it") from None


def _first_error(text: str) -> Optional[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if re.search(r"\berror\b( #\S+)?:", line, re.I)), None)


def _tail(text: str, n: int = _TAIL_LINES) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    first_error = _first_error(text)
    tail = lines[-n:]
    head = [f"first error: {first_error}", "..."] if first_error and first_error not in [t.strip() for t in tail] else []
    return "\n".join(head + tail)


def _compile(name: str, sources: list[Path], src: Path, build_dir: Path, flags: dict, cuda: bool,
             verbose: bool, module_name: str, what: str, load: bool = True):
    from torch.utils import cpp_extension

    print(f"fastcomp: compiling {what} (first use, ~{'1-2 min' if cuda else '15-40 s'}; cached in {build_dir})",
          file=sys.stderr, flush=True)
    (build_dir / "lock").unlink(missing_ok=True)  # torch's own lock, stale if a build was killed; we hold ours
    # torch skips the compile of a name it compiled (or tried to) earlier in this process with the same
    # inputs; a retry after a failure must compile again.
    with contextlib.suppress(AttributeError):
        cpp_extension.JIT_EXTENSION_VERSIONER.entries.pop(module_name, None)
    cxx, _ = _find_cxx()
    saved_cxx = os.environ.get("CXX")
    os.environ["CXX"] = cxx  # torch compiles with $CXX or `c++`; this machine may only have g++
    start = time.perf_counter()
    try:
        with _compile_lock, contextlib.nullcontext() if load else _compile_only(module_name):
            module = cpp_extension.load(
                name=module_name, sources=[str(s) for s in sources], extra_include_paths=[str(src)],
                build_directory=str(build_dir), verbose=verbose, with_cuda=cuda, **flags)
    except Exception as e:  # noqa: BLE001 - compiler, linker and import failures all end up here
        output = str(e)
        log = build_dir / "build.log"
        with contextlib.suppress(OSError):
            log.write_text(output)
        first = _first_error(output) or (output.strip().splitlines() or ["(no compiler output)"])[-1]
        with contextlib.suppress(OSError):
            _write_json(build_dir / _FAILED, {"first_error": first, "log": str(log), "time": time.time(),
                                              "seconds": time.perf_counter() - start})
        raise BuildError(f"fastcomp: building {what} failed: {first}\nbuild dir {build_dir}; the whole log is in "
                         f"{log} (`ninja -v -C {build_dir}` reruns it). Compiler output, last lines:\n"
                         f"{_tail(output)}") from None
    finally:
        if saved_cxx is None:
            os.environ.pop("CXX", None)
        else:
            os.environ["CXX"] = saved_cxx
    seconds = time.perf_counter() - start
    _write_json(build_dir / _STAMP, {"module": module.__name__, "library": Path(module.__file__).name,
                                     "torch": torch.__version__, "sources": [s.name for s in sources],
                                     "flags": flags, "seconds": round(seconds, 1)})
    (build_dir / _FAILED).unlink(missing_ok=True)
    return module, seconds


@dataclass(frozen=True)
class Plan:
    """Everything about one build of one extension (and one CPU variant) but its result."""

    name: str
    variant: Optional[Variant]  # None for the CUDA extension
    sources: tuple[Path, ...]
    source_dir: Path
    flags: dict
    cuda: bool
    build_dir: Path

    @property
    def module_name(self) -> str:
        return f"fastcomp_{self.name}" + (f"_{self.variant.ident}" if self.variant else "")

    @property
    def what(self) -> str:
        kind = "CUDA" if self.cuda else "C++"
        target = f" for {self.variant.name}" if self.variant else ""
        return f"the {kind} extension {self.name!r}{target}"


def _plan(name: str, sources=None, source_dir_=None, cache=None, variant: Optional[Variant] = None) -> Plan:
    if sources is None:
        if name not in EXTENSIONS:
            raise ValueError(f"unknown extension {name!r}; known: {', '.join(EXTENSIONS)}")
        sources = EXTENSIONS[name]
    src = Path(source_dir_) if source_dir_ is not None else source_dir()
    paths = tuple(src / s for s in sources)
    cuda = any(p.suffix == ".cu" for p in paths)
    if cuda:
        variant = None
    elif variant is None:
        variant = variants()[0]
    flags = _flags(cuda, variant)
    key = _build_key(name, list(paths), src, flags, cuda, variant)
    suffix = f"-{variant.ident}" if variant else ""
    return Plan(name, variant, paths, src, flags, cuda, cache_dir(cache) / f"{name}{suffix}-{key}")


def _build_plan(plan: Plan, verbose: bool = False, retry: bool = False):
    """(module, seconds spent compiling or None when it came from the cache) of one plan; the module is a
    NotLoaded for a CPU variant this CPU cannot run."""
    load = plan.variant is None or cpu_problem(plan.variant) is None
    module = _import_built(plan.build_dir, load)
    if module is not None:
        return module, None
    problem = nvcc_problem() if plan.cuda else compiler_problem()
    if problem:
        raise BuildError(f"fastcomp: cannot build {plan.what}: {problem}")
    failed = _read_json(plan.build_dir / _FAILED)
    if failed is not None and not retry:
        raise BuildError(f"fastcomp: building {plan.what} failed earlier: {failed.get('first_error')}\n"
                         f"(the whole log: {failed.get('log')}; `fastcomp build` retries the compile)")
    try:
        plan.build_dir.mkdir(parents=True, exist_ok=True)
        (plan.build_dir / _LOCK).touch()
    except OSError as e:
        raise BuildError(f"fastcomp: cannot write the build cache {plan.build_dir} ({e}): set FASTCOMP_CACHE_DIR to "
                         f"a writable directory") from None
    with _exclusive(plan.build_dir / _LOCK, plan.what):
        module = _import_built(plan.build_dir, load)  # another process may have built it while we waited
        if module is not None:
            return module, None
        failed = _read_json(plan.build_dir / _FAILED)
        if failed is not None and not retry:  # ... or failed to
            raise BuildError(f"fastcomp: building {plan.what} failed: {failed.get('first_error')}\n"
                             f"(the whole log: {failed.get('log')}; `fastcomp build` retries the compile)")
        return _compile(plan.name, list(plan.sources), plan.source_dir, plan.build_dir, plan.flags, plan.cuda,
                        verbose, plan.module_name, plan.what, load)


def _build(name: str, sources=None, source_dir_=None, cache=None, verbose=False, variant=None, retry=False):
    return _build_plan(_plan(name, sources, source_dir_, cache, variant), verbose, retry)


def build(name: str, *, sources=None, source_dir=None, cache=None, verbose: bool = False,
          variant: Optional[Variant] = None):
    """Compile (unless cached) and import extension ``name`` for ``variant`` (default: the first of
    :func:`variants`); no in-process caching, see :func:`load`. For a variant this CPU cannot run, compile
    only: the result is a :class:`NotLoaded` naming the library.

    sources/source_dir: other sources than EXTENSIONS[name] in csrc/ (tests). cache: another cache root.
    Raises BuildError, with the compiler's output when compiling fails.
    """
    return _build(name, sources, source_dir, cache, verbose, variant)[0]


def select_variant(name: str, *, cache=None) -> tuple[Variant, list[str]]:
    """The variant of CPU extension ``name`` that this process loads, and why better ones were passed over.

    The first of :func:`variants` this CPU runs, or the one FASTCOMP_CPU_VARIANT names. Raises BuildError
    when none can run here (a single-target build for instructions this CPU lacks).
    """
    candidates = variants()
    forced = os.environ.get("FASTCOMP_CPU_VARIANT", "").strip()
    if forced:
        chosen = [v for v in candidates if v.name == forced]
        if not chosen:
            raise BuildError(f"fastcomp: FASTCOMP_CPU_VARIANT={forced!r} is not a variant of this build "
                             f"(FASTCOMP_MARCH={march_setting()!r} builds {', '.join(v.name for v in candidates)}); "
                             f"set FASTCOMP_MARCH=dispatch for all of them, or unset FASTCOMP_CPU_VARIANT")
        candidates = tuple(chosen)
    passed = []
    for v in candidates:
        problem = cpu_problem(v)
        if problem is None:
            return v, passed
        passed.append(f"{v.name}: {problem}")
    raise BuildError(f"fastcomp: no variant of the C++ extension {name!r} runs on this CPU ({'; '.join(passed)}); "
                     f"set FASTCOMP_MARCH=native (or dispatch) and rebuild")


_loaded: dict[str, object] = {}
_load_lock = threading.Lock()


def _load_cpu(name: str):
    variant, _ = select_variant(name)
    if march_setting() == "dispatch":
        # One build serves a mixed cluster: whoever builds first builds every variant, so a CPU of
        # another kind sharing the cache finds its own ready (a failure of one this CPU cannot run is
        # recorded and reported by `fastcomp build`, not raised here).
        for other in variants():
            if other != variant:
                with contextlib.suppress(BuildError):
                    _build(name, variant=other)
    return build(name, variant=variant)


def load(name: str):
    """The extension ``name`` (a CPU op family of :data:`EXTENSIONS`, or "cuda"), compiled on first use,
    for the variant this CPU runs best; one import per process.

    A failure is remembered too: the ops call this on every use and must not recompile each time.
    """
    found = _loaded.get(name)
    if found is None:
        with _load_lock:
            found = _loaded.get(name)
            if found is None:
                try:
                    found = build(name) if name == "cuda" else _load_cpu(name)
                except BuildError as e:
                    e.extension = name
                    found = e
                _loaded[name] = found
    if isinstance(found, BuildError):
        raise found
    return found


def loaded(name: str) -> bool:
    """Whether extension ``name`` is loaded in this process (no file system access: the ops ask on every call)."""
    found = _loaded.get(name)
    return found is not None and not isinstance(found, BuildError)


def failure(name: str) -> Optional[str]:
    """Why extension ``name`` cannot be used in this process, known without compiling (None otherwise):
    it failed earlier in this process, or its build of the variant this CPU would load failed before and
    was recorded in the cache (``fastcomp build`` retries it)."""
    found = _loaded.get(name)
    if isinstance(found, BuildError):
        first = str(found).strip().splitlines()[0].removeprefix("fastcomp: ")
        return f"{first} (`fastcomp build` shows the compiler output)"
    if found is not None or name == "cuda" or name not in EXTENSIONS:
        return None  # loaded (the ops ask on every call: no file system past this point then)
    try:
        variant, _ = select_variant(name)
        plan = _plan(name, variant=variant)
    except (BuildError, OSError) as e:
        return str(e).removeprefix("fastcomp: ")
    if (plan.build_dir / _STAMP).is_file():
        return None
    failed = _read_json(plan.build_dir / _FAILED)
    if failed is not None:
        return (f"building {plan.what} failed: {failed.get('first_error')} (log: {failed.get('log')}; "
                f"`fastcomp build` retries)")
    return None


@dataclass(frozen=True)
class Status:
    """What the cache says of one extension variant, without compiling anything."""

    name: str
    variant: Optional[str]
    state: str  # "built", "not built yet", "failed", "cannot build", "cannot run here"
    detail: str  # the library path, the first error, or the reason
    seconds: Optional[float] = None  # compile time of the build (built or failed)
    selected: bool = False  # the variant this process loads

    def line(self) -> str:
        target = f" [{self.variant}]" if self.variant else ""
        mark = " (in use here)" if self.selected else ""
        took = f", compiled in {self.seconds:.0f} s" if self.seconds is not None and self.state == "built" else ""
        return f"{self.name}{target}: {self.state}{took}{mark}: {self.detail}"


def status(name: str) -> list[Status]:
    """One :class:`Status` per variant of extension ``name`` (one for "cuda"), read from the cache."""
    if name == "cuda":
        plans = [_plan(name)]
        problem = nvcc_problem()
        chosen = None
    else:
        plans = [_plan(name, variant=v) for v in variants()]
        problem = compiler_problem()
        try:
            chosen = select_variant(name)[0]
        except BuildError:
            chosen = None
    out = []
    for plan in plans:
        vname = plan.variant.name if plan.variant else None
        selected = plan.variant is not None and plan.variant == chosen
        stamp = _read_json(plan.build_dir / _STAMP)
        failed = _read_json(plan.build_dir / _FAILED)
        if stamp is not None:
            out.append(Status(name, vname, "built", str(plan.build_dir / stamp.get("library", "")),
                              stamp.get("seconds"), selected))
        elif plan.variant is not None and cpu_problem(plan.variant) and march_setting() != "dispatch":
            out.append(Status(name, vname, "cannot run here", cpu_problem(plan.variant)))
        elif failed is not None:
            out.append(Status(name, vname, "failed", f"{failed.get('first_error')} (log: {failed.get('log')})",
                              failed.get("seconds"), selected))
        elif problem is not None:
            out.append(Status(name, vname, "cannot build", problem))
        else:
            out.append(Status(name, vname, "not built yet", "compiles on first use (or `fastcomp build`)",
                              None, selected))
    return out


def cpu_extensions() -> tuple[str, ...]:
    return tuple(n for n in EXTENSIONS if n != "cuda")


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
    cu_files = sorted(src.rglob("*.cu"))
    unlisted = [p.relative_to(src).as_posix() for p in cu_files
                if p.relative_to(src).as_posix() not in EXTENSIONS["cuda"]]
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
        for header in headers(src):
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
        description="Compile fastcomp's C++ extensions (one per op family) and the CUDA one (where nvcc and a "
                    "CUDA torch are present) now, instead of on first use, and report each: built (variant, "
                    "seconds), or failed (the first compiler error and the log's path). A failed build is "
                    "retried here.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"extensions to build (default: all): {', '.join(EXTENSIONS)}")
    parser.add_argument("--march", metavar="TARGET", default=None,
                        help="the CPU target, as FASTCOMP_MARCH: native (default), x86-64-v3, x86-64-v4, "
                             "dispatch (the AVX-512, AVX2 and default variants in one build, chosen at run time), "
                             "'' (the compiler's default), or any -march value")
    parser.add_argument("--check-cuda", action="store_true",
                        help="also compile every csrc/*.cu with nvcc and syntax-check the CUDA binding with "
                             "g++ (needs nvcc, not a GPU)")
    parser.add_argument("--cache-dir", action="store_true",
                        help="print the cache directory (set FASTCOMP_CACHE_DIR to move it) and exit")
    parser.add_argument("--clean", action="store_true",
                        help="delete cached builds of older sources (other torch/Python versions keep theirs)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)

    if args.march is not None:
        os.environ["FASTCOMP_MARCH"] = args.march
    if args.cache_dir:
        print(cache_dir())
        return 0
    unknown = [n for n in args.names if n not in EXTENSIONS]
    if unknown:
        parser.error(f"unknown extension {', '.join(unknown)}; known: {', '.join(EXTENSIONS)}")
    names = args.names or list(EXTENSIONS)
    if args.clean:
        for name in EXTENSIONS:
            current = {_plan(name, variant=v).build_dir for v in ([None] if name == "cuda" else variants())}
            for old in sorted(cache_dir().glob(f"{name}-*")):
                if old not in current and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                    print(f"removed {old}")
    status_code = 0
    print(f"CPU target: FASTCOMP_MARCH={march_setting()!r} -> {', '.join(v.name for v in variants())}")
    for name in names:
        if name == "cuda":
            problem = nvcc_problem()
            if problem:
                print(f"cuda: not built: {problem}")
                continue
            todo = [None]
        else:
            problem = compiler_problem()
            if problem:
                print(f"{name}: not built: {problem}")
                status_code = 1  # no CUDA here is normal; no C++ compiler is not
                continue
            todo = list(variants())
        for variant in todo:
            plan = _plan(name, variant=variant)
            target = f" [{variant.name}]" if variant else ""
            try:
                module, seconds = _build_plan(plan, verbose=args.verbose, retry=True)
            except BuildError as e:
                print(f"{name}{target}: FAILED: {e}")
                status_code = 1
                continue
            if seconds is None:
                took = (_read_json(plan.build_dir / _STAMP) or {}).get("seconds")
                how = "cached" + (f" (compiled in {took:.0f} s)" if took is not None else "")
            else:
                how = f"compiled in {seconds:.0f} s"
            cannot_run = None if variant is None else cpu_problem(variant)
            runs = "" if cannot_run is None else f"; not for this CPU: {cannot_run}"
            print(f"{name}{target}: ready, {how} ({module.__file__}){runs}")
            if variant is not None and cannot_run is None:  # its code (build_info too) would die of SIGILL here
                info = module.build_info()
                threads = f"on, {info['openmp_max_threads']} threads" if info["openmp"] else "off"
                print(f"  {info['compiler']}; OpenMP {threads}; vectors: {info['vector']} "
                      f"({info['vector_bytes']} bytes x {info['vector_registers']} registers); "
                      f"ISA: {', '.join(info['simd']) or 'baseline'}")
        if name != "cuda":
            with contextlib.suppress(BuildError):
                print(f"  {name}: this CPU loads the {select_variant(name)[0].name} variant")
    if args.check_cuda:
        try:
            for line in compile_check_cuda(verbose=args.verbose):
                print(f"check-cuda: {line}")
        except BuildError as e:
            print(f"check-cuda: FAILED\n{e}")
            status_code = 1
    return int(status_code)


if __name__ == "__main__":
    sys.exit(main())
