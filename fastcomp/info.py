"""`fastcomp info`: the machine, the toolchain, and every op's backends with the reason any cannot run."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil

import torch

from . import backends


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})",
        "triton": package_version("triton") + ("  [TRITON_INTERPRET=1: kernels run interpreted on CPU]"
                                        if backends.triton_interpreted() else ""),
        "numpy": package_version("numpy"),
        "cpu": f"{cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "gpu": ", ".join(gpus) if gpus else "none",
        "c++ compiler": shutil.which(os.environ.get("CXX", "c++")) or "not found",
        "nvcc": shutil.which("nvcc") or "not found",
        "ninja": shutil.which("ninja") or "not found",
        "extension cache": _extension_cache(),
    }


def _extension_cache() -> str:
    try:
        from . import _build

        return str(_build.cache_dir())
    except Exception as e:  # the build module must never break `info`
        return f"unknown ({e})"


def _build_march() -> str:
    from . import _build

    return _build.march_setting()


def extension_lines() -> list[str]:
    """One line per extension (and CPU variant): built (variant, seconds), not built yet, or failed."""
    from . import _build

    lines = []
    for name in _build.EXTENSIONS:
        try:
            lines.extend(st.line() for st in _build.status(name))
        except Exception as e:  # noqa: BLE001 - the build module must never break `info`
            lines.append(f"{name}: unknown ({type(e).__name__}: {e})")
    return lines


def backend_rows() -> list[tuple[str, str, str, str]]:
    """(op, backend, status, description) for every registered backend, best first per op."""
    rows = []
    for op in backends.ops():
        for b in backends.backends(op):
            reason = b.machine_reason
            rows.append((op, b.name, "ok" if reason is None else f"unavailable: {reason}", b.description))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastcomp info", description=__doc__)
    parser.parse_args(argv)
    env = environment()
    width = max(map(len, env))
    print("fastcomp environment")
    for key, value in env.items():
        print(f"  {key:<{width}}  {value}")

    print(f"\nC++/CUDA extensions (FASTCOMP_MARCH={_build_march()!r}; read from the cache, nothing is compiled here;"
          f" `fastcomp build` compiles them)")
    for line in extension_lines():
        print(f"  {line}")

    print("\nbackends (backend=None picks the first usable one per op whose input checks pass;"
          " CPU tensors never auto-pick triton)")
    rows = backend_rows()
    w_op = max(len(r[0]) for r in rows)
    w_b = max(len(r[1]) for r in rows)
    for op, name, status, description in rows:
        print(f"  {op:<{w_op}}  {name:<{w_b}}  {status}")
        if description:
            print(f"  {'':<{w_op}}  {'':<{w_b}}    {description}")
    return 0
