"""DDN selection as torch.library custom ops, and the one autograd path of every DDN backend.

Each backend's selection is a custom op fastcomp::ddn_select_<backend>(features, weight, target, bias,
residual, metric) -> (index, distances float32, the chosen candidate), with no autograd (the index is
piecewise constant): torch.compile sees one opaque node with a fake implementation, so the selection's
host syncs, extension loads and size-dependent Python branches stay out of the graph. Its output then goes
through the chosen candidate (:func:`make_chosen_candidate`), the autograd path of ddn_select and
ddn_gather: backward and jvp through the chosen candidate only. ddn_gather's fast backends run the
candidate kernel (its own custom op on triton and cuda, the chosen candidate's forward on cpu and torch)
under the same autograd.

The chosen candidate has two sets of kernels: the "cpu" backend's C++ ones (cpu.py) and PyTorch's
(pytorch.py: two bmm and two index_add, any device), which the torch, triton and cuda backends share
(cuBLAS already does those well on a GPU). The registry resolves the backend once per call; each backend's
run function below is bound to its kernels when it is registered, so nothing dispatches on a name again.
"""

from __future__ import annotations

import torch

from .._library import (call, compile_opaque, fold_batch, once_differentiable, plain_tensor, records_grad,
                       runs_untransformed, unfold_batch)

SELECT = "ddn_select"
GATHER = "ddn_gather"

_SELECT_SCHEMA = ("(Tensor features, Tensor weight, Tensor target, Tensor? bias, Tensor? residual, str metric) "
                  "-> (Tensor, Tensor, Tensor)")
_GATHER_SCHEMA = "(Tensor features, Tensor weight, Tensor index, Tensor? bias, Tensor? residual) -> Tensor"
_CHOSEN_FORWARD_SCHEMA = "(Tensor features, Tensor weight, Tensor index, Tensor? bias, Tensor? residual) -> Tensor"
_CHOSEN_BACKWARD_SCHEMA = ("(Tensor d_out, Tensor features, Tensor weight, Tensor index, bool has_bias) "
                           "-> (Tensor, Tensor, Tensor)")


def _detached(*tensors):
    return tuple(None if t is None else t.detach() for t in tensors)


def selection_op(backend: str, compute, chosen_candidate):
    """ddn_select's run function for ``backend``: the custom op over compute(features, weight, target,
    bias, residual, metric) -> (index, distances, out), then ``chosen_candidate`` for the autograd."""
    def impl(features, weight, target, bias, residual, metric):
        index, distances, out = compute(features, weight, target, bias, residual, metric)
        return index.contiguous(), distances.float().contiguous(), out.contiguous()

    op = torch.library.custom_op(f"fastcomp::ddn_select_{backend}", impl, mutates_args=(), schema=_SELECT_SCHEMA)

    @op.register_fake
    def _(features, weight, target, bias, residual, metric):
        B = features.shape[0]
        return (features.new_empty(B, dtype=torch.int64), features.new_empty(B, weight.shape[0], dtype=torch.float32),
                torch.empty_like(target, memory_format=torch.contiguous_format))

    @op.register_vmap
    def _(info, in_dims, features, weight, target, bias, residual, metric):
        if in_dims[1] is not None or in_dims[3] is not None:
            raise NotImplementedError(f"{SELECT}: vmap over weight or bias is not supported (each vmapped "
                                      f"instance would select among its own K candidates); loop over them")
        f, t, r = fold_batch(info, (in_dims[0], in_dims[2], in_dims[4]), (features, target, residual), (True,) * 3)
        return tuple(unfold_batch(x, info.batch_size) for x in op(f, weight, t, bias, r, metric)), (0, 0, 0)

    def run(features, weight, target, bias, residual, metric):
        # The selection has no derivative: its inputs are detached (no autograd node, no tangent). Eagerly,
        # outside any transform, the op layer is skipped (see runs_plain).
        index, distances, out = call(op, impl, *_detached(features, weight, target, bias, residual), metric)
        return chosen_candidate(features, weight, bias, residual, index, out), index, distances

    return run


