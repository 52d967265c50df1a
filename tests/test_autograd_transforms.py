"""The fused ops under every autograd transform, against the float64 reference.

Local conditional attention (cpu, and triton under TRITON_INTERPRET=1) and the DDN ops: forward-mode AD
(torch.func.jvp and torch.autograd.forward_ad; the C++ and Triton jvp kernels), vmap (one kernel call for
all vmapped instances: the rules fold the vmapped dim into the batch), batched backward
(is_grads_batched), torch.func.grad / jacrev / jacfwd, and the clear refusal of a second derivative.
Then the probe that needs all of it: conditioner_locality on fastcomp's local ConditionalDenoiser runs
batched on the fused kernels with no warning.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import fastcomp
from fastcomp import backends as _b
from fastcomp.probe._engine import math_attention
from fastcomp.reference import local_conditional_attention_reference
from fastcomp.reference import ddn_gather_reference
from helpers import assert_close, count_cpu_extension_calls

OP = "local_conditional_attention"
KERNEL = (3, 5)


def _backend_or_skip(name: str) -> None:
    reason = _b.get(OP, name).machine_reason
    if reason is not None:
        pytest.skip(f"backend {name!r} cannot run here: {reason}")


@pytest.fixture
def cpu_calls(monkeypatch):
    """Counts of the C++ attention kernels' calls: forward, backward, jvp."""
    _backend_or_skip("cpu")
    return _KernelCounts(count_cpu_extension_calls(monkeypatch))


class _KernelCounts:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, kind):
        return self.calls.get(f"local_attention_{kind}_cpu", 0)

    def __repr__(self):
        return repr(self.calls)


def _problem(B=2, H=7, W=9, heads=2, D=5, M=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64) for _ in range(3))
    ck, cv = (torch.randn(B, M, heads, D, generator=g, dtype=torch.float64) for _ in range(2))
    cm = torch.rand(B, M, H, W, generator=g) < 0.5
    return (q, k, v, ck, cv), cm


def _attention(backend, cm, dtype=None):
    def fn(q, k, v, ck, cv):
        if dtype is not None:
            q, k, v, ck, cv = (t.to(dtype) for t in (q, k, v, ck, cv))
        return fastcomp.local_conditional_attention(q, k, v, KERNEL, cond_k=ck, cond_v=cv, cond_mask=cm,
                                                    backend=backend)
    return fn


def _reference(cm):
    def fn(q, k, v, ck, cv):
        return local_conditional_attention_reference(q, k, v, KERNEL, ck, cv, cm)
    return fn


def _reference_jvp(cm, primals, tangents):
    with math_attention():  # the fused SDPA kernels have no forward derivative
        return torch.func.jvp(_reference(cm), primals, tangents)[1]


# --- forward mode ------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["all", "q", "k,v", "cond_k", "cond_v"])
def test_cpu_jvp_kernel_matches_reference_jvp_float64(which, cpu_calls):
    primals, cm = _problem()
    names = ("q", "k", "v", "cond_k", "cond_v")
    g = torch.Generator().manual_seed(1)
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=torch.float64) if which == "all" or n in which.split(",")
                     else torch.zeros_like(p) for n, p in zip(names, primals))
    want = _reference_jvp(cm, primals, tangents)
    out, got = torch.func.jvp(_attention("cpu", cm), primals, tangents)
    assert_close(got, want, name=f"cpu jvp ({which})")
    assert_close(out, _reference(cm)(*primals), name="cpu jvp primal")
    assert cpu_calls["jvp"] == 1 and cpu_calls["forward"] == 1, cpu_calls


