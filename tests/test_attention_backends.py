"""fastcomp.local_conditional_attention's fused backends against the float64 reference: output and all
five gradients (q, k, v, cond_k, cond_v), odd sizes, rectangular kernels, M = 0/1/7, padding
conditioners, per-item conditioner counts, cond_mask=None, non-contiguous inputs, every dtype a backend
supports (float16/bfloat16 on the CPU: float32 inside, the 2x rule); gradcheck of the C++ kernel; the
torch.library kernel ops (opcheck) and the layer under torch.compile(fullgraph=True).

The triton backend runs here under TRITON_INTERPRET=1 (tiny shapes, head dim >= 16) and natively on CUDA.
"""

from __future__ import annotations

import pytest
import torch

import fastcomp
from fastcomp import backends as _b
from fastcomp.reference import local_conditional_attention_reference
from helpers import assert_close, count_cpu_extension_calls

OP = "local_conditional_attention"
DTYPES = {"cpu": (torch.float64, torch.float32),  # float16/bfloat16: test_cpu_backend_runs_half_precision_*
           "triton": (torch.float32, torch.float16, torch.bfloat16)}
# Float32 gradients sum thousands of terms: allow a little more than the forward.
GRAD_RATIO = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _backend_or_skip(name: str) -> None:
    reason = {b.name: b for b in _b.backends(OP)}[name].machine_reason
    if reason is not None:
        pytest.skip(f"backend {name!r} cannot run here: {reason}")


def _head_dim(backend: str, D: int) -> int:
    """The Triton kernels take head dims 16..128 (the op's contract); the C++ kernel any D."""
    return D if backend == "cpu" else min(max(D, 16), 128)


def _problem(B=2, H=13, W=17, heads=2, D=8, M=3, dtype=torch.float64, mask_p=0.4, cond=True, mask=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64) for _ in range(3))
    ck = cv = cm = None
    if cond:
        ck, cv = (torch.randn(B, M, heads, D, generator=g, dtype=torch.float64) for _ in range(2))
        if mask:
            cm = torch.rand(B, M, H, W, generator=g) < mask_p
    return dict(q=q, k=k, v=v, cond_k=ck, cond_v=cv, cond_mask=cm)


def _compare(p, kernel, backend, dtype, scale=None, transform=None):
    """Runs the op on `backend` in `dtype` (inputs optionally transformed, e.g. made non-contiguous) and
    compares the output and every gradient with the float64 reference."""
    names = [n for n in ("q", "k", "v", "cond_k", "cond_v") if p[n] is not None]
    leaves64 = {n: p[n].clone().requires_grad_() for n in names}
    ref = local_conditional_attention_reference(
        leaves64["q"], leaves64["k"], leaves64["v"], kernel if isinstance(kernel, tuple) else (kernel, kernel),
        leaves64.get("cond_k"), leaves64.get("cond_v"), p["cond_mask"], scale)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, [leaves64[n] for n in names], grad_out)

    device = "cpu"
    leaves = {n: p[n].to(device=device, dtype=dtype).requires_grad_() for n in names}
    args = {n: (transform(t) if transform else t) for n, t in leaves.items()}
    cm = None if p["cond_mask"] is None else p["cond_mask"].to(device)
    out = fastcomp.local_conditional_attention(args["q"], args["k"], args["v"], kernel, cond_k=args.get("cond_k"),
                                               cond_v=args.get("cond_v"), cond_mask=cm, scale=scale,
                                               backend=backend)
    assert out.dtype == dtype and out.shape == ref.shape
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out.to(device=device, dtype=dtype))
    assert_close(out, ref, name=f"{backend} {dtype} output")
    for n, g, r in zip(names, grads, ref_grads):
        assert_close(g, r, ratio=GRAD_RATIO[dtype], name=f"{backend} {dtype} d{n}")


