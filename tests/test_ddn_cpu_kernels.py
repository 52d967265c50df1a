"""The C++ kernels behind the DDN "cpu" backend (csrc/ddn/ddn_cpu.cpp) against float64 PyTorch.

Sizes are chosen to hit every tail of the kernels: Cin not a multiple of the 3- or 4-row Gram tiles, pixel
counts (7x9 = 63) not a multiple of a SIMD vector, Cout = 1, 3 and 5 (more rows than one 4-row
candidate block), K = 1, 2, 5. Outputs come from torch.empty (NaN-poisoned by the conftest), so an
unwritten element fails. The end-to-end comparisons with the reference (index, distances, every
gradient, cancellation cases) are in test_ddn_backends.py, which runs through these kernels for float32
and float64.
"""

from __future__ import annotations

import pytest
import torch

import fastcomp
from fastcomp import _build
from fastcomp.ops.ddn import chosen_cpu, cpu, pytorch
from fastcomp.reference import ddn_candidates, ddn_select_reference
from tests.helpers import assert_close, extra_cpu_variants

SIZES = [  # B, Cin, Cout, K, H, W
    (3, 5, 3, 5, 7, 9),
    (2, 7, 1, 2, 7, 9),
    (2, 9, 5, 1, 3, 5),
    (1, 17, 3, 5, 5, 7),
]
IDS = ["B{}Cin{}Cout{}K{}_{}x{}".format(*s) for s in SIZES]


# The suite's own build, then every other CPU target (test_cpu_variants.py): the Gram and candidate tiles
# are sized per instruction set (3x3 on AVX2's 16 registers, 4x4 on AVX-512's 32).
VARIANTS = extra_cpu_variants()


@pytest.fixture(scope="module", params=[None, *VARIANTS], ids=["build", *(v.name for v in VARIANTS)])
def ext(request):
    if request.param is None:
        return _build.load("ddn")
    problem = _build.compiler_problem() or _build.cpu_problem(request.param)
    if problem:
        pytest.skip(f"the {request.param.name} build cannot run here: {problem}")
    return _build.build("ddn", variant=request.param)


