"""Backend registry: every op has several implementations; each says whether it can run, and why not.

An op registers its implementations with :func:`register`. A backend answers two questions:

- ``machine_check()``: can it run on this machine at all (compiler present, triton installed, a GPU)?
  The answer is cached: the machine does not change under a running process.
- ``input_check(*args, **kwargs)``: can it run on these inputs (device, dtype, sizes)?

Each returns ``None`` when the answer is yes, otherwise a sentence saying why not and how to fix it.
``backend=None`` picks the highest-priority backend whose checks pass; naming a backend that cannot
run raises :class:`BackendUnavailable` with its reason, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Reason = Optional[str]

# Names users may pass as `backend=`; an op registers the subset it implements.
KNOWN_BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here or on these inputs; the message says why."""


class BuildFailure(str):
    """A reason that is a C++/CUDA extension that failed to build: auto mode skips the backend, and says
    so once per process with a RuntimeWarning (a silent fallback to a slower backend would hide it)."""

    def __new__(cls, text: str, extension: str):
        self = super().__new__(cls, text)
        self.extension = extension
        return self


_warned_extensions: set[str] = set()


def warn_build_failure(extension: str, message: str, *, stacklevel: int = 3) -> None:
    """One RuntimeWarning per process and failed extension, carrying the first compiler error."""
    if extension in _warned_extensions:
        return
    _warned_extensions.add(extension)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    fn: Callable
    priority: int  # higher wins when backend=None
    machine_check: Callable[[], Reason] = field(default=lambda: None)
    input_check: Callable[..., Reason] = field(default=lambda *a, **k: None)
    description: str = ""
    # Builds or loads what the backend needs (a C++/CUDA extension) before its first call; raises BuildError.
    prepare: Callable[[], None] = field(default=lambda: None)

    @property
    def machine_reason(self) -> Reason:
        # Not cached here: the checks cache what cannot change, and a failed build changes the answer.
        return self.machine_check()

    def why_not(self, *args, **kwargs) -> Reason:
        """None if this backend can run on these inputs, else the reason it cannot."""
        return self.machine_reason or self.input_check(*args, **kwargs)


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register(op: str, name: str, *, priority: int, machine_check=None, input_check=None,
             description: str = "", prepare=None):
    """Decorator: register ``fn`` as backend ``name`` of ``op``."""
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"backend name must be one of {KNOWN_BACKENDS}, got {name!r}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[name] = Backend(
            op=op, name=name, fn=fn, priority=priority,
            machine_check=machine_check or (lambda: None),
            input_check=input_check or (lambda *a, **k: None),
            description=description or (fn.__doc__ or "").strip().split("\n")[0],
            prepare=prepare or (lambda: None),
        )
        return fn

    return deco


def ops() -> list[str]:
    return sorted(_REGISTRY)


def backends(op: str) -> list[Backend]:
    """The backends registered for ``op``, best first."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known ops: {', '.join(ops())}")
    return sorted(_REGISTRY[op].values(), key=lambda b: -b.priority)


def get(op: str, name: str) -> Backend:
    """Backend ``name`` of ``op`` (KeyError if it has none)."""
    return _REGISTRY[op][name]


def dispatch(op: str, requested: Optional[str], check_args: tuple, call_args: tuple, *, compile_specs=None):
    """Run ``op`` on the requested backend, or on the best one that can run on ``check_args``.

    Under torch.compile the choice is made once, while tracing, by :func:`compile_time_choice` from the
    check arguments' metadata (``compile_specs()``, default :func:`tensor_spec` of each): the machine checks
    (compilers on PATH, build caches) cannot be traced, and neither can a failed build be retried there.
    """
    from ._build import BuildError

    if torch.compiler.is_compiling():
        specs = tuple(tensor_spec(a) for a in check_args) if compile_specs is None else compile_specs()
        return get(op, compile_time_choice(op, requested, specs)).fn(*call_args)
    failed: list[str] = []
    while True:
        chosen = choose(op, requested, *check_args, exclude=failed)
        try:
            return chosen.fn(*call_args)
        except BuildError as e:  # a build that failed inside the backend's launcher
            _skip_unbuildable(op, requested, chosen, e)
            failed.append(chosen.name)


def tensor_spec(t: Optional[torch.Tensor], shape=None):
    """What a compile-time choice knows of a check argument: (device type, dtype, shape) of a tensor, with
    every size 1 unless ``shape`` gives the sizes a backend's input check reads (as Python ints)."""
    if not isinstance(t, torch.Tensor):
        return t
    return (t.device.type, t.dtype, tuple(shape) if shape is not None else (1,) * t.dim())


