"""Public local conditional attention and disk masks: input checks, then dispatch to a backend."""

from __future__ import annotations

import math
import operator
import sys
from typing import Optional, Union

import torch

from .. import backends as _b
from ..reference.attention import (disk_mask_reference, local_conditional_attention_reference, propagate_poison,
                                   screen_conditioners)
from . import _checks as check
from . import _library

OP = "local_conditional_attention"


def _kernel_size(kernel_size, H: int, W: int) -> tuple[int, int]:
    if check.is_int(kernel_size):  # numpy integers too
        kh = kw = int(kernel_size)
    elif isinstance(kernel_size, (tuple, list)) and len(kernel_size) == 2 and all(map(check.is_int, kernel_size)):
        kh, kw = (int(s) for s in kernel_size)
    else:
        raise TypeError(f"{OP}: kernel_size must be an odd int or a pair (kh, kw), got {kernel_size!r}")
    for name, size, side, side_name in (("kh", kh, H, "H"), ("kw", kw, W, "W")):
        if size < 1 or size % 2 == 0:
            raise ValueError(f"{OP}: kernel_size must be odd and >= 1 so the window has a centre, "
                             f"got {name} = {size} (kernel_size={kernel_size!r})")
        if size > side:
            raise ValueError(f"{OP}: kernel_size {name} = {size} is larger than the image side {side_name} = "
                             f"{side}; use a kernel of at most {side if side % 2 else side - 1}")
    return kh, kw