def test_forward_ad_api_and_mask_none_and_no_conditioners(cpu_calls):
    import torch.autograd.forward_ad as fwAD

    (q, k, v, ck, cv), cm = _problem(M=2)
    dq, dck = torch.randn_like(q), torch.randn_like(ck)
    for mask, conds in ((None, (ck, cv)), (cm, (ck, cv)), (None, (None, None))):
        fused = _attention("cpu", mask)
        want = _reference_jvp(mask, (q, k, v, *conds), (dq, torch.zeros_like(k), torch.zeros_like(v),
                                                        *(None if c is None else (dck if c is ck else torch.zeros_like(c))
                                                          for c in conds))) if conds[0] is not None else None
        if conds[0] is None:
            with math_attention():
                want = torch.func.jvp(lambda a: local_conditional_attention_reference(a, k, v, KERNEL), (q,), (dq,))[1]
        with fwAD.dual_level():
            dual_q = fwAD.make_dual(q, dq)
            dual_ck = None if conds[0] is None else fwAD.make_dual(ck, dck)
            out = fused(dual_q, k, v, dual_ck, conds[1])
            got = fwAD.unpack_dual(out).tangent
        assert_close(got, want, name=f"forward_ad tangent (mask {mask is not None}, cond {conds[0] is not None})")
    assert cpu_calls["jvp"] == 3


@pytest.mark.triton
def test_triton_jvp_kernel_matches_reference_jvp():
    """The Triton jvp kernel (interpreted on CPU): float32 within float32 rounding, bfloat16 within the 2x
    rule of plain PyTorch's bfloat16 jvp; every tangent subset drops its dots."""
    _backend_or_skip("triton")
    from helpers import assert_low_precision_close

    primals, cm = _problem(B=1, H=5, W=6, D=16, M=3)
    g = torch.Generator().manual_seed(2)
    full = tuple(torch.randn(p.shape, generator=g, dtype=torch.float64) for p in primals)
    # The triton 3.9 interpreter truncates float32 -> bfloat16 (compiled kernels round): 3x there, as in
    # tests/test_attention_triton.py; float16 rounds correctly and gets the usual 2x.
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    factor = {torch.float16: 2.0, torch.bfloat16: 3.0 if interpreted else 2.0}
    cases = (((0, 1, 2, 3, 4), (torch.float32, torch.float16, torch.bfloat16)), ((3,), (torch.float32,)),
             ((1, 2), (torch.float16,)))
    for keep, dtypes in cases:
        tangents = tuple(t if i in keep else torch.zeros_like(t) for i, t in enumerate(full))
        want = _reference_jvp(cm, primals, tangents)
        kept = [i for i in range(5) if i in keep]  # only these inputs get tangents (the others: None)

        for dtype in dtypes:
            def fn(*args, dtype=dtype):
                full_args = [p.to(dtype) for p in primals]
                for i, t in zip(kept, args):
                    full_args[i] = t
                return _attention("triton", cm)(*full_args)

            got = torch.func.jvp(fn, tuple(primals[i].to(dtype) for i in kept),
                                 tuple(tangents[i].to(dtype) for i in kept))[1]
            assert got.dtype == dtype
            if dtype == torch.float32:
                assert_close(got, want, ratio=1e-5, name=f"triton jvp {keep}")
            else:
                plain = _reference_jvp(cm, tuple(p.to(dtype) for p in primals), tuple(t.to(dtype) for t in tangents))
                assert_low_precision_close(got, want, plain, name=f"triton {dtype} jvp {keep}", factor=factor[dtype])


# --- vmap and batched backward ---------------------------------------------------------------------