def _inputs(B, Cin, Cout, K, H, W, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return (rand(B, Cin, H, W), rand(K, Cout, Cin, scale=Cin ** -0.5), rand(K, Cout, scale=0.3),
            rand(B, Cout, H, W), rand(B, Cout, H, W))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_l2_stats(ext, size, residual, dtype):
    B, Cin, Cout, K, H, W = size
    f, _, _, r, t = _inputs(*size, dtype=dtype)
    r = r if residual else None
    n_tri = Cin * (Cin + 1) // 2
    gram = torch.empty(B, n_tri, dtype=dtype)
    m_fe = torch.empty(B, Cout, Cin, dtype=torch.float64)
    s_f = torch.empty(B, Cin, dtype=torch.float64)
    e_sum = torch.empty(B, Cout, dtype=torch.float64)
    e_sq = torch.empty(B, dtype=torch.float64)
    ext.ddn_l2_stats_cpu(f, r, t, gram, m_fe, s_f, e_sum, e_sq)

    x = f.double().reshape(B, Cin, H * W)
    e = (0 if r is None else r.double()) - t.double()
    e = e.reshape(B, Cout, H * W)
    rows, cols = torch.triu_indices(Cin, Cin)
    full = x @ x.transpose(1, 2)
    assert_close(gram, full[:, rows, cols], name="gram", dtype=dtype)
    assert_close(m_fe, e @ x.transpose(1, 2), name="m_fe", dtype=dtype)
    assert_close(s_f, x.sum(dim=2), name="s_f")
    assert_close(e_sum, e.sum(dim=2), name="e_sum")
    assert_close(e_sq, e.square().sum(dim=(1, 2)), name="e_sq")
    assert torch.equal(cpu._diagonal_positions(Cin), torch.nonzero(rows == cols).squeeze(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_weight_gram(ext, size, dtype):
    _, Cin, Cout, K, _, _ = size
    _, w, _, _, _ = _inputs(*size, dtype=dtype)
    p_tri = torch.empty(K, Cin * (Cin + 1) // 2, dtype=dtype)
    ext.ddn_weight_gram_cpu(w, p_tri)
    rows, cols = torch.triu_indices(Cin, Cin)
    p = w.double().transpose(1, 2) @ w.double()
    want = p[:, rows, cols] * torch.where(rows == cols, 1.0, 2.0).double()
    assert_close(p_tri, want, name="p_tri", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_l2_threshold(ext, size, bias, dtype):
    """ddn_l2_threshold_cpu (est, bound, thresh in one C++ pass) against the PyTorch formulation of
    expanded_l2 and the torch backend's threshold, and est against the float64 reference within the bound."""
    B, Cin, Cout, K, H, W = size
    f, w, b, r, t = _inputs(*size, dtype=dtype)
    b = b if bias else None
    est, bound, thresh = cpu.l2_threshold(ext, f, w, t, b, r)
    cand = ddn_candidates(f.double(), w.double(), None if b is None else b.double(), r.double())  # [B, K, ...]
    exact = (cand - t.double()[:, None]).square().flatten(2).mean(dim=2)  # [B, K] float64
    assert (est - exact).abs().le(bound + 1e-12 * exact.abs()).all()
    want_est, want_bound = pytorch.expanded_l2(f, w, t, b, r)  # the PyTorch formulation
    est_min = want_est.amin(dim=1)
    want_thresh = est_min + 2 * want_bound.amax(dim=1) + pytorch.reference_noise(dtype, est_min, t)
    # float32: the PyTorch formulation's Gram matrices (hence A and tr(G_b)) round differently
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(est, want_est, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(bound, want_bound, rtol=rtol, atol=0)
    torch.testing.assert_close(thresh, want_thresh, rtol=rtol, atol=1e-12)


def test_l2_threshold_nan_row(ext):
    """A NaN in a sample makes its threshold NaN (as amin/amax), so the re-ranking recomputes every k."""
    f, w, b, r, t = _inputs(*SIZES[0])
    f[1, 0, 0, 0] = float("nan")
    est, bound, thresh = cpu.l2_threshold(ext, f, w, t, b, r)
    assert thresh[1].isnan() and not thresh[[0, 2]].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("extras", ["bias_res", "none"])
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_l2_select_fused(size, extras, dtype, monkeypatch):
    """The fused per-sample selection (ddn_l2_select_cpu, small K) and the batched C++ passes (stats, GEMM,
    threshold, re-rank: large K) against the float64 reference: same index, output and distances, and
    the gradients through the fused path."""
    B, Cin, Cout, K, H, W = size
    f, w, b, r, t = _inputs(*size, dtype=dtype)
    if extras == "none":
        b = r = None
    leaves = [x.detach().requires_grad_() for x in (f, w)]
    got = {}
    for fused_elements in (1 << 18, 0):  # fused, then the batched passes
        monkeypatch.setattr(cpu, "_FUSED_ELEMENTS", fused_elements)
        got[fused_elements] = fastcomp.ddn_select(leaves[0], leaves[1], t, bias=b, residual=r, backend="cpu")
    f64 = [x.detach().double().requires_grad_() for x in (f, w)]
    ref_out, ref_index, ref_dist = ddn_select_reference(f64[0], f64[1], t.double(),
                                                        None if b is None else b.double(),
                                                        None if r is None else r.double())
    for sel in got.values():
        assert torch.equal(sel.index, ref_index)
        assert_close(sel.output, ref_out, name="output", dtype=dtype)
        assert_close(sel.distances, ref_dist, name="distances", dtype=dtype)
    d_out = torch.randn(ref_out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(got[1 << 18].output, leaves, d_out.to(dtype))
    want = torch.autograd.grad(ref_out, f64, d_out)
    for name, g, h in zip(("features", "weight"), grads, want):
        assert_close(g, h, name=f"d {name}", dtype=dtype)


@pytest.mark.parametrize("near", ["expansion", "none", "all"])
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_rerank(ext, size, near):
    """Re-ranked ks get the reference's distance, the others keep the estimate; a row where no estimate
    passes (e.g. NaN) re-ranks every k; the index is the argmin over the re-ranked ks."""
    B, Cin, Cout, K, H, W = size
    f, w, b, r, t = _inputs(*size)
    _, ref_index, ref_dist = ddn_select_reference(f, w, t, b, r)
    est, bound = pytorch.expanded_l2(f, w, t, b, r)
    thresh = {"expansion": est.min(dim=1).values + 2 * bound.max(dim=1).values,
              "none": torch.full((B,), float("nan"), dtype=torch.float64),
              "all": torch.full((B,), float("inf"), dtype=torch.float64)}[near]
    distances = torch.empty(B, K, dtype=torch.float32)
    index = torch.empty(B, dtype=torch.int64)
    out = torch.empty(B, Cout, H, W, dtype=torch.float64)
    ext.ddn_rerank_cpu(f, w, b, r, t, est, thresh, distances, index, out)
    assert torch.equal(index, ref_index)
    exact = (est <= thresh[:, None]) if near == "expansion" else torch.ones(B, K, dtype=torch.bool)
    torch.testing.assert_close(distances[exact], ref_dist[exact], rtol=1e-6, atol=0)
    assert torch.equal(distances[~exact], est.float()[~exact])
    cand = ddn_candidates(f, w, b, r)
    assert_close(out, cand[torch.arange(B), index], name="out")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_chosen_candidate_forward_backward(size, dtype):
    """the cpu backend's chosen candidate (C++ forward and backward for float32/float64 CPU tensors) against the reference's
    candidates and autograd, in float64; d weight / d bias rows of unchosen k are exactly zero."""
    B, Cin, Cout, K, H, W = size
    f, w, b, r, _ = (x.requires_grad_() for x in _inputs(*size, dtype=dtype))
    index = torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(1))
    out = chosen_cpu(f, w, b, r, index)
    leaves64 = [x.detach().double().requires_grad_() for x in (f, w, b, r)]
    ref = ddn_candidates(*leaves64)[torch.arange(B), index]
    assert_close(out, ref, name="output", dtype=dtype)
    d_out = torch.randn(B, Cout, H, W, dtype=torch.float64)
    got = torch.autograd.grad(out, (f, w, b, r), d_out.to(dtype))
    want = torch.autograd.grad(ref, leaves64, d_out)
    for name, g, h in zip(("features", "weight", "bias", "residual"), got, want):
        assert_close(g, h, name=f"d {name}", dtype=dtype)
    unchosen = torch.ones(K, dtype=torch.bool)
    unchosen[index] = False
    assert bool((got[1][unchosen] == 0).all()) and bool((got[2][unchosen] == 0).all())


def test_chosen_candidate_partial_grads_and_gradcheck():
    """Only some inputs need gradients (the C++ backward skips the others); float64 gradcheck."""
    f, w, b, r, t = _inputs(2, 5, 3, 5, 3, 5)
    w.requires_grad_()
    index = torch.tensor([4, 1])
    out = chosen_cpu(f, w, b, r, index)
    (d_w,) = torch.autograd.grad(out.sum(), (w,))
    ref = torch.autograd.grad(ddn_candidates(f, w, b, r)[torch.arange(2), index].sum(), (w,))[0]
    assert_close(d_w, ref, name="d weight")
    leaves = [x.detach().requires_grad_() for x in (f, w, b, r)]
    assert torch.autograd.gradcheck(lambda *a: chosen_cpu(*a, index), leaves)


def test_select_float32_mid_size():
    """A size with several Gram tiles and pixel vectors per row: index, output, distances and gradients
    of the float32 fast path against the float64 reference."""
    size = (4, 22, 3, 37, 11, 13)
    f, w, b, r, t = (x.requires_grad_(i < 4) for i, x in enumerate(_inputs(*size, dtype=torch.float32)))
    sel = fastcomp.ddn_select(f, w, t, bias=b, residual=r, backend="cpu")
    leaves64 = [x.detach().double().requires_grad_() for x in (f, w, b, r)]
    ref = ddn_select_reference(leaves64[0], leaves64[1], t.double(), leaves64[2], leaves64[3])
    assert torch.equal(sel.index, ref[1])
    assert_close(sel.output, ref[0], name="output", dtype=torch.float32)
    assert_close(sel.distances, ref[2], name="distances", dtype=torch.float32)
    d_out = torch.randn(ref[0].shape, dtype=torch.float64)
    got = torch.autograd.grad(sel.output, (f, w, b, r), d_out.float())
    want = torch.autograd.grad(ref[0], leaves64, d_out)
    for name, g, h in zip(("features", "weight", "bias", "residual"), got, want):
        assert_close(g, h, name=f"d {name}", dtype=torch.float32)


def test_kernels_refuse_bad_arguments(ext):
    f, w, b, r, t = _inputs(2, 5, 3, 5, 3, 5)
    gram = torch.empty(2, 15, dtype=torch.float64)
    m_fe, s_f = torch.empty(2, 3, 5, dtype=torch.float64), torch.empty(2, 5, dtype=torch.float64)
    e_sum, e_sq = torch.empty(2, 3, dtype=torch.float64), torch.empty(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="gram must be"):
        ext.ddn_l2_stats_cpu(f, r, t, torch.empty(2, 14, dtype=torch.float64), m_fe, s_f, e_sum, e_sq)
    with pytest.raises(ValueError, match="features must be float32 or float64"):
        ext.ddn_l2_stats_cpu(f.half(), r, t, gram, m_fe, s_f, e_sum, e_sq)
    a, est = torch.empty(2, 5, dtype=torch.float64), torch.empty(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="a must be"):
        ext.ddn_l2_threshold_cpu(a[:, :4], gram, m_fe, s_f, e_sum, e_sq, w, b, t, 8.0, est, est.clone(),
                                 torch.empty(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="thresh must be"):
        ext.ddn_l2_threshold_cpu(a, gram, m_fe, s_f, e_sum, e_sq, w, b, t, 8.0, est, est.clone(),
                                 torch.empty(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="index"):
        ext.ddn_chosen_forward_cpu(f, w, b, r, torch.tensor([0, 5]), torch.empty(2, 3, 3, 5, dtype=torch.float64))
    p_tri = torch.empty(5, 15, dtype=torch.float64)  # the weight checks both weight-reading entry points share
    with pytest.raises(ValueError, match="weight must be float32 or float64"):
        ext.ddn_weight_gram_cpu(w.half(), p_tri)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        ext.ddn_weight_gram_cpu(w.transpose(0, 1).contiguous().transpose(0, 1), p_tri)
    with pytest.raises(ValueError, match=r"weight must be \[K, Cout, Cin\]"):
        ext.ddn_l2_threshold_cpu(a, gram, m_fe, s_f, e_sum, e_sq, w[None], b, t, 8.0, est, est.clone(),
                                 torch.empty(2, dtype=torch.float64))