def local_conditional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: Union[int, tuple[int, int]],
    *,
    cond_k: Optional[torch.Tensor] = None,
    cond_v: Optional[torch.Tensor] = None,
    cond_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Image tokens attend a 2-D window of image tokens plus the conditioners allowed there, in one softmax.

    q, k, v: [B, H, W, heads, D] (heads-last, as NATTEN). kernel_size: odd int or (kh, kw), each at most
    the image side; pixel (i, j) attends the kh x kw window whose top-left corner is
    (clamp(i - kh//2, 0, H - kh), clamp(j - kw//2, 0, W - kw)).
    cond_k, cond_v: [B, M, heads, D] conditioner tokens (both or neither; M may be 0).
    cond_mask: [B, M, H, W] bool, may pixel (i, j) attend conditioner m? None = every pixel sees all.
    A conditioner changes only the pixels that see it, on every backend, even when it holds NaN or inf
    (padding); a pixel that sees a non-finite conditioner gets NaN.
    scale: softmax scale, finite and > 0, default D ** -0.5. backend: None (best available) or a name from
    ``fastcomp info``. Returns [B, H, W, heads, D].
    """
    check.tensor(OP, "q", q, ndim=5, layout="[B, H, W, heads, D]")
    check.floating(OP, "q", q)
    B, H, W, heads, D = q.shape
    for name, t in (("k", k), ("v", v)):
        check.tensor(OP, name, t, ndim=5, layout="[B, H, W, heads, D]")
        check.shape(OP, name, t, q.shape, "[B, H, W, heads, D]", "must match q")
    check.same_dtype(OP, "q", q, k=k, v=v, cond_k=cond_k, cond_v=cond_v)
    check.same_device(OP, "q", q, k=k, v=v, cond_k=cond_k, cond_v=cond_v, cond_mask=cond_mask)
    kh, kw = _kernel_size(kernel_size, H, W)

    if (cond_k is None) != (cond_v is None):
        given, missing = ("cond_k", "cond_v") if cond_v is None else ("cond_v", "cond_k")
        raise ValueError(f"{OP}: {given} was given without {missing}; pass both conditioner keys and "
                         f"values, or neither")
    if cond_k is not None:
        check.tensor(OP, "cond_k", cond_k, ndim=4, layout="[B, M, heads, D]")
        M = cond_k.shape[1]
        check.shape(OP, "cond_k", cond_k, (B, M, heads, D), "[B, M, heads, D]", "B, heads and D from q")
        check.tensor(OP, "cond_v", cond_v, ndim=4, layout="[B, M, heads, D]")
        check.shape(OP, "cond_v", cond_v, cond_k.shape, "[B, M, heads, D]", "must match cond_k")
        if cond_mask is not None:
            check.tensor(OP, "cond_mask", cond_mask, ndim=4, layout="[B, M, H, W]")
            if cond_mask.dtype != torch.bool:
                raise TypeError(f"{OP}: cond_mask must be a bool tensor, got {check.dtype_name(cond_mask.dtype)}"
                                f"; build it with a comparison or fastcomp.disk_mask, or call .bool()")
            check.shape(OP, "cond_mask", cond_mask, (B, M, H, W), "[B, M, H, W]",
                        "B and H, W from q, M from cond_k")
    elif cond_mask is not None:
        raise ValueError(f"{OP}: cond_mask was given without cond_k/cond_v; it says which conditioner "
                         f"tokens a pixel may attend, so pass the tokens too (or drop the mask)")
    if scale is not None:
        scale = check.positive_finite(OP, "scale", scale, "the softmax scale; None for the default D ** -0.5")
    else:  # resolved once here, so every backend gets the same number
        scale = D ** -0.5

    if B == 0:  # nothing to attend; the result is empty but shaped and still differentiable
        return q * 0.0
    # Conditioners no pixel sees, and non-finite ones, reach no kernel (see screen_conditioners).
    cond_k, cond_v, poisoned = screen_conditioners(cond_k, cond_v, cond_mask, H, W)
    call_args = (q, k, v, (kh, kw), cond_k, cond_v, cond_mask, scale)
    # Under torch.compile the choice is made while tracing from the metadata the backends' input checks read:
    # device, dtype, head dim (operator.index specializes a symbolic one), conditioners and mask or not.
    def compile_specs():
        image, cond = (1, kh, kw, 1, operator.index(D)), (1, 1, 1, operator.index(D))
        return (*(_b.tensor_spec(t, image) for t in (q, k, v)), *(_b.tensor_spec(t, cond) for t in (cond_k, cond_v)),
                _b.tensor_spec(cond_mask, (1, 1, kh, kw)))

    out = _b.dispatch(OP, backend, (q, k, v, cond_k, cond_v, cond_mask), call_args, compile_specs=compile_specs)
    return propagate_poison(out, poisoned)


@_b.register(OP, "reference", priority=0,
             description="dense masked scaled_dot_product_attention, O((H*W)^2) memory")
def _attention_reference(q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale):
    return local_conditional_attention_reference(q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale)


# --- fused backends ----------------------------------------------------------------------------------
#
# A fused backend supplies three launchers with this contract (lca_*_cpu below for C++, kernels/
# local_attention.py and kernels/local_attention_jvp.py for Triton):
#   forward(q, k, v, cond_k, cond_v, cond_mask, kernel_size, scale) -> (out, lse)
#       q, k, v [B, H, W, heads, D] any strides; cond_k, cond_v [B, M, heads, D] or None (M may be 0);
#       cond_mask [B, M, H, W] bool or None (None with cond given: every pixel sees every conditioner);
#       kernel_size (kh, kw); scale already resolved. out [B, H, W, heads, D] in q.dtype; lse opaque,
#       [B, heads, H, W] in the backend's lse_dtype(q.dtype).
#   backward(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, kernel_size, scale)
#       -> (dq, dk, dv, dcond_k, dcond_v), dcond_* None when cond_k is None.
#   jvp(q, k, v, cond_k, cond_v, cond_mask, out, lse, dq, dk, dv, dcond_k, dcond_v, kernel_size, scale)
#       -> dout, the tangent of out (tangents None where zero).
# make_fused_backend turns them into custom ops fastcomp::lca_{forward,backward,jvp}_<backend> (fake
# implementations, vmap rules folding the vmapped dim into B) and one autograd.Function over them, the
# single autograd path eagerly, under torch.func and under torch.compile (see ops/_library.py).

CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # half precision: float32 inside
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_HEAD_DIMS = (16, 128)  # kernels/local_attention.py pads D to a power of two up to 128

_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? cond_k, Tensor? cond_v, Tensor? cond_mask, SymInt kh, "
               "SymInt kw, float scale) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? cond_k, Tensor? cond_v, Tensor? cond_mask, "
               "Tensor out, Tensor lse, SymInt kh, SymInt kw, float scale) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_JVP_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? cond_k, Tensor? cond_v, Tensor? cond_mask, Tensor out, "
               "Tensor lse, Tensor? dq, Tensor? dk, Tensor? dv, Tensor? dcond_k, Tensor? dcond_v, SymInt kh, "
               "SymInt kw, float scale) -> Tensor")
# Which arguments of each kernel carry the batch dim first (all tensors do): the vmap rules fold into it.
_FWD_BATCHED = (True,) * 6 + (False,) * 3
_BWD_BATCHED = (True,) * 9 + (False,) * 3
_JVP_BATCHED = (True,) * 13 + (False,) * 3


def _empty_cond(q: torch.Tensor) -> torch.Tensor:
    B, _, _, heads, D = q.shape
    return q.new_empty(B, 0, heads, D)


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def make_fused_backend(backend: str, forward, backward, jvp, lse_dtype):
    """(the backend's entry point fn(q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale) -> out,
    its autograd.Function) for a launcher triple (contract above); lse_dtype(q.dtype) -> lse's dtype."""
    name = f"fastcomp::lca_{{}}_{backend}"

    def forward_impl(q, k, v, cond_k, cond_v, cond_mask, kh, kw, scale):
        out, lse = forward(q, k, v, cond_k, cond_v, cond_mask, (kh, kw), scale)
        return out.contiguous(), lse.contiguous()

    def forward_fake(q, k, v, cond_k, cond_v, cond_mask, kh, kw, scale):
        B, H, W, heads, _ = q.shape
        return _contiguous_like(q), q.new_empty(B, heads, H, W, dtype=lse_dtype(q.dtype))

    def backward_impl(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, kh, kw, scale):
        grads = backward(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, (kh, kw), scale)
        dq, dk, dv, dck, dcv = (None if g is None else g.contiguous() for g in grads)
        if dck is None:  # an op's outputs cannot be None: empty [B, 0, heads, D] conditioner gradients
            dck, dcv = _empty_cond(q), _empty_cond(q)
        return dq, dk, dv, dck, dcv

    def backward_fake(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, kh, kw, scale):
        cond = _empty_cond(q) if cond_k is None else cond_k
        return (*(_contiguous_like(q) for _ in range(3)), _contiguous_like(cond), _contiguous_like(cond))

    def jvp_impl(q, k, v, cond_k, cond_v, cond_mask, out, lse, dq, dk, dv, dcond_k, dcond_v, kh, kw, scale):
        return jvp(q, k, v, cond_k, cond_v, cond_mask, out, lse, dq, dk, dv, dcond_k, dcond_v, (kh, kw),
                   scale).contiguous()

    def jvp_fake(q, *rest):
        return _contiguous_like(q)

    forward_op = torch.library.custom_op(name.format("forward"), forward_impl, mutates_args=(), schema=_FWD_SCHEMA)
    forward_op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(name.format("backward"), backward_impl, mutates_args=(),
                                          schema=_BWD_SCHEMA)
    backward_op.register_fake(backward_fake)
    jvp_op = torch.library.custom_op(name.format("jvp"), jvp_impl, mutates_args=(), schema=_JVP_SCHEMA)
    jvp_op.register_fake(jvp_fake)

    def vmap_rule(op, batched, n_out):
        def rule(info, in_dims, *args):
            result = op(*_library.fold_batch(info, in_dims, args, batched))
            if n_out == 1:
                return _library.unfold_batch(result, info.batch_size), 0
            return tuple(_library.unfold_batch(r, info.batch_size) for r in result), (0,) * n_out

        op.register_vmap(rule)

    vmap_rule(forward_op, _FWD_BATCHED, 2)
    vmap_rule(backward_op, _BWD_BATCHED, 5)
    vmap_rule(jvp_op, _JVP_BATCHED, 1)
    gradient = _library.once_differentiable(backward_op, OP, repr(backend))

    class Fused(torch.autograd.Function):
        """Autograd of the fused kernels: backward and jvp from the saved out and lse; vmap through the
        kernels' own rules (generate_vmap_rule)."""

        generate_vmap_rule = True

        @staticmethod
        def forward(q, k, v, cond_k, cond_v, cond_mask, kh, kw, scale):
            return forward_op(q, k, v, cond_k, cond_v, cond_mask, kh, kw, scale)

        @staticmethod
        def setup_context(ctx, inputs, output):
            q, k, v, cond_k, cond_v, cond_mask, kh, kw, scale = inputs
            out, lse = output
            ctx.mark_non_differentiable(lse)
            ctx.save_for_backward(q, k, v, cond_k, cond_v, cond_mask, out, lse)
            ctx.save_for_forward(q, k, v, cond_k, cond_v, cond_mask, out, lse)
            ctx.kh, ctx.kw, ctx.scale = kh, kw, scale

        @staticmethod
        def backward(ctx, grad_out, _grad_lse):
            q, k, v, cond_k, cond_v, cond_mask, out, lse = ctx.saved_tensors
            dq, dk, dv, dck, dcv = gradient.apply(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, ctx.kh,
                                                  ctx.kw, ctx.scale)
            if cond_k is None:
                dck = dcv = None
            return dq, dk, dv, dck, dcv, None, None, None, None

        @staticmethod
        def jvp(ctx, dq, dk, dv, dcond_k, dcond_v, *_):
            q, k, v, cond_k, cond_v, cond_mask, out, lse = ctx.saved_tensors
            dout = jvp_op(q, k, v, cond_k, cond_v, cond_mask, out, lse, dq, dk, dv,
                          None if cond_k is None else dcond_k, None if cond_k is None else dcond_v,
                          ctx.kh, ctx.kw, ctx.scale)
            return dout, None

    Fused.__name__ = Fused.__qualname__ = f"LocalConditionalAttention_{backend}"
    _library.compile_opaque(Fused)

    def run(q, k, v, kernel_size, cond_k, cond_v, cond_mask, scale):
        return Fused.apply(q, k, v, cond_k, cond_v, cond_mask, kernel_size[0], kernel_size[1], scale)[0]

    return run, Fused


# --- the cpu backend's launchers (csrc/attention_cpu.cpp, csrc/attention_jvp_cpu.cpp) ------------------

def _cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The C++ kernels run float32 and float64; float16 and bfloat16 inputs run in float32 inside."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu_inputs(work, *tensors):
    return [None if t is None else t.to(work).contiguous() for t in tensors]


def _cpu_cond(q, cond_k, cond_v, cond_mask):
    """The C++ kernels' conditioner arguments: [B, 0, heads, D] tensors for none, an empty mask for all."""
    cond_k = _empty_cond(q) if cond_k is None else cond_k
    cond_v = _empty_cond(q) if cond_v is None else cond_v
    mask = torch.empty(0, dtype=torch.bool) if cond_mask is None else cond_mask.contiguous()
    return cond_k, cond_v, mask


def lca_forward_cpu(q, k, v, cond_k, cond_v, cond_mask, kernel_size, scale):
    """C++ forward: (out [B, H, W, heads, D] in q.dtype, lse [B, heads, H, W] in the compute dtype)."""
    from .. import _build

    B, H, W, heads, D = q.shape
    work = _cpu_compute_dtype(q.dtype)
    qw, kw_, vw, ckw, cvw = _cpu_inputs(work, q, k, v, cond_k, cond_v)
    ckw, cvw, mask = _cpu_cond(qw, ckw, cvw, cond_mask)
    out = torch.empty(q.shape, dtype=work)
    lse = torch.empty(B, heads, H, W, dtype=work)
    _build.load("attention").local_attention_forward_cpu(qw, kw_, vw, ckw, cvw, mask, kernel_size[0], kernel_size[1],
                                                   float(scale), out, lse)
    return out.to(q.dtype), lse


def lca_backward_cpu(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, kernel_size, scale):
    """C++ backward: (dq, dk, dv, dcond_k, dcond_v) in q.dtype, the last two None when cond_k is None."""
    from .. import _build

    has_cond = cond_k is not None
    work = _cpu_compute_dtype(q.dtype)
    go, qw, kw_, vw, ow, ckw, cvw = _cpu_inputs(work, grad_out, q, k, v, out, cond_k, cond_v)
    ckw, cvw, mask = _cpu_cond(qw, ckw, cvw, cond_mask)
    dq, dk, dv = (torch.empty(q.shape, dtype=work) for _ in range(3))
    dcond_k, dcond_v = torch.empty(ckw.shape, dtype=work), torch.empty(ckw.shape, dtype=work)
    _build.load("attention").local_attention_backward_cpu(go, qw, kw_, vw, ckw, cvw, mask, ow, lse.contiguous(),
                                                    kernel_size[0], kernel_size[1], float(scale),
                                                    dq, dk, dv, dcond_k, dcond_v)
    grads = (dq, dk, dv) + ((dcond_k, dcond_v) if has_cond else (None, None))
    return tuple(None if g is None else g.to(q.dtype) for g in grads)


def lca_jvp_cpu(q, k, v, cond_k, cond_v, cond_mask, out, lse, dq, dk, dv, dcond_k, dcond_v, kernel_size, scale):
    """C++ forward-mode derivative: the tangent of out [B, H, W, heads, D] in q.dtype."""
    from .. import _build

    work = _cpu_compute_dtype(q.dtype)
    qw, kw_, vw, ow, ckw, cvw = _cpu_inputs(work, q, k, v, out, cond_k, cond_v)
    ckw, cvw, mask = _cpu_cond(qw, ckw, cvw, cond_mask)
    zero = torch.empty(0, dtype=work)  # an absent tangent
    tangents = [zero if t is None else t for t in _cpu_inputs(work, dq, dk, dv, dcond_k, dcond_v)]
    dout = torch.empty(q.shape, dtype=work)
    _build.load("attention").local_attention_jvp_cpu(qw, kw_, vw, ckw, cvw, mask, ow, lse.contiguous(), *tangents,
                                               kernel_size[0], kernel_size[1], float(scale), dout)
    return dout.to(q.dtype)


def _triton_forward(*args):
    from ..kernels.local_attention import lca_forward

    return lca_forward(*args)


def _triton_backward(*args):
    from ..kernels.local_attention import lca_backward

    return lca_backward(*args)


def _triton_jvp(*args):
    from ..kernels.local_attention_jvp import lca_jvp

    return lca_jvp(*args)


def _triton_head_dim_problem(q):
    D = q.shape[-1]
    if not TRITON_HEAD_DIMS[0] <= D <= TRITON_HEAD_DIMS[1]:
        return (f"head dim D = {D} is outside the {TRITON_HEAD_DIMS[0]}..{TRITON_HEAD_DIMS[1]} the Triton kernels "
                f"support; use the cpu backend, or pad D with zeros (it does not change the result)")
    return None


_attention_cpu, CpuFunction = make_fused_backend(
    "cpu", lca_forward_cpu, lca_backward_cpu, lca_jvp_cpu, lse_dtype=_cpu_compute_dtype)
_b.register(OP, "cpu", priority=10, machine_check=_b.cpp_problem("attention"), prepare=_b.cpp_prepare("attention"),
            input_check=lambda q, *rest: (_b.device_input_problem("cpu", q, *rest)
                                          or _b.dtype_input_problem(CPU_DTYPES, q)),
            description="C++ extension, OpenMP over (b, head, rows), vectorized over queries; O(H*W) memory; "
                        "float16/bfloat16 run in float32 inside")(_attention_cpu)

_attention_triton, TritonFunction = make_fused_backend(
    "triton", _triton_forward, _triton_backward, _triton_jvp, lse_dtype=lambda dtype: torch.float32)
_b.register(OP, "triton", priority=15, machine_check=_b.triton_problem,
            input_check=lambda q, *rest: (_b.triton_input_problem(q, *rest)
                                          or _b.dtype_input_problem(TRITON_DTYPES, q)
                                          or _triton_head_dim_problem(q)),
            description="Triton kernels, fused online softmax over window + conditioners")(_attention_triton)


# --- disk masks -----------------------------------------------------------------------------------

DISK = "disk_mask"


def disk_mask(points: torch.Tensor, radius: float, H: int, W: int, *, backend: Optional[str] = None
              ) -> torch.Tensor:
    """[B, M, H, W] bool: pixel (i, j) is inside disk m when (i - row)^2 + (j - col)^2 <= radius^2.

    points: [B, M, 2] (row, col) in pixels, any real dtype; evaluated in float64 so every backend
    agrees exactly on the boundary. radius: >= 0.
    """
    check.tensor(DISK, "points", points, ndim=3, layout="[B, M, 2]")
    if points.shape[2] != 2:
        raise ValueError(f"{DISK}: points must have shape [B, M, 2] holding (row, col), "
                         f"got {check.fmt_shape(points.shape)}")
    if points.is_complex() or points.dtype == torch.bool:
        raise TypeError(f"{DISK}: points must be real numbers, got {check.dtype_name(points.dtype)}")
    if not check.is_real(radius):
        raise TypeError(f"{DISK}: radius must be a number, got {type(radius).__name__}")
    if not radius >= 0:  # also refuses NaN
        raise ValueError(f"{DISK}: radius must be >= 0, got {radius} (inf: every pixel is inside)")
    radius = float(radius)
    if radius > _HUGE_RADIUS:  # radius ** 2 overflows float64: it is inf on every backend, so say so once
        radius = math.inf
    H = check.positive_int(DISK, "H", H)
    W = check.positive_int(DISK, "W", W)
    return _b.dispatch(DISK, backend, (points,), (points, radius, H, W))


# Above this radius ** 2 is inf in float64 (and Python's float ** 2 raises OverflowError).
_HUGE_RADIUS = math.sqrt(sys.float_info.max)


@_b.register(DISK, "reference", priority=0, description="broadcast comparison in float64")
def _disk_mask_reference(points, radius, H, W):
    return disk_mask_reference(points, radius, H, W)


# The fast disk masks are torch.library custom ops fastcomp::disk_mask_<backend> (fake implementation and a
# vmap rule folding the vmapped dim into B), so torch.compile sees one opaque node: no extension load or
# host-side check inside the traced region. C++/CUDA (csrc/cpu_ops.cpp, csrc/disk_mask.cu) write an output
# allocated here, compiled on first use by fastcomp._build.

_DISK_SCHEMA = "(Tensor points, float radius, SymInt H, SymInt W) -> Tensor"


def _disk_mask_op(backend: str, compute):
    """The custom op over compute(points, radius, H, W) -> [B, M, H, W] bool."""
    op = torch.library.custom_op(f"fastcomp::disk_mask_{backend}", compute, mutates_args=(), schema=_DISK_SCHEMA)

    @op.register_fake
    def _(points, radius, H, W):
        return points.new_empty(points.shape[0], points.shape[1], H, W, dtype=torch.bool)

    @op.register_vmap
    def _(info, in_dims, points, radius, H, W):
        (points,) = _library.fold_batch(info, in_dims[:1], (points,), (True,))
        return _library.unfold_batch(op(points, radius, H, W), info.batch_size), 0

    return op


def _disk_mask_extension_args(points, H, W):
    """(float64 contiguous points, the [B, M, H, W] bool output for the kernel to write)."""
    points = points.to(torch.float64).contiguous()
    return points, torch.empty(points.shape[0], points.shape[1], H, W, dtype=torch.bool, device=points.device)


def _disk_mask_triton_compute(points, radius, H, W):
    from ..kernels.disk_mask import disk_mask_triton

    return disk_mask_triton(points, radius, H, W)


def _disk_mask_cpu_compute(points, radius, H, W):
    from .. import _build

    points, out = _disk_mask_extension_args(points, H, W)
    _build.load("disk_mask").disk_mask_cpu(points, radius, out)
    return out


def _disk_mask_cuda_compute(points, radius, H, W):
    from .. import _build

    points, out = _disk_mask_extension_args(points, H, W)
    _build.load("cuda").disk_mask_cuda(points, radius, out, torch.cuda.current_stream(points.device).cuda_stream)
    return out


_b.register(DISK, "triton", priority=15, machine_check=_b.triton_problem,
            input_check=lambda points: _b.triton_input_problem(points),
            description="Triton kernel, one program per (b, m, row)")(_disk_mask_op("triton", _disk_mask_triton_compute))
_b.register(DISK, "cpu", priority=10, machine_check=_b.cpp_problem("disk_mask"), prepare=_b.cpp_prepare("disk_mask"),
            input_check=lambda points: _b.device_input_problem("cpu", points),
            description="C++ extension, OpenMP over (b, m, row), vectorized over columns")(
    _disk_mask_op("cpu", _disk_mask_cpu_compute))
_b.register(DISK, "cuda", priority=20, machine_check=_b.cuda_problem,
            input_check=lambda points: _b.device_input_problem("cuda", points),
            description="CUDA extension, one thread per pixel, rows across the grid")(
    _disk_mask_op("cuda", _disk_mask_cuda_compute))
