"""fastcomp.ddn_select / ddn_gather: every fast backend against the float64 reference.

Outputs, index, distances and every gradient (features, weight, bias, residual) on odd sizes; float64
gradcheck; cancellation (large residual offsets, near-duplicate weight rows, float16/bfloat16), where the
index must equal the reference's argmin except for genuine near-ties (`_near_tie_tolerance`).
Triton runs under TRITON_INTERPRET=1 on CPU here (tiny shapes); cuda only where a GPU is.
"""

from __future__ import annotations

import pytest
import torch

import fastcomp
from fastcomp import backends as _b
from fastcomp.reference import ddn_candidates, ddn_gather_reference, ddn_select_reference
from tests.helpers import assert_close, assert_low_precision_close

BACKENDS = ["cpu", "torch", pytest.param("triton", marks=pytest.mark.triton),
            pytest.param("cuda", marks=pytest.mark.gpu)]
HALF = (torch.float16, torch.bfloat16)


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _inputs(B, Cin, Cout, K, H, W, *, dtype=torch.float64, bias=True, residual=True, device="cpu", seed=0,
            residual_offset=0.0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype
                                                                                  ).requires_grad_(grad)

    features = rand(B, Cin, H, W)
    weight = rand(K, Cout, Cin, scale=Cin ** -0.5)
    b = rand(K, Cout, scale=0.3) if bias else None
    r = None
    if residual:
        r = (torch.randn(B, Cout, H, W, generator=g, dtype=torch.float64) + residual_offset).to(device, dtype)
        r.requires_grad_(True)
    # Targets near some candidate so that the argmin is not decided by the residual alone.
    target = (torch.randn(B, Cout, H, W, generator=g, dtype=torch.float64) + residual_offset).to(device, dtype)
    return features, weight, b, r, target


def _grads(out, tensors, d_out):
    wrt = [t for t in tensors if t is not None]
    return torch.autograd.grad(out, wrt, d_out, allow_unused=True)


# --- forward and gradients vs the reference, float64, odd sizes --------------------------------------

SIZES = [  # B, Cin, Cout, K, H, W
    (3, 5, 3, 5, 7, 9),
    (2, 4, 1, 2, 7, 9),
    (4, 3, 3, 1, 7, 9),
    (1, 6, 1, 5, 3, 5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "l1"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}Cin{}Cout{}K{}_{}x{}".format(*s))
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False), (True, False)],
                         ids=["bias+res", "plain", "bias"])
