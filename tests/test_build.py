"""The C++/CUDA build machinery (fastcomp/_build.py): compile once, cache, lock, fail with clear errors.

One full compile of the (smallest) disk_mask extension happens here per session (two processes racing
into an empty cache directory under tmp); every other test reuses that cache, so the user's
~/.cache/fastcomp is untouched. Variants and the per-family split: tests/test_cpu_variants.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastcomp import _build
from fastcomp.cli import main as cli_main

needs_compiler = pytest.mark.skipif(_build.compiler_problem() is not None,
                                    reason=f"cannot compile C++ here: {_build.compiler_problem()}")
needs_nvcc = pytest.mark.skipif(_build._find_nvcc() is None, reason="nvcc is not on PATH (no CUDA toolkit)")

COMPILING = "fastcomp: compiling"
LOAD_CPU = "from fastcomp import _build; print(_build.load('disk_mask').build_info()['compiler'])"


def _load_in_subprocess(cache) -> subprocess.Popen:
    env = dict(os.environ, FASTCOMP_CACHE_DIR=str(cache))
    return subprocess.Popen([sys.executable, "-c", LOAD_CPU], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """Two processes build the disk_mask extension at the same time into one empty cache directory.

    Returns (cache root, [(returncode, stdout, stderr)] of both); the other tests load from this cache.
    """
    if _build.compiler_problem() is not None:
        pytest.skip(f"cannot compile C++ here: {_build.compiler_problem()}")
    cache = tmp_path_factory.mktemp("fastcomp-cache")
    procs = [_load_in_subprocess(cache) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        results.append((proc.returncode, out, err))
    return cache, results


@needs_compiler
@pytest.mark.slow
def test_concurrent_builds_into_an_empty_cache_both_succeed(shared_cache):
    cache, results = shared_cache
    for code, out, err in results:
        assert code == 0, f"a concurrent build failed:\n{err}"
        assert "gcc" in out or "clang" in out, out
    compiled = [err for _, _, err in results if COMPILING in err]
    assert len(compiled) == 1, f"expected one process to compile and the other to wait: {[r[2] for r in results]}"
    assert compiled[0].count(COMPILING) == 1
    stamps = list(_build.cache_dir(cache).glob("disk_mask-*/fastcomp-build.json"))
    assert len(stamps) == 1, stamps


@needs_compiler
def test_second_process_loads_the_cache_without_compiling(shared_cache):
    cache, _ = shared_cache
    proc = _load_in_subprocess(cache)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert COMPILING not in err and "fastcomp:" not in err, f"a cached load printed:\n{err}"


@needs_compiler
def test_build_info(shared_cache, monkeypatch):
    monkeypatch.setenv("FASTCOMP_CACHE_DIR", str(shared_cache[0]))
    module = _build.build("disk_mask")
    info = module.build_info()
    assert info["compiler"].startswith(("gcc", "clang")), info
    assert info["openmp"] is True and info["openmp_max_threads"] >= 1, info
    assert isinstance(info["simd"], list), info
    assert info["variant"] == _build.variants()[0].ident, info
    if os.environ.get("FASTCOMP_MARCH", "native") == "native" and "avx2" in open("/proc/cpuinfo").read():
        assert "AVX2" in info["simd"], f"-march=native did not reach the compiler: {info}"
        assert info["vector_bytes"] >= 32, info


@needs_compiler
def test_edited_source_gets_a_new_build_dir(tmp_path):
    src = _build.source_dir()
    (tmp_path / "disk_mask").mkdir()
    for name in ("disk_mask/disk_mask_cpu.cpp", "common.h"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    paths = [tmp_path / "disk_mask" / "disk_mask_cpu.cpp"]
    flags = _build._flags(cuda=False)
    key = _build._build_key("disk_mask", paths, tmp_path, flags, False, _build.NATIVE)
    assert _build._build_key("disk_mask", paths, tmp_path, flags, False, _build.NATIVE) == key
    other = _build._flags(False, _build.X86_64_V3)
    assert _build._build_key("disk_mask", paths, tmp_path, other, False, _build.X86_64_V3) != key, \
        "each variant must have its own build"
    (tmp_path / "common.h").write_text((src / "common.h").read_text() + "\n// edited\n")
    assert _build._build_key("disk_mask", paths, tmp_path, flags, False, _build.NATIVE) != key, \
        "a header edit must rebuild"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTCOMP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _build.cache_root() == tmp_path / "xdg" / "fastcomp"
    monkeypatch.setenv("FASTCOMP_CACHE_DIR", str(tmp_path / "mine"))
    assert _build.cache_root() == tmp_path / "mine"
    name = _build.cache_dir().name
    assert torch.__version__.split("+")[0] in name and f"py{sys.version_info[0]}.{sys.version_info[1]}" in name


def test_missing_compiler_is_a_clear_build_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    problem = _build.compiler_problem()
    assert problem is not None and "/nonexistent/c++" in problem and "not found" in problem
    with pytest.raises(_build.BuildError, match="cannot build the C\\+\\+ extension 'ddn'.*not found"):
        _build.build("ddn", cache=tmp_path)

    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    problem = _build.compiler_problem()
    assert problem is not None and "no C++ compiler found" in problem and "install g++" in problem


@needs_compiler
def test_broken_source_is_a_build_error_with_the_compiler_message(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cpp").write_text("int fastcomp_broken() { return undeclared_name_in_broken_source; }\n")
    with pytest.raises(_build.BuildError) as failure:
        _build.build("attention", sources=["broken.cpp"], source_dir=src, cache=tmp_path / "cache")
    message = str(failure.value)
    first_line = message.splitlines()[0]
    assert "undeclared_name_in_broken_source" in first_line and "error" in first_line, message
    assert str(tmp_path / "cache") in message, "the message must name the build directory"
    assert "Traceback" not in message
    # recorded: the next attempt (another process, say) fails at once with the same first error ...
    build_dir = next((tmp_path / "cache").glob("*/attention-*"))
    assert (build_dir / "build.log").is_file() and (build_dir / "fastcomp-build-failed.json").is_file()
    with pytest.raises(_build.BuildError, match="failed earlier.*undeclared_name_in_broken_source"):
        _build.build("attention", sources=["broken.cpp"], source_dir=src, cache=tmp_path / "cache")
    # ... and `fastcomp build` (retry=True) compiles again
    with pytest.raises(_build.BuildError, match="failed: .*undeclared_name_in_broken_source"):
        _build._build("attention", ["broken.cpp"], src, tmp_path / "cache", retry=True)


def test_nvcc_problem_explains_a_cpu_torch():
    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here")
    problem = _build.nvcc_problem()
    assert problem is not None and "CPU build" in problem and "torch.version.cuda is None" in problem


@needs_nvcc
@needs_compiler
def test_compile_check_cuda_compiles_every_cu_file():
    checked = "\n".join(_build.compile_check_cuda())
    for cu in _build.source_dir().rglob("*.cu"):
        assert cu.name in checked, checked
    for source in _build.EXTENSIONS["cuda"]:  # paths relative to csrc/, e.g. ddn/ddn.cu
        assert source.rsplit("/", 1)[-1] in checked, checked


@needs_nvcc
def test_compile_check_cuda_reports_nvcc_errors_and_unlisted_files(monkeypatch, tmp_path):
    (tmp_path / "broken.cu").write_text("__global__ void k(float* p) { p[0] = undeclared_in_cu; }\n")
    (tmp_path / "attention_cpu.cpp").write_text("")
    monkeypatch.setattr(_build, "source_dir", lambda: tmp_path)
    with pytest.raises(_build.BuildError, match="not listed in EXTENSIONS"):
        _build.compile_check_cuda()
    monkeypatch.setitem(_build.EXTENSIONS, "cuda", ("broken.cu",))
    with pytest.raises(_build.BuildError, match="undeclared_in_cu"):
        _build.compile_check_cuda()


@needs_nvcc
@needs_compiler
def test_cli_build_check_cuda(shared_cache, monkeypatch, capsys):
    monkeypatch.setenv("FASTCOMP_CACHE_DIR", str(shared_cache[0]))
    assert cli_main(["build", "disk_mask", "cuda", "--check-cuda"]) == 0
    out = capsys.readouterr().out
    assert f"disk_mask [{_build.variants()[0].name}]: ready, cached" in out, out
    assert "check-cuda: nvcc: disk_mask.cu compiles" in out, out
    assert "check-cuda: g++: cuda_ops.cpp parses" in out, out
    if torch.version.cuda is None:
        assert "cuda: not built: torch" in out and "CPU build" in out, out


@needs_compiler
def test_cli_build_clean_keeps_only_the_current_build(shared_cache, monkeypatch, capsys):
    monkeypatch.setenv("FASTCOMP_CACHE_DIR", str(shared_cache[0]))
    stale = _build.cache_dir() / "disk_mask-native-0123456789abcdef"
    stale.mkdir()
    assert cli_main(["build", "disk_mask", "--clean"]) == 0
    out = capsys.readouterr().out
    assert not stale.exists() and f"removed {stale}" in out, out
    assert f"disk_mask [{_build.variants()[0].name}]: ready, cached" in out, out


def test_cli_cache_dir(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("FASTCOMP_CACHE_DIR", str(tmp_path))
    assert cli_main(["build", "--cache-dir"]) == 0
    assert capsys.readouterr().out.strip().startswith(str(tmp_path))