def gather_op(backend: str, compute, chosen_candidate):
    """ddn_gather's run function for ``backend`` through the custom op over compute(features, weight,
    index, bias, residual) -> the chosen candidate."""
    op = torch.library.custom_op(f"fastcomp::ddn_gather_{backend}", compute, mutates_args=(), schema=_GATHER_SCHEMA)

    @op.register_fake
    def _(features, weight, index, bias, residual):
        B, _, H, W = features.shape
        return features.new_empty(B, weight.shape[1], H, W)

    def run(features, weight, index, bias, residual):
        return chosen_candidate(features, weight, bias, residual, index,
                                call(op, compute, *_detached(features, weight, index, bias, residual)))

    return run


def gather_by_chosen_candidate(chosen_candidate):
    """ddn_gather's run function where the chosen candidate's own forward is the gather kernel."""
    def run(features, weight, index, bias, residual):
        return chosen_candidate(features, weight, bias, residual, index)

    return run


class _Handed:
    """A tensor passed to an autograd.Function's forward as a non-tensor argument, so that the forward may
    return it without a copy (only where no transform or trace sees the call: runs_untransformed)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _fold_chosen(info, in_dims, features, weight, index, bias, residual, d_out=None, per_instance_weight=False):
    """vmap: the n vmapped instances become n * B samples. The weight (and bias) are shared unless vmapped,
    or unless per_instance_weight (the backward's d weight is per instance): then they are stacked into
    n * K candidates and each instance's samples index their own K."""
    n = info.batch_size
    f_d, w_d, i_d, b_d, r_d, *g_d = in_dims
    K = weight.shape[0] if w_d is None else weight.shape[1 if w_d == 0 else 0]
    features, index, residual, d_out = fold_batch(info, (f_d, i_d, r_d, *(g_d or [None])),
                                                  (features, index, residual, d_out), (True,) * 4)
    if per_instance_weight or w_d is not None or b_d is not None:
        weight, bias = fold_batch(info, (w_d, b_d), (weight, bias), (True, True))
        index = index + (torch.arange(n, device=index.device) * K).repeat_interleave(index.shape[0] // n)
    return features, weight, index, bias, residual, d_out


def make_chosen_candidate(kernels: str, forward, backward, label: str):
    """chosen_candidate(features, weight, bias, residual, index, out=None) over the kernels
    forward(features, weight, index, bias, residual) -> [B, Cout, H, W] and backward(d_out, features,
    weight, index, has_bias) -> (d features, d weight, d bias or None), run as custom ops
    fastcomp::ddn_chosen_{forward,backward}_<kernels> with fake implementations and vmap rules, under one
    autograd.Function (eager, torch.func and torch.compile alike; see fastcomp/ops/_library.py). ``label``
    names the backends using it in the error of a second derivative."""
    def forward_impl(features, weight, index, bias, residual):
        return forward(features, weight, index, bias, residual).contiguous()

    def backward_impl(d_out, features, weight, index, has_bias):
        d_features, d_weight, d_bias = backward(d_out, features, weight, index, has_bias)
        if d_bias is None:  # an op's outputs cannot be None
            d_bias = weight.new_zeros(weight.shape[0], 0)
        return d_features.contiguous(), d_weight.contiguous(), d_bias.contiguous()

    forward_op = torch.library.custom_op(f"fastcomp::ddn_chosen_forward_{kernels}", forward_impl, mutates_args=(),
                                         schema=_CHOSEN_FORWARD_SCHEMA)
    backward_op = torch.library.custom_op(f"fastcomp::ddn_chosen_backward_{kernels}", backward_impl,
                                          mutates_args=(), schema=_CHOSEN_BACKWARD_SCHEMA)

    @forward_op.register_fake
    def _(features, weight, index, bias, residual):
        B, _, H, W = features.shape
        return features.new_empty(B, weight.shape[1], H, W)

    @backward_op.register_fake
    def _(d_out, features, weight, index, has_bias):
        K, Cout, _ = weight.shape
        return torch.empty_like(features, memory_format=torch.contiguous_format), torch.empty_like(weight), \
            weight.new_empty(K, Cout if has_bias else 0)

    @forward_op.register_vmap
    def _(info, in_dims, features, weight, index, bias, residual):
        features, weight, index, bias, residual, _ = _fold_chosen(info, in_dims, features, weight, index, bias,
                                                                  residual)
        return unfold_batch(forward_op(features, weight, index, bias, residual), info.batch_size), 0

    @backward_op.register_vmap
    def _(info, in_dims, d_out, features, weight, index, has_bias):
        n = info.batch_size
        g_d, f_d, w_d, i_d, _ = in_dims
        features, weight, index, _, _, d_out = _fold_chosen(info, (f_d, w_d, i_d, None, None, g_d), features,
                                                            weight, index, None, None, d_out, per_instance_weight=True)
        d_features, d_weight, d_bias = backward_op(d_out, features, weight, index, has_bias)
        return (unfold_batch(d_features, n), d_weight.view(n, -1, *d_weight.shape[1:]),
                d_bias.view(n, -1, d_bias.shape[1])), (0, 0, 0)

    gradient = once_differentiable(backward_op, f"{SELECT}/{GATHER}", label)  # a second derivative raises

    class ChosenCandidate(torch.autograd.Function):
        """The chosen candidate, differentiable in features, weight, bias and residual (index saved).

        forward: the candidate given by `out` (already computed by a backend's selection kernel) or computed
        by the forward op. `out` comes as an input that is copied (a Function that hands back an input returns
        a view of it, which may not be modified in place), or, in plain eager calls, wrapped in a
        :class:`_Handed` that autograd does not see as an input, and returned as it is. backward: the backward
        op (weight's gradient has non-zero rows only for chosen k). jvp: the candidate is bilinear in
        (features, weight) and affine in bias, residual, so its tangent is the chosen candidate of the
        tangents: W_idx df + dW_idx f + db_idx + dr.
        """

        generate_vmap_rule = True

        @staticmethod
        def forward(features, weight, bias, residual, index, out):
            if isinstance(out, _Handed):
                return out.tensor
            if out is not None:
                return out.clone()
            return forward_op(features, weight, index, bias, residual)

        @staticmethod
        def setup_context(ctx, inputs, output):
            features, weight, bias, residual, index, _ = inputs
            ctx.save_for_backward(features, weight, index)
            ctx.save_for_forward(features, weight, index)
            ctx.has_bias, ctx.has_residual = bias is not None, residual is not None

        @staticmethod
        def backward(ctx, d_out):
            features, weight, index = ctx.saved_tensors
            # a plain backward (no create_graph, no transform) runs the kernel itself; else the op, under
            # the Function that refuses a second derivative
            d_features, d_weight, d_bias = call(gradient.apply, backward_impl, d_out, features, weight, index,
                                                ctx.has_bias)
            return (d_features, d_weight, d_bias if ctx.has_bias else None, d_out if ctx.has_residual else None,
                    None, None)

        @staticmethod
        def jvp(ctx, d_features, d_weight, d_bias, d_residual, _d_index, _d_out):
            features, weight, index = ctx.saved_tensors
            tangent = None

            def add(t):
                nonlocal tangent
                tangent = t if tangent is None else tangent + t

            if d_features is not None:
                add(forward_op(d_features, weight, index, None, None))
            if d_weight is not None:
                add(forward_op(features, d_weight, index, None, None))
            if d_bias is not None:
                add(d_bias.index_select(0, index)[:, :, None, None].expand(-1, -1, *features.shape[2:]).contiguous())
            if d_residual is not None:
                add(d_residual)
            return tangent

    ChosenCandidate.__name__ = ChosenCandidate.__qualname__ = f"ChosenCandidate_{kernels}"
    compile_opaque(ChosenCandidate)  # Dynamo cannot trace its jvp (see fastcomp/ops/_library.py)

    def chosen_candidate(features, weight, bias, residual, index, out=None):
        """The chosen candidate with its autograd; ``out`` (already computed, e.g. by a kernel) skips the forward."""
        if runs_untransformed(features, weight, bias, residual):
            if not records_grad(features, weight, bias, residual):  # inference: no graph, no copy of out
                return out if out is not None else forward_impl(features, weight, index, bias, residual)
            if out is not None and plain_tensor(out):
                out = _Handed(out)  # eager training: the Function's output is out itself, not a copy
        return ChosenCandidate.apply(features, weight, bias, residual, index, out)

    return chosen_candidate