def test_select_matches_reference(backend, metric, size, bias, residual):
    dev = _device(backend)
    f, w, b, r, t = _inputs(*size, bias=bias, residual=residual, device=dev)
    out = fastcomp.ddn_select(f, w, t, bias=b, residual=r, metric=metric, backend=backend)
    ref = ddn_select_reference(f, w, t, b, r, metric)
    assert torch.equal(out.index.cpu(), ref[1].cpu()), (out.index, ref[1])
    assert out.index.dtype == torch.int64 and out.distances.dtype == torch.float32
    assert not out.distances.requires_grad
    assert_close(out.output, ref[0], name="output")
    assert_close(out.distances, ref[2], name="distances", dtype=torch.float32)
    d_out = torch.randn_like(ref[0])
    for name, got, want in zip(("features", "weight", "bias", "residual"),
                               _grads(out.output, (f, w, b, r), d_out), _grads(ref[0], (f, w, b, r), d_out)):
        assert_close(got, want, name=f"d {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", SIZES[:2], ids=lambda s: "B{}Cin{}Cout{}K{}_{}x{}".format(*s))
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False)], ids=["bias+res", "plain"])
def test_gather_matches_reference(backend, size, bias, residual):
    dev = _device(backend)
    f, w, b, r, _ = _inputs(*size, bias=bias, residual=residual, device=dev)
    index = torch.randint(0, size[3], (size[0],), device=dev)
    out = fastcomp.ddn_gather(f, w, index, bias=b, residual=r, backend=backend)
    ref = ddn_gather_reference(f, w, index, b, r)
    assert_close(out, ref, name="output")
    d_out = torch.randn_like(ref)
    for name, got, want in zip(("features", "weight", "bias", "residual"),
                               _grads(out, (f, w, b, r), d_out), _grads(ref, (f, w, b, r), d_out)):
        assert_close(got, want, name=f"d {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_matches_reference(backend):
    dev = _device(backend)
    f, w, b, r, t = _inputs(3, 5, 3, 5, 7, 9, dtype=torch.float32, device=dev)
    out = fastcomp.ddn_select(f, w, t, bias=b, residual=r, backend=backend)
    ref = ddn_select_reference(*(x.detach().double() for x in (f, w)), t.double(), b.detach().double(),
                               r.detach().double())
    assert torch.equal(out.index.cpu(), ref[1].cpu())
    assert_close(out.output, ref[0], name="output", dtype=torch.float32)
    assert_close(out.distances, ref[2], name="distances", dtype=torch.float32)


def test_cpu_gradcheck():
    f, w, b, r, t = _inputs(2, 3, 2, 3, 3, 5)
    assert torch.autograd.gradcheck(
        lambda f, w, b, r: fastcomp.ddn_select(f, w, t, bias=b, residual=r, backend="cpu").output, (f, w, b, r))
    index = torch.tensor([2, 0])
    assert torch.autograd.gradcheck(
        lambda f, w, b, r: fastcomp.ddn_gather(f, w, index, bias=b, residual=r, backend="cpu"), (f, w, b, r))


def test_weight_grad_has_rows_only_for_chosen_k():
    f, w, b, r, t = _inputs(3, 4, 2, 6, 5, 5)
    out = fastcomp.ddn_select(f, w, t, bias=b, residual=r, backend="cpu")
    out.output.sum().backward()
    chosen = set(out.index.tolist())
    for k in range(6):
        nonzero = bool(w.grad[k].abs().sum() > 0) or bool(b.grad[k].abs().sum() > 0)
        assert nonzero == (k in chosen), (k, chosen)


# --- cancellation: the index equals the reference's argmin except for genuine near-ties ---------------

def _near_tie_tolerance(features, weight, target, bias, residual, index, metric, dtype):
    """Per sample, the distance gap below which two candidates are a genuine near-tie in `dtype`.

    The reference rounds each candidate element c to `dtype` (|dc| <= u |c|, u its unit roundoff) and
    accumulates the distance in float32 (or float64): for l2 its distances stray from the exact ones by up
    to ~2 |c - t| |dc| + dc^2 per element, i.e. 2u * RMS(c) * sqrt(d) + u^2 * MS(c) on the mean, for l1 by
    u * mean|c|, plus the accumulation's u_acc * d * sqrt(N). Two candidates whose exact (float64) distances
    differ by less than 4x that sum may be ordered either way by the reference: a near-tie.
    """
    u = torch.finfo(dtype).eps / 2
    u_acc = torch.finfo(torch.promote_types(dtype, torch.float32)).eps / 2
    args64 = [None if x is None else x.detach().double().cpu() for x in (features, weight, target, bias, residual)]
    cand = ddn_candidates(args64[0], args64[1], args64[3], args64[4])  # [B, K, Cout, H, W]
    diff = cand - args64[2][:, None]
    d64 = (diff.square() if metric == "l2" else diff.abs()).flatten(2).mean(dim=2)  # [B, K]
    chosen = cand[torch.arange(cand.shape[0]), index.cpu()].flatten(1)  # [B, N]
    d_min = d64.min(dim=1).values
    if metric == "l2":
        noise = 2 * u * chosen.square().mean(1).sqrt() * d_min.sqrt() + u * u * chosen.square().mean(1)
    else:
        noise = u * chosen.abs().mean(1)
    noise = noise + u_acc * d_min * chosen.shape[1] ** 0.5
    return d64, 4 * noise


def _assert_index_matches_up_to_near_ties(out, features, weight, target, bias, residual, metric, dtype):
    ref = ddn_select_reference(features, weight, target, bias, residual, metric)
    d64, tol = _near_tie_tolerance(features, weight, target, bias, residual, ref[1], metric, dtype)
    got, want = out.index.cpu(), ref[1].cpu()
    rows = torch.arange(len(got))
    gap = (d64[rows, got] - d64[rows, want]).abs()
    bad = (got != want) & (gap > tol)
    assert not bool(bad.any()), (f"index differs from the reference's beyond near-ties at samples "
                                 f"{torch.nonzero(bad).flatten().tolist()}: got {got[bad].tolist()}, reference "
                                 f"{want[bad].tolist()}, gaps {gap[bad].tolist()}, tolerance {tol[bad].tolist()}")
    # The chosen candidate's distance is accurate to the same tolerance, and the output is that candidate.
    # (distances are float32: add their rounding)
    chosen_d = out.distances.double().cpu()[rows, got]
    allowed = tol + d64[rows, got].abs() * 2.0 ** -23 + 1e-30
    assert bool(((chosen_d - d64[rows, got]).abs() <= allowed).all()), (chosen_d, d64[rows, got], allowed)
    args64 = [None if x is None else x.detach().double() for x in (features, weight, bias, residual)]
    ref64 = ddn_gather_reference(args64[0], args64[1], out.index, args64[2], args64[3])
    assert_low_precision_close(out.output, ref64, ddn_gather_reference(features, weight, out.index, bias, residual),
                               name="output")
    return int((got != want).sum())


def _near_duplicate_weights(K, Cout, Cin, dtype, spread, seed=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, Cout, Cin, generator=g, dtype=torch.float64) * Cin ** -0.5
    return (base + spread * torch.randn(K, Cout, Cin, generator=g, dtype=torch.float64)).to(dtype)


CANCELLATION = [  # name, dtype, residual offset, near-duplicate spread (None: random weights)
    ("offset 1e4 float32", torch.float32, 1e4, None),
    ("offset 1e4 float64", torch.float64, 1e4, None),
    ("near-duplicate rows float32", torch.float32, 0.0, 1e-6),
    ("near-duplicate rows + offset 1e3 float32", torch.float32, 1e3, 1e-5),
    ("exact duplicate rows float32", torch.float32, 10.0, 0.0),
    ("float16", torch.float16, 0.0, None),
    ("float16 near-duplicates offset 30", torch.float16, 30.0, 1e-3),
    ("bfloat16", torch.bfloat16, 0.0, None),
    ("bfloat16 offset 100", torch.bfloat16, 100.0, 1e-2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "l1"])
@pytest.mark.parametrize("case", CANCELLATION, ids=[c[0] for c in CANCELLATION])
def test_cancellation_index_matches_reference(backend, metric, case):
    name, dtype, offset, spread = case
    _skip_interpreted_bfloat16(backend, dtype)
    _skip_cpu_half(backend, dtype)
    dev = _device(backend)
    B, Cin, Cout, K, H, W = (6, 5, 3, 9, 7, 9) if backend != "triton" else (3, 4, 3, 5, 5, 7)
    f, w, b, r, t = _inputs(B, Cin, Cout, K, H, W, dtype=dtype, device=dev, residual_offset=offset, seed=5)
    if spread is not None:
        w = _near_duplicate_weights(K, Cout, Cin, dtype, spread).to(dev).requires_grad_(True)
        if spread == 0.0:
            b = torch.zeros(K, Cout, dtype=dtype, device=dev, requires_grad=True)
    # Targets among the candidates: the nearest ones then differ only by what the rounding decides.
    with torch.no_grad():
        pick = torch.randint(0, K, (B,))
        t = (ddn_gather_reference(f.double(), w.double(), pick.to(dev), b.double(), r.double())
             + 0.01 * torch.randn(B, Cout, H, W, dtype=torch.float64, device=dev)).to(dtype)
    out = fastcomp.ddn_select(f, w, t, bias=b, residual=r, metric=metric, backend=backend)
    _assert_index_matches_up_to_near_ties(out, f, w, t, b, r, metric, dtype)
    if spread == 0.0:  # exact duplicates tie exactly: the smallest k wins, as in the reference
        assert bool((out.index == 0).all()), out.index


def test_cpu_distances_error_bound_with_large_offset():
    """Distances not re-ranked come from the float64 expansion: accurate to far below float32 here."""
    f, w, b, r, t = _inputs(4, 6, 3, 40, 7, 9, dtype=torch.float32, residual_offset=1e4, seed=7)
    out = fastcomp.ddn_select(f, w, t, bias=b, residual=r, backend="cpu")
    exact = ddn_select_reference(*(x.detach().double() for x in (f, w)), t.double(), b.detach().double(),
                                 r.detach().double())[2]
    # The expansion is exact math on the float32 inputs; the reference rounds candidates to float32
    # (~1e4 * 6e-8 per element), so compare with the float64 evaluation of the same inputs.
    assert_close(out.distances, exact, name="distances", dtype=torch.float32)
    # Those not re-ranked (all but the chosen, here) are the float64 expansion: float32 rounding only.
    others = torch.ones_like(exact, dtype=torch.bool)
    others[torch.arange(4), out.index] = False
    rel = (out.distances.double() - exact).abs() / exact.abs()
    assert float(rel[others].max()) < 1e-6, float(rel[others].max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_output(backend, dtype):
    _skip_interpreted_bfloat16(backend, dtype)
    _skip_cpu_half(backend, dtype)
    dev = _device(backend)
    f, w, b, r, t = _inputs(3, 8, 3, 5, 7, 9, dtype=dtype, device=dev)
    out = fastcomp.ddn_select(f, w, t, bias=b, residual=r, backend=backend)
    _assert_index_matches_up_to_near_ties(out, f, w, t, b, r, "l2", dtype)
    assert out.output.dtype == dtype
    args64 = [x.detach().double() for x in (f, w, b, r)]
    ref64 = ddn_gather_reference(args64[0], args64[1], out.index, args64[2], args64[3])
    assert_low_precision_close(out.output, ref64, ddn_gather_reference(f, w, out.index, b, r))
    gathered = fastcomp.ddn_gather(f, w, out.index, bias=b, residual=r, backend=backend)
    assert_low_precision_close(gathered, ref64, ddn_gather_reference(f, w, out.index, b, r))


def _skip_cpu_half(backend, dtype):
    if backend == "cpu" and dtype in HALF:
        pytest.skip("the cpu backend's C++ kernels take float32/float64; the torch backend runs half precision "
                    "(test_cpu_declines_half_precision_and_auto_runs_torch)")


def _skip_interpreted_bfloat16(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter computes through numpy, which has no bfloat16 (checked on CUDA)")


# --- selection of backends ----------------------------------------------------------------------------

def test_cpu_is_the_default_for_cpu_tensors():
    f, w, b, r, t = _inputs(1, 2, 1, 2, 3, 3)
    assert _b.select("ddn_select", None, f, w, t, b, r).name == "cpu"
    assert _b.select("ddn_gather", None, f, w, torch.zeros(1, dtype=torch.long), b, r).name == "cpu"


def test_priorities():
    for op in ("ddn_select", "ddn_gather"):
        names = [x.name for x in _b.backends(op)]
        # Triton first on CUDA tensors (tl.dot on the tensor cores) until a GPU measurement says otherwise;
        # on CPU tensors the C++ kernels before their PyTorch formulation
        assert names == ["triton", "cuda", "cpu", "torch", "reference"], names


def test_cpu_declines_half_precision_and_auto_runs_torch():
    f, w, b, r, t = _inputs(1, 2, 1, 2, 3, 3, dtype=torch.float16)
    index = torch.zeros(1, dtype=torch.long)
    assert _b.select("ddn_select", None, f, w, t, b, r).name == "torch"
    assert _b.select("ddn_gather", None, f, w, index, b, r).name == "torch"
    with pytest.raises(_b.BackendUnavailable, match="backend 'cpu' cannot run: dtype float16 is not supported"):
        fastcomp.ddn_select(f, w, t, bias=b, residual=r, backend="cpu")


def test_empty_batch_and_nan_poison():
    # B = 0 is handled by the op before dispatch; outputs of B > 0 come from torch.empty, NaN-poisoned by
    # conftest, so an element left unwritten would fail the comparisons above.
    f, w, b, r, t = _inputs(0, 3, 2, 4, 5, 5)
    out = fastcomp.ddn_select(f, w, t, bias=b, residual=r, backend="cpu")
    assert out.output.shape == (0, 2, 5, 5) and out.distances.shape == (0, 4)


# The backward is ChosenCandidate's on every backend; the interpreted Triton gather would only add ~20 s.
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.gpu]),
                                     pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_weight_grad_accumulates_in_float32(backend, dtype, monkeypatch):
    """Many samples choosing one candidate: d weight[k] and d bias[k] sum 256 per-sample terms. Summed in
    bfloat16 by CUDA's index_add (atomics, one rounding per sample) the error grows with the count; in
    float32 with one rounding at the end it stays at the reference's own (its gradient is one GEMM over the
    batch). The CPU's index_add accumulates wider by itself, so on CPU the accumulation dtype is checked."""
    _skip_interpreted_bfloat16(backend, dtype)
    dev = _device(backend)
    accumulated = []
    real_index_add = torch.Tensor.index_add_

    def spy(self, dim, index, source, **kw):
        accumulated.append(self.dtype)
        return real_index_add(self, dim, index, source, **kw)

    monkeypatch.setattr(torch.Tensor, "index_add_", spy)
    f, w, b, r, _ = _inputs(256, 4, 3, 3, 4, 4, dtype=dtype, device=dev)
    index = torch.zeros(256, dtype=torch.int64, device=dev)
    index[::16] = 2  # and a few on another candidate
    d_out = torch.randn(256, 3, 4, 4, generator=torch.Generator().manual_seed(3)).to(dev, dtype) + 0.5
    ours = _grads(fastcomp.ddn_gather(f, w, index, bias=b, residual=r, backend=backend), (w, b), d_out)
    leaves64 = [x.detach().double().requires_grad_() for x in (f, w, b, r)]
    ref64 = _grads(ddn_gather_reference(leaves64[0], leaves64[1], index, leaves64[2], leaves64[3]),
                   leaves64[1:3], d_out.double())
    plain = _grads(ddn_gather_reference(f, w, index, b, r), (w, b), d_out)
    for name, g, g64, g_plain in zip(("d weight", "d bias"), ours, ref64, plain):
        assert g.dtype == dtype
        assert_low_precision_close(g, g64, g_plain, name=name)
    assert accumulated and all(d == torch.float32 for d in accumulated), accumulated