def test_vmap_folds_into_one_kernel_call(cpu_calls):
    """vmap over q (forward), over conditioner tangents (vmap of jvp: the probes' pattern) and over
    cotangents (vmap of vjp): each is one kernel call for all instances, equal to a loop; and the batched
    backward of autograd.grad(is_grads_batched=True)."""
    (q, k, v, ck, cv), cm = _problem()
    fused = _attention("cpu", cm)
    Q = torch.randn(4, *q.shape, dtype=torch.float64)
    got = torch.vmap(lambda a: fused(a, k, v, ck, cv))(Q)
    assert cpu_calls["forward"] == 1
    assert_close(got, torch.stack([_reference(cm)(a, k, v, ck, cv) for a in Q]), name="vmap over q")

    T = torch.randn(5, *ck.shape, dtype=torch.float64)
    got = torch.vmap(lambda t: torch.func.jvp(lambda c: fused(q, k, v, c, cv), (ck,), (t,))[1])(T)
    want = torch.stack([_reference_jvp(cm, (q, k, v, ck, cv), (torch.zeros_like(q), torch.zeros_like(k),
                                                                torch.zeros_like(v), t, torch.zeros_like(cv)))
                        for t in T])
    assert_close(got, want, name="vmap of jvp over cond_k tangents")
    assert cpu_calls["jvp"] == 1, cpu_calls

    leaves = [t.clone().requires_grad_() for t in (q, k, v, ck, cv)]
    out = fused(*leaves)
    G = torch.randn(3, *out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, G, is_grads_batched=True)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, ck, cv)]
    ref_grads = torch.autograd.grad(_reference(cm)(*ref_leaves), ref_leaves, G, is_grads_batched=True)
    for n, a, b in zip(("q", "k", "v", "cond_k", "cond_v"), grads, ref_grads):
        assert_close(a, b, name=f"batched backward d{n}")
    # (autograd.grad's is_grads_batched runs torch's legacy vmap, which knows no custom-op rules: one
    # backward kernel call per cotangent; torch.func.vmap over torch.func.vjp folds them into one.)
    _, vjp_fn = torch.func.vjp(fused, q, k, v, ck, cv)
    calls_before = cpu_calls["backward"]
    for n, a, b in zip(("q", "k", "v", "cond_k", "cond_v"), torch.vmap(vjp_fn)(G), ref_grads):
        assert_close(a, b, name=f"vmap of vjp d{n}")
    assert cpu_calls["backward"] == calls_before + 1, cpu_calls


def test_func_grad_jacrev_jacfwd():
    _backend_or_skip("cpu")
    (q, k, v, ck, cv), cm = _problem(B=1, H=5, W=6, M=2, D=3)
    fused, ref = _attention("cpu", cm), _reference(cm)
    assert_close(torch.func.grad(lambda a: fused(a, k, v, ck, cv).square().sum())(q),
                 torch.func.grad(lambda a: ref(a, k, v, ck, cv).square().sum())(q), name="func.grad")
    with math_attention():
        for jac in (torch.func.jacrev, torch.func.jacfwd):
            assert_close(jac(lambda c: fused(q, k, v, c, cv))(ck), jac(lambda c: ref(q, k, v, c, cv))(ck),
                         name=jac.__name__)


def test_second_derivatives_are_refused_with_a_clear_error():
    """Today's once_differentiable returned gradients without a graph (d/dk, d/dv None); now a second
    derivative through a fused gradient raises, naming the op and the way out."""
    _backend_or_skip("cpu")
    (q, k, v, ck, cv), cm = _problem(B=1, H=5, W=6, M=2, D=3)
    kk = k.clone().requires_grad_()
    (g,) = torch.autograd.grad(_attention("cpu", cm)(q, kk, v, ck, cv).square().sum(), kk, create_graph=True)
    with pytest.raises(RuntimeError, match=r"local_conditional_attention: the 'cpu' backend's gradient is not "
                                           r"differentiable.*backend='reference'"):
        torch.autograd.grad(g.sum(), kk)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.func.hessian(lambda c: _attention("cpu", cm)(q, k, v, c, cv).sum())(ck)
    f = torch.randn(2, 4, 3, 3, requires_grad=True)
    w = torch.randn(5, 3, 4, requires_grad=True)
    (gw,) = torch.autograd.grad(fastcomp.ddn_select(f, w, torch.randn(2, 3, 3, 3)).output.square().sum(), w,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="ddn_select/ddn_gather: .*not differentiable"):
        torch.autograd.grad(gw.sum(), f)