CASES = [  # (B, H, W, heads, D, kernel, M)
    (2, 13, 17, 2, 8, (5, 3), 7),
    (2, 13, 17, 2, 8, (5, 3), 0),
    (1, 13, 17, 1, 16, (3, 7), 1),
    (1, 13, 17, 2, 5, (13, 17), 3),  # kernel == image: every pixel sees the whole image
    (2, 7, 20, 1, 4, (1, 1), 2),  # a pixel sees itself and its conditioners
    (1, 9, 40, 3, 33, (7, 19), 4),  # odd D, wide kernel
]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_{}x{}_h{}_d{}_k{}x{}_M{}".format(*c[:5], *c[5], c[6]))
def test_matches_reference_float64_grid(backend, case):
    _backend_or_skip(backend)
    B, H, W, heads, D, kernel, M = case
    dtype = DTYPES[backend][0]
    if backend == "triton" and H * W * B > 300:
        pytest.skip("the Triton interpreter runs tiny shapes only")
    _compare(_problem(B, H, W, heads, _head_dim(backend, D), M), kernel, backend, dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_supported_dtype(backend):
    _backend_or_skip(backend)
    for dtype in DTYPES[backend]:
        if dtype in (torch.float16, torch.bfloat16):
            continue  # low precision is the Triton helper's suite (tests/test_attention_triton.py)
        _compare(_problem(2, 13, 17, 2, 16, 5), (5, 3), backend, dtype)


@pytest.mark.parametrize("kernel", [(5, 3), (7, 3)])
def test_cpu_backward_splits_rows_into_blocks_when_threads_outnumber_b_times_heads(kernel):
    """With more threads than B * heads the C++ backward splits each (b, head) into blocks of >= 2 kh rows
    (here 8 threads, one (b, head), 45 rows: 4 blocks at kh = 5, 3 at kh = 7), and the key rows two blocks
    share are the sum of the blocks' parts. Every gradient against the float64 reference, in float64 and
    float32; the same call twice gives the same bits."""
    _backend_or_skip("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        p = _problem(1, 45, 11, 1, 8, M=3)
        for dtype in DTYPES["cpu"]:
            _compare(p, kernel, "cpu", dtype)
        leaves = [p[n].clone().requires_grad_() for n in ("q", "k", "v", "cond_k", "cond_v")]

        def grads():
            out = fastcomp.local_conditional_attention(*leaves[:3], kernel, cond_k=leaves[3], cond_v=leaves[4],
                                                       cond_mask=p["cond_mask"], backend="cpu")
            return torch.autograd.grad(out, leaves, torch.ones_like(out))

        for a, b in zip(grads(), grads()):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_padding_conditioners_and_ragged_batches(backend):
    """Item 0 has 1 real conditioner, item 1 has 5: the rest are all-false padding and change nothing."""
    _backend_or_skip(backend)
    p = _problem(2, 13, 17, 2, _head_dim(backend, 8), M=7)
    p["cond_mask"][0, 1:] = False
    p["cond_mask"][1, 5:] = False
    _compare(p, (5, 3), backend, DTYPES[backend][0])
    # Same result as dropping the padding entirely (item 0 alone, with its single conditioner).
    dtype = DTYPES[backend][0]
    p = {n: (t if t.dtype == torch.bool else t.to(dtype)) for n, t in p.items()}
    one = {n: (t[:1, :1] if n in ("cond_k", "cond_v", "cond_mask") else t[:1]) for n, t in p.items()}
    a = fastcomp.local_conditional_attention(p["q"][:1], p["k"][:1], p["v"][:1], (5, 3), cond_k=p["cond_k"][:1],
                                             cond_v=p["cond_v"][:1], cond_mask=p["cond_mask"][:1], backend=backend)
    b = fastcomp.local_conditional_attention(one["q"], one["k"], one["v"], (5, 3), cond_k=one["cond_k"],
                                             cond_v=one["cond_v"], cond_mask=one["cond_mask"], backend=backend)
    assert_close(a, b, name="padding vs no padding")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_masked_key_scoring_far_above_the_allowed_ones_changes_nothing(backend):
    """A conditioner allowed on some pixels of a row and masked on others: where masked, its score may
    exceed the max over the allowed keys by more than exp can represent (float32: > 88); it must still
    contribute exactly nothing (no inf * 0 = NaN)."""
    _backend_or_skip(backend)
    p = _problem(1, 6, 9, 1, _head_dim(backend, 8), M=2, mask_p=0.5, seed=3)
    p["q"][..., 0] = 10.0
    p["cond_k"][:, 0, :, 0] = 1000.0  # scores ~ 10 * 1000 / sqrt(8) ~ 3500: beyond float64 exp too
    p["cond_mask"][0, 0] = torch.rand(6, 9, generator=torch.Generator().manual_seed(4)) < 0.5
    ref = local_conditional_attention_reference(p["q"], p["k"], p["v"], (3, 3), p["cond_k"], p["cond_v"],
                                                p["cond_mask"])
    for dtype in (d for d in DTYPES[backend] if d in (torch.float32, torch.float64)):
        args = {n: p[n].to(dtype).requires_grad_() for n in ("q", "k", "v", "cond_k", "cond_v")}
        out = fastcomp.local_conditional_attention(args["q"], args["k"], args["v"], 3, cond_k=args["cond_k"],
                                                   cond_v=args["cond_v"], cond_mask=p["cond_mask"], backend=backend)
        assert_close(out, ref, ratio=1e-4 if dtype == torch.float32 else None, name=f"{dtype} output")
        grads = torch.autograd.grad(out.sum(), list(args.values()))
        assert all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_mask_none_no_cond_and_custom_scale(backend):
    _backend_or_skip(backend)
    dtype = DTYPES[backend][0]
    _compare(_problem(2, 13, 17, 2, _head_dim(backend, 8), M=3, mask=False), (5, 3), backend, dtype)  # every pixel sees all
    _compare(_problem(2, 13, 17, 2, _head_dim(backend, 8), cond=False), (5, 3), backend, dtype, scale=0.3)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_non_contiguous_inputs(backend):
    _backend_or_skip(backend)

    def strided(t):  # same values, every other element of a twice-as-wide buffer, and transposed storage
        wide = torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]
        return wide.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() == 4 else wide

    _compare(_problem(2, 13, 17, 2, _head_dim(backend, 8), M=3), (5, 3), backend, DTYPES[backend][0], transform=strided)


def test_cpu_gradcheck():
    _backend_or_skip("cpu")
    p = _problem(1, 6, 7, 2, 3, M=2, mask_p=0.5)
    names = ("q", "k", "v", "cond_k", "cond_v")
    leaves = tuple(p[n].clone().requires_grad_() for n in names)

    def fn(q, k, v, ck, cv):
        return fastcomp.local_conditional_attention(q, k, v, (3, 5), cond_k=ck, cond_v=cv,
                                                    cond_mask=p["cond_mask"], backend="cpu")

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_backend_runs_half_precision_in_float32_inside(dtype, monkeypatch):
    """bfloat16/float16 CPU tensors (and autocast(cpu, bfloat16)) run the C++ kernels in float32 and return
    the input dtype; the error vs float64 is at most ~2x plain PyTorch's in that dtype (out and grads)."""
    _backend_or_skip("cpu")
    from helpers import assert_low_precision_close

    calls = count_cpu_extension_calls(monkeypatch)
    p = _problem(2, 9, 11, 2, 16, M=3)
    names = ("q", "k", "v", "cond_k", "cond_v")
    grad_out = torch.randn(2, 9, 11, 2, 16, dtype=torch.float64)

    def run(backend, dt):
        leaves = [p[n].to(dt).requires_grad_() for n in names]
        out = fastcomp.local_conditional_attention(*leaves[:3], (5, 3), cond_k=leaves[3], cond_v=leaves[4],
                                                   cond_mask=p["cond_mask"], backend=backend)
        return out, torch.autograd.grad(out, leaves, grad_out.to(dt))

    out, grads = run(None, dtype)  # auto: the cpu backend, not the dense reference
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert calls.get("local_attention_forward_cpu") == 1 and calls.get("local_attention_backward_cpu") == 1, calls
    ref, ref_grads = run("reference", torch.float64)
    plain, plain_grads = run("reference", dtype)
    assert_low_precision_close(out, ref, plain, name=f"{dtype} output")
    for n, g, r, t in zip(names, grads, ref_grads, plain_grads):
        assert_low_precision_close(g, r, t, name=f"{dtype} d{n}")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer = fastcomp.nn.LocalConditionalAttention(16, 2, 3)
        y = layer(torch.randn(1, 7, 8, 16))
    assert y.dtype == torch.bfloat16 and calls.get("local_attention_forward_cpu") == 2, calls


def test_triton_backend_reason_when_unavailable():
    reason = {b.name: b for b in _b.backends(OP)}["triton"].machine_reason
    if reason is None:
        pytest.skip("the triton backend can run here")
    assert "triton" in reason.lower()


def test_auto_selection_picks_cpu_for_float32_cpu_tensors():
    _backend_or_skip("cpu")
    p = _problem(1, 5, 5, 1, 4, cond=False)
    q = p["q"].float()
    assert _b.select(OP, None, q, q, q, None, None, None).name == "cpu"


def test_library_ops_pass_opcheck():
    """Schema, fake (meta) implementation and vmap rule of the cpu backend's kernel ops
    fastcomp::lca_{forward,backward,jvp}_cpu agree with the real kernels (torch.library.opcheck)."""
    _backend_or_skip("cpu")
    p = _problem(1, 6, 7, 2, 4, M=2)
    q, k, v, ck, cv, cm = (p[n] for n in ("q", "k", "v", "cond_k", "cond_v", "cond_mask"))
    ops = torch.ops.fastcomp
    for cond in ((ck, cv, cm), (None, None, None)):
        torch.library.opcheck(ops.lca_forward_cpu.default, (q, k, v, *cond, 3, 5, 0.5))
        out, lse = ops.lca_forward_cpu(q, k, v, *cond, 3, 5, 0.5)
        torch.library.opcheck(ops.lca_backward_cpu.default, (torch.randn_like(q), q, k, v, *cond, out, lse, 3, 5, 0.5))
        tangents = (torch.randn_like(q), None, torch.randn_like(v), *((torch.randn_like(ck), None) if cond[0] is not None
                                                                      else (None, None)))
        torch.library.opcheck(ops.lca_jvp_cpu.default, (q, k, v, *cond, out, lse, *tangents, 3, 5, 0.5))


def test_torch_compile_fullgraph_matches_eager():
    _backend_or_skip("cpu")
    torch._dynamo.reset()
    layer = fastcomp.nn.LocalConditionalAttention(16, 2, (5, 3), cond_dim=8).double()
    x = torch.randn(2, 9, 11, 16, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, 3, 8, dtype=torch.float64)
    cm = torch.rand(2, 3, 9, 11) < 0.5

    def model(x, cond, cm):
        return layer(torch.nn.functional.gelu(x), cond, cm).square()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager = model(x, cond, cm)
    out = compiled(x, cond, cm)
    assert_close(out, eager, name="compiled output")
    g_eager = torch.autograd.grad(eager.sum(), [x, layer.qkv.weight])
    g_comp = torch.autograd.grad(out.sum(), [x, layer.qkv.weight])
    for a, b, n in zip(g_comp, g_eager, ("dx", "dqkv.weight")):
        assert_close(a, b, name=f"compiled {n}")
