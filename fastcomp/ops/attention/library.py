"""The local conditional attention as torch.library custom ops, with the one autograd path of its fused backends.

A fused backend supplies three launchers with this contract (cpu.py for C++, triton.py for Triton):

    forward(q, k, v, cond_k, cond_v, cond_mask, kernel_size, scale) -> (out, lse)
        q, k, v [B, H, W, heads, D] any strides; cond_k, cond_v [B, M, heads, D] or None (M may be 0);
        cond_mask [B, M, H, W] bool or None (None with cond given: every pixel sees every conditioner);
        kernel_size (kh, kw); scale already resolved. out [B, H, W, heads, D] in q.dtype; lse opaque,
        [B, heads, H, W] in the backend's lse_dtype(q.dtype).
    backward(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, kernel_size, scale)
        -> (dq, dk, dv, dcond_k, dcond_v), dcond_* None when cond_k is None.
    jvp(q, k, v, cond_k, cond_v, cond_mask, out, lse, dq, dk, dv, dcond_k, dcond_v, kernel_size, scale)
        -> dout, the tangent of out (tangents None where zero).

:func:`make_fused_backend` turns them into custom ops fastcomp::lca_{forward,backward,jvp}_<backend> (fake
implementations, vmap rules folding the vmapped dim into B) and one autograd.Function over them, the single
autograd path eagerly, under torch.func and under torch.compile (see fastcomp/ops/_library.py for why the
Function sits above the ops). The registry (fastcomp.backends) resolves the backend once per call and runs
the function returned here: nothing below it looks at a backend name.
"""

from __future__ import annotations

import torch

from .. import _library

OP = "local_conditional_attention"

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


def empty_cond(q: torch.Tensor) -> torch.Tensor:
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
            dck, dcv = empty_cond(q), empty_cond(q)
        return dq, dk, dv, dck, dcv

    def backward_fake(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, kh, kw, scale):
        cond = empty_cond(q) if cond_k is None else cond_k
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
            # a plain backward (no create_graph, no transform) runs the kernel itself; else the op, under
            # the Function that refuses a second derivative
            dq, dk, dv, dck, dcv = _library.call(gradient.apply, backward_impl, grad_out, q, k, v, cond_k, cond_v,
                                                 cond_mask, out, lse, ctx.kh, ctx.kw, ctx.scale)
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
        # inference (no graph to record) runs the launcher without the Function and the op
        return _library.call(Fused.apply, forward_impl, q, k, v, cond_k, cond_v, cond_mask, kernel_size[0],
                             kernel_size[1], scale)[0]

    return run, Fused