def _count_applies(monkeypatch):
    """The class names of every autograd.Function applied (the op layers' Functions among them)."""
    calls = []
    original = torch.autograd.Function.__dict__["apply"].__func__

    def apply(cls, *args, **kwargs):
        calls.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(torch.autograd.Function, "apply", classmethod(apply))
    return calls


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops that reach the dispatcher, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_plain_eager_calls_skip_the_op_layers_and_nothing_else_does(monkeypatch, cpu_calls):
    """An eager call with no graph to record (no_grad) runs the C++ launcher without the autograd.Function
    and custom op around it, and a plain backward runs its kernel without the op (_library.runs_plain:
    ~100-200 us less per call); the results are the reference's. Where something could observe the layers,
    they run: autograd needed, a dispatch mode, vmap, a forward-AD level."""
    (q, k, v, ck, cv), cm = _problem()
    fused, ref = _attention("cpu", cm), _reference(cm)
    applies = _count_applies(monkeypatch)
    with torch.no_grad():
        out = fused(q, k, v, ck, cv)
    assert (len(applies), cpu_calls["forward"]) == (0, 1)
    assert_close(out, ref(q, k, v, ck, cv), name="no_grad forward")

    leaves = [t.clone().requires_grad_() for t in (q, k, v, ck, cv)]
    grads = torch.autograd.grad(fused(*leaves).square().sum(), leaves)
    assert (applies, cpu_calls["forward"], cpu_calls["backward"]) == (["LocalConditionalAttention_cpu"], 2, 1)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, ck, cv)]
    for n, a, b in zip("q k v cond_k cond_v".split(), grads,
                       torch.autograd.grad(ref(*ref_leaves).square().sum(), ref_leaves)):
        assert_close(a, b, name=f"plain backward d{n}")

    with torch.no_grad(), _RecordOps() as mode:  # a dispatch mode sees the custom op
        fused(q, k, v, ck, cv)
    assert "fastcomp.lca_forward_cpu.default" in mode.names, mode.names
    with torch.no_grad():
        torch.vmap(lambda a: fused(a, k, v, ck, cv))(q[None].expand(2, *q.shape))
    with torch.autograd.forward_ad.dual_level():
        torch.autograd.forward_ad.unpack_dual(fused(torch.autograd.forward_ad.make_dual(q, torch.ones_like(q)),
                                                    k, v, ck, cv))
    assert applies.count("LocalConditionalAttention_cpu") == 4, applies  # the mode's, vmap's, forward AD's

    # DDN: inference takes the selection kernel's candidate as it is (no Function, no op, no copy); a
    # dispatch mode sees the op; training goes through the chosen candidate's Function
    f, w, t = torch.randn(2, 4, 3, 3), torch.randn(5, 3, 4), torch.randn(2, 3, 3, 3)
    applies.clear()
    with torch.no_grad():
        got = fastcomp.ddn_select(f, w, t, backend="cpu")
    assert applies == []
    with torch.no_grad(), _RecordOps() as mode:
        want = fastcomp.ddn_select(f, w, t, backend="cpu")
    assert "fastcomp.ddn_select_cpu.default" in mode.names, mode.names
    assert torch.equal(got.index, want.index) and torch.equal(got.output, want.output)
    applies.clear()
    ww = w.clone().requires_grad_()
    (gw,) = torch.autograd.grad(fastcomp.ddn_select(f, ww, t, backend="cpu").output.square().sum(), ww)
    assert applies == ["ChosenCandidate_cpu"], applies
    wr = w.clone().requires_grad_()
    (gr,) = torch.autograd.grad(fastcomp.ddn_select(f, wr, t, backend="reference").output.square().sum(), wr)
    assert_close(gw, gr, name="ddn_select plain backward dweight")

    # training hands back the selection kernel's candidate itself (no copy: the Function gets it as a
    # non-tensor argument); it is not a view, so it may be modified in place like any op's output
    wi = w.clone().requires_grad_()
    clones, real_clone = [], torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda self, *a, **kw: clones.append(1) or real_clone(self, *a, **kw))
    out = fastcomp.ddn_select(f, wi, t, backend="cpu").output
    assert clones == [] and out._base is None and type(out.grad_fn).__name__ == "ChosenCandidateBackward"
    monkeypatch.undo()
    out.mul_(2)
    (gi,) = torch.autograd.grad(out.square().sum(), wi)
    assert_close(gi, 4 * gr, name="ddn_select backward after an in-place change")


# --- DDN ------------------------------------------------------------------------------------------------

