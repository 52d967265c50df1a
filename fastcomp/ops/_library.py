"""What the ops share to run their kernels as torch.library custom ops under every transform.

Pattern (one per fused backend of an op; see ops/attention/library.py and ops/ddn/library.py):

- each kernel (forward, backward, jvp) is a ``torch.library.custom_op`` with a fake implementation, so
  torch.compile sees one opaque node with the right output metadata and never traces the launcher (its
  extension loads, host-side checks and allocations stay out of the graph), and a vmap rule that folds the
  vmapped dimension into the batch dimension (one kernel call for all probes, not one per probe);
- one ``torch.autograd.Function`` ties them together (forward / setup_context / backward / jvp, with
  ``generate_vmap_rule``): the single autograd path for eager calls, ``torch.func`` transforms
  (grad, jvp, vmap, jacrev, jacfwd), ``torch.autograd.forward_ad`` and batched backward alike;
- under torch.compile the same Function is used: :func:`compile_opaque` marks it with
  ``torch.compiler.allow_in_graph``, because Dynamo refuses to trace an autograd.Function that defines
  ``jvp`` (torch 2.11 and 2.13: "Unsupported custom jvp", a graph break); allowed in the graph, Dynamo
  records the call and AOTAutograd traces the Function's forward and backward, which only call the
  custom ops above. No second autograd path exists for compiled code.

torch.library custom ops have no forward-AD registration (register_autograd covers the backward only),
and their autograd.Function-based backward cannot run under torch.func transforms; this is why the
Function sits above the ops rather than inside them.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch


def fold_batch(info, in_dims: Sequence[Optional[int]], args: Sequence, batched: Sequence[bool]) -> list:
    """vmap rule helper: the vmapped dim of every tensor argument marked ``batched`` is moved to the front
    and merged with its leading batch dim, [n, B, ...] -> [n * B, ...]; a tensor that is not vmapped is
    expanded to n copies first (the kernels copy it once), so the kernel sees one batch of n * B items.
    Arguments not marked (ints, floats, shared tensors) pass unchanged (they must not be vmapped)."""
    n = info.batch_size
    out = []
    for a, d, fold in zip(args, in_dims, batched):
        if fold and isinstance(a, torch.Tensor):
            a = a.movedim(d, 0) if d is not None else a.expand(n, *a.shape)
            a = a.reshape(n * a.shape[1], *a.shape[2:])
        elif d is not None:
            raise NotImplementedError(f"vmap over argument {len(out)} of this fastcomp kernel is not supported")
        out.append(a)
    return out


def unfold_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`fold_batch` for an output: [n * B, ...] -> [n, B, ...]."""
    return t.view(n, t.shape[0] // n if n else 0, *t.shape[1:])


def runs_untransformed(*args) -> bool:
    """Whether a call on these arguments is plain eager PyTorch that only the ordinary (backward-mode)
    autograd may record: not traced by torch.compile or torch.jit.trace, no forward-AD level, no dispatch
    or torch-function mode (FakeTensorMode, FlopCounterMode, ...), no torch.func transform, and plain
    tensors (arguments that are not tensors, and None, do not matter)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch._C._get_tracing_state() is not None):
        return False
    if getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0:  # a dual level is open (or unknown)
        return False
    return all(plain_tensor(t) for t in args if isinstance(t, torch.Tensor))


def plain_tensor(t: torch.Tensor) -> bool:
    """A torch.Tensor or Parameter that no torch.func transform or batched autograd.grad wraps."""
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t)
            and not torch._C._functorch.is_legacy_batchedtensor(t))  # autograd.grad(is_grads_batched=True)


def records_grad(*args) -> bool:
    """Whether autograd would record a call on these arguments: grad mode on and some tensor needs a gradient."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)


def runs_plain(*args) -> bool:
    """Whether a kernel call on these arguments may skip its autograd.Function and custom op and run the
    launcher directly: nothing could record or transform it. :func:`runs_untransformed`, and no autograd to
    record (not :func:`records_grad`). The Function and op layers cost ~70-100 us of Python per call (tens
    of percent of a small kernel); the result is the same, as the op's implementation is that launcher."""
    return runs_untransformed(*args) and not records_grad(*args)


def call(op, impl, *args):
    """op(*args), the custom op or autograd.Function; or impl(*args), the launcher it wraps, where
    :func:`runs_plain` says nothing can tell the difference."""
    return impl(*args) if runs_plain(*args) else op(*args)


def signature_once(function_cls: type) -> type:
    """Compute the signature of ``function_cls.forward`` once: Function.apply binds the call's arguments to
    it on every call (to apply defaults when setup_context is defined), and inspect.signature of a plain
    function is rebuilt each time unless ``__signature__`` holds it (~20-40 us per apply, more than a
    small kernel)."""
    function_cls.forward.__signature__ = inspect.signature(function_cls.forward)
    return function_cls


def compile_opaque(function_cls: type) -> type:
    """Let torch.compile record calls of ``function_cls.apply`` as graph nodes (see the module docstring)."""
    return torch.compiler.allow_in_graph(signature_once(function_cls))


def once_differentiable(kernel, op: str, backend: str) -> type:
    """An autograd.Function whose forward is ``kernel`` (a backward kernel's custom op) and which refuses
    to be differentiated: a second backward through a fused gradient (create_graph=True) or a forward-mode
    derivative of it raises this message, instead of returning gradients with no graph. Unlike
    torch.autograd.function.once_differentiable it also runs under torch.func (grad of a loss that
    depends on the output runs the backward with create_graph=True at its level) and vmap."""
    message = (f"{op}: the {backend} backend's gradient is not differentiable (a second derivative, by "
               f"double backward with create_graph=True or forward-over-reverse, is not implemented by its "
               f"kernels); for higher-order derivatives use backend='reference'; forward-mode AD "
               f"(torch.func.jvp) and first derivatives work on every backend")

    class Gradient(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return kernel(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, *grads):
            raise RuntimeError(message)

        @staticmethod
        def jvp(ctx, *tangents):
            raise RuntimeError(message)

    Gradient.__name__ = Gradient.__qualname__ = f"{op}_{backend}_gradient".replace("/", "_")
    return signature_once(Gradient)