@torch.compiler.assume_constant_result
def compile_time_choice(op: str, requested: Optional[str], specs: tuple) -> str:
    """The backend eager dispatch (:func:`choose`) picks for check arguments of this metadata, by name.

    Runs once per trace, not traced: each spec from :func:`tensor_spec` becomes a fake tensor (no memory, any
    device, e.g. CUDA on a machine without one) of that device, dtype and shape, and the same selection and
    build as eager calls run on them; the input checks look only at these. Builds the chosen backend's
    extension now, falling back as eager dispatch does when that fails."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = [torch.empty(s[2], device=s[0], dtype=s[1]) if isinstance(s, tuple) else s for s in specs]
    return choose(op, requested, *args).name


def choose(op: str, requested: Optional[str], *args, exclude=()) -> Backend:
    """:func:`select`, then the chosen backend's ``prepare`` (its extension built or loaded).

    In auto mode a backend whose C++/CUDA extension fails to compile is skipped with a warning that
    carries the compiler's message (and stays skipped for the process); a requested one raises. Eager
    dispatch and the compile-time choice of the ops (made while torch.compile traces) both come here.
    """
    from ._build import BuildError

    failed = list(exclude)
    while True:
        chosen = select(op, requested, *args, exclude=failed)
        try:
            chosen.prepare()
            return chosen
        except BuildError as e:
            _skip_unbuildable(op, requested, chosen, e)
            failed.append(chosen.name)


def _skip_unbuildable(op: str, requested: Optional[str], chosen: Backend, error: Exception) -> None:
    """A requested backend's build failure raises; in auto mode one RuntimeWarning per process and
    extension says that the backend is skipped, with the compiler's first error."""
    if requested is not None:
        raise error
    warn_build_failure(getattr(error, "extension", None) or f"{op}:{chosen.name}",
                       f"{op}: backend {chosen.name!r} is unavailable, falling back to the next one: {error}",
                       stacklevel=4)


def select(op: str, requested: Optional[str], *args, exclude=(), **kwargs) -> Backend:
    """Pick the backend for this call: the one requested, or the best that can run on the inputs."""
    table = _REGISTRY[op]
    if requested is not None:
        if not isinstance(requested, str) or requested not in table:
            have = ", ".join(b.name for b in backends(op))
            extra = ""
            if requested in KNOWN_BACKENDS:
                extra = f" ({op} has no {requested!r} backend yet)"
            raise ValueError(f"{op}: backend must be None or one of: {have}; got {requested!r}{extra}")
        chosen = table[requested]
        reason = chosen.why_not(*args, **kwargs)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {requested!r} cannot run: {reason}")
        return chosen
    reasons = []
    for candidate in backends(op):
        if candidate.name in exclude:
            continue
        never_auto = not_for_auto(candidate, *args, **kwargs)
        if never_auto is not None:
            reasons.append(f"{candidate.name}: {never_auto}")
            continue
        reason = candidate.why_not(*args, **kwargs)
        if reason is None:
            return candidate
        if isinstance(reason, BuildFailure):
            warn_build_failure(reason.extension, f"{op}: backend {candidate.name!r} is unavailable, falling back to "
                                                 f"the next one: {reason}")
        reasons.append(f"{candidate.name}: {reason}")
    # Unreachable while every op has a reference backend that accepts all valid inputs.
    raise BackendUnavailable(f"{op}: no backend can run on these inputs; " + "; ".join(reasons))


def not_for_auto(backend: Backend, *args, **kwargs) -> Reason:
    """Why ``backend`` is never picked automatically for these inputs (None if it may be).

    Triton on CPU tensors runs only in its interpreter: a test path, orders of magnitude slower than the
    C++ backend, so only an explicit backend="triton" gets it (and benchmarks skip it).
    """
    on_cpu = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in (*args, *kwargs.values()))
    if backend.name == "triton" and on_cpu:
        return ("CPU tensors run Triton only in its interpreter (a test path, not a fast one); ask for "
                "backend='triton' explicitly, or use CUDA tensors")
    return None


# --- machine checks shared by the ops' backends ---------------------------------------------------

@functools.lru_cache(maxsize=None)
def triton_problem() -> Reason:
    """Why Triton kernels cannot run here at all (None if they can, natively or interpreted)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux x86_64 only)"
    if not torch.cuda.is_available() and not triton_interpreted():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing fastcomp to run on CPU, slowly)"
    return None


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cuda_problem() -> Reason:
    """Why CUDA extensions cannot run here (None if they can)."""
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__} sees none)"
    from . import _build

    failed = _build.failure("cuda")
    return _build.nvcc_problem() or (BuildFailure(failed, "cuda") if failed else None)


def cpp_problem(extension: str) -> Callable[[], Reason]:
    """The machine check of a backend on the C++ CPU extension ``extension`` (an op family of
    fastcomp._build.EXTENSIONS): why it cannot be built or loaded here, None if it can. Each family is its
    own extension, so a family that fails to build takes out only its own op."""

    def check() -> Reason:
        from . import _build

        if _build.loaded(extension):  # in this process already: nothing can stop it now (the per-call path)
            return None
        problem = _build.compiler_problem()
        if problem:
            return problem
        failed = _build.failure(extension)
        return BuildFailure(failed, extension) if failed else None

    check.__name__ = f"cpp_problem_{extension}"
    return check


def cpp_prepare(extension: str) -> Callable[[], None]:
    """The ``prepare`` of a backend on the C++ CPU extension ``extension``: build (first use) or load it;
    raises BuildError when it cannot be built."""

    def prepare() -> None:
        from . import _build

        _build.load(extension)

    prepare.__name__ = f"cpp_prepare_{extension}"
    return prepare


def triton_input_problem(*tensors: torch.Tensor) -> Reason:
    """Triton runs on CUDA tensors, or on CPU tensors only under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and triton_interpreted():
            continue
        return f"tensors are on {t.device}; the triton backend needs CUDA tensors"
    return None


def device_input_problem(kind: str, *tensors: torch.Tensor) -> Reason:
    for t in tensors:
        if t is not None and t.device.type != kind:
            return f"tensors are on {t.device}; this backend needs {kind} tensors"
    return None


def dtype_input_problem(allowed: tuple, *tensors: torch.Tensor) -> Reason:
    for t in tensors:
        if t is not None and t.is_floating_point() and t.dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            return f"dtype {str(t.dtype).replace('torch.', '')} is not supported (supported: {names})"
    return None