def test_ddn_gather_and_select_under_transforms():
    """The chosen candidate's jvp (bilinear in features and weight), vmap over features and over weight
    tangents, and batched backward, against the reference on the cpu backend (C++ for float64)."""
    g = torch.Generator().manual_seed(0)
    B, Cin, Cout, K, H, W = 3, 5, 2, 4, 5, 7
    f, r = torch.randn(B, Cin, H, W, generator=g, dtype=torch.float64), torch.randn(B, Cout, H, W, generator=g,
                                                                                    dtype=torch.float64)
    w, b = torch.randn(K, Cout, Cin, generator=g, dtype=torch.float64), torch.randn(K, Cout, generator=g,
                                                                                    dtype=torch.float64)
    index = torch.tensor([2, 0, 2])
    primals = (f, w, b, r)
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=torch.float64) for p in primals)

    def fused(f, w, b, r):
        return fastcomp.ddn_gather(f, w, index, bias=b, residual=r, backend="cpu")

    def ref(f, w, b, r):
        return ddn_gather_reference(f, w, index, b, r)

    assert_close(torch.func.jvp(fused, primals, tangents)[1], torch.func.jvp(ref, primals, tangents)[1],
                 name="ddn_gather jvp")
    F = torch.randn(4, *f.shape, dtype=torch.float64)
    assert_close(torch.vmap(lambda a: fused(a, w, b, r))(F), torch.stack([ref(a, w, b, r) for a in F]),
                 name="vmap over features")
    TW = torch.randn(3, *w.shape, dtype=torch.float64)
    got = torch.vmap(lambda t: torch.func.jvp(lambda ww: fused(f, ww, b, r), (w,), (t,))[1])(TW)
    want = torch.stack([torch.func.jvp(lambda ww: ref(f, ww, b, r), (w,), (t,))[1] for t in TW])
    assert_close(got, want, name="vmap of jvp over weight tangents")
    leaves = [p.clone().requires_grad_() for p in primals]
    out = fused(*leaves)
    G = torch.randn(2, *out.shape, dtype=torch.float64)
    ref_leaves = [p.clone().requires_grad_() for p in primals]
    for n, a, c in zip(("features", "weight", "bias", "residual"),
                       torch.autograd.grad(out, leaves, G, is_grads_batched=True),
                       torch.autograd.grad(ref(*ref_leaves), ref_leaves, G, is_grads_batched=True)):
        assert_close(a, c, name=f"batched backward d{n}")
    t = torch.randn(B, Cout, H, W, generator=g, dtype=torch.float64)
    sel, tangent = torch.func.jvp(lambda f: fastcomp.ddn_select(f, w, t, bias=b, residual=r).output, (f,),
                                  (tangents[0],))
    chosen = fastcomp.ddn_select(f, w, t, bias=b, residual=r, backend="reference").index
    assert_close(tangent, torch.func.jvp(lambda a: ddn_gather_reference(a, w, chosen, b, r), (f,), (tangents[0],))[1],
                 name="ddn_select jvp")


# --- the probe that needs forward mode and vmap --------------------------------------------------------

def test_conditioner_locality_runs_batched_on_the_fused_kernels(cpu_calls):
    """On fastcomp's own local ConditionalDenoiser: forward-mode probes, no warning (today: two, and one
    backward pass per probe), one jvp kernel call per attention layer, and the reference model's answer."""
    from fastcomp.models import ConditionalDenoiser
    from fastcomp.probe import conditioner_locality

    kw = dict(img_channels=1, image_size=10, channels=16, depth=2, kernel_size=3, locality="local", cond_radius=3.0)
    fused = ConditionalDenoiser(**kw).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fused.parameters():  # the output layer starts at zero: every Jacobian would be 0
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    ref = ConditionalDenoiser(**kw, backend="reference").double().eval()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 1, 10, 10, generator=g, dtype=torch.float64)
    points = torch.rand(2, 3, 2, generator=g, dtype=torch.float64) * 10
    mask = fastcomp.disk_mask(points, 3.0, 10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = conditioner_locality(lambda t, c: fused(t, 0.5, c), x, points, mask, progress=False)
    assert cpu_calls["jvp"] == 2, cpu_calls  # depth 2: all M * Dc = 6 tangents in one call per layer
    want = conditioner_locality(lambda t, c: ref(t, 0.5, c), x, points, mask, progress=False)
    assert_close(got.attribution, want.attribution, name="attribution")
