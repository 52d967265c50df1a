"""Faults and bad input on purpose, as a new user would try them (issue 13): the ops, the models and the
probes. Each test is one row of the issue's table; the checkpoint, training-run and command-line rows are
in test_faults_runs.py and test_faults_cli.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastcomp
from fastcomp import backends as _b
from fastcomp.models import ConditionalDenoiser
from fastcomp.probe import NonFiniteJacobianWarning, locality_vs_noise, pixel_locality
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

ATTENTION = "local_conditional_attention"


def _runnable(op: str, names) -> list:
    """The backends of `op` that can run on this machine (the triton one under TRITON_INTERPRET=1)."""
    by_name = {b.name: b for b in _b.backends(op)}
    return [n for n in names if n in by_name and by_name[n].machine_reason is None]


# --- Cin = 0 --------------------------------------------------------------------------------------------
# Was: SIGFPE killed the process (float32/64, auto or cpu), ZeroDivisionError in float16.

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", [None, "cpu", "reference", "triton"])
@pytest.mark.parametrize("op", ["ddn_select", "ddn_gather"])
def test_ddn_refuses_zero_input_channels_like_zero_candidates(op, backend, dtype):
    if backend == "triton" and not _runnable("ddn_select", ["triton"]):
        pytest.skip("triton cannot run here")
    features = torch.randn(3, 0, 5, 6, dtype=dtype)
    weight = torch.randn(16, 3, 0, dtype=dtype)
    last = torch.randn(3, 3, 5, 6, dtype=dtype) if op == "ddn_select" else torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight \[K, Cout, Cin\] needs K >= 1, Cout >= 1 and Cin >= 1, "
                                         r"got \[16, 3, 0\]"):
        getattr(fastcomp, op)(features, weight, last, backend=backend)
    with pytest.raises(ValueError, match=r"needs K >= 1, Cout >= 1 and Cin >= 1, got \[0, 3, 0\]"):  # as K = 0
        getattr(fastcomp, op)(features, torch.randn(0, 3, 0, dtype=dtype), last, backend=backend)


# --- masked-out conditioners and padding points ----------------------------------------------------------
# Was: finite on the fp32 cpu backend, every output NaN with backend="reference", bf16 autocast and the
# global model (0 * NaN in the softmax products).

def _attention_problem(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    B, H, W, heads, D, M = 2, 5, 6, 1, 16, 3
    q, k, v = (torch.randn(B, H, W, heads, D, generator=g).to(dtype) for _ in range(3))
    ck, cv = (torch.randn(B, M, heads, D, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(B, M, H, W, generator=g) < 0.5
    mask[:, 0] = True
    mask[:, 1] = False  # conditioner 1: padding, no pixel sees it
    mask[0, 2] = False
    mask[0, 2, 1:3, 2:5] = True  # conditioner 2 (sample 0): seen by six pixels only
    ck, cv = ck.clone(), cv.clone()
    ck[:, 1], cv[:, 1] = float("nan"), float("inf")  # non-finite padding
    cv[0, 2, 0, 3] = float("inf")  # a non-finite conditioner some pixels see
    return q, k, v, ck, cv, mask


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_masked_out_conditioners_never_affect_the_output(backend):
    if not _runnable(ATTENTION, [backend]):
        pytest.skip(f"{backend} cannot run here")
    q, k, v, ck, cv, mask = _attention_problem()
    leaves = [t.requires_grad_(True) for t in (q, k, v, ck, cv)]
    out = fastcomp.local_conditional_attention(q, k, v, 3, cond_k=ck, cond_v=cv, cond_mask=mask, backend=backend)
    sees_bad = torch.zeros(2, 5, 6, dtype=torch.bool)
    sees_bad[0, 1:3, 2:5] = True
    # Exactly the pixels that see the non-finite conditioner are NaN (the arithmetic says so) ...
    assert torch.isnan(out[sees_bad]).all() and torch.isfinite(out[~sees_bad]).all()
    # ... and every other pixel is what it would be with finite values in the conditioners it does not see.
    finite_k, finite_v, finite_mask = ck.detach().clone(), cv.detach().clone(), mask.clone()
    finite_k[:, 1] = finite_v[:, 1] = finite_k[0, 2] = finite_v[0, 2] = 0.0
    finite_mask[0, 2] = False
    ref = fastcomp.local_conditional_attention(q.detach(), k.detach(), v.detach(), 3, cond_k=finite_k,
                                               cond_v=finite_v, cond_mask=finite_mask, backend="reference")
    assert_close(out.detach()[~sees_bad], ref[~sees_bad], ratio=1e-5)
    out[~sees_bad].square().sum().backward()
    for name, t in zip("q k v cond_k cond_v".split(), leaves):
        assert torch.isfinite(t.grad).all(), f"{name}: non-finite gradient"
    assert (ck.grad[:, 1] == 0).all() and (cv.grad[:, 1] == 0).all(), "padding must get no gradient"


@pytest.mark.parametrize("case", ["local-cpu", "local-reference", "local-bf16", "global", "global-bf16"])
def test_nan_padding_points_do_not_poison_the_denoiser(case):
    locality = case.split("-")[0]
    backend = "reference" if case.endswith("reference") else None
    torch.manual_seed(0)
    model = ConditionalDenoiser(img_channels=1, image_size=8, channels=16, depth=1, num_heads=2, kernel_size=3,
                                locality=locality, backend=backend)
    for p in model.parameters():  # a trained-looking model: the zero-initialized output conv would hide it
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 1, 8, 8)
    points = torch.rand(2, 3, 2) * 7
    valid = torch.tensor([[True, False, True], [True, False, False]])
    points[~valid] = float("nan")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.endswith("bf16")):
        out = model(x, 1.0, points, valid)
        alone = torch.cat([model(x[:1], 1.0, points[:1, [0, 2]]), model(x[1:], 1.0, points[1:, :1])])
    assert torch.isfinite(out).all(), "a padding token poisoned the output"
    torch.testing.assert_close(out, alone, rtol=0, atol=2e-2 if case.endswith("bf16") else 1e-5)


def test_global_attention_ignores_an_inf_masked_out_token():
    from fastcomp.models.diffusion import GlobalConditionalAttention

    torch.manual_seed(0)
    layer = GlobalConditionalAttention(16, 2, 3)
    x, cond = torch.randn(1, 4, 4, 16), torch.randn(1, 2, 16)
    cond[0, 1] = float("inf")
    out = layer(x, cond, torch.tensor([[True, False]]))
    torch.testing.assert_close(out, layer(x, cond[:, :1]), rtol=0, atol=1e-6)


# --- disk_mask radius, scale, numpy integers ---------------------------------------------------------------
# Was: radius 1e300 all True on cpu, OverflowError in the reference; scale NaN/inf/negative accepted;
# np.int64 kernel sizes refused.

@pytest.mark.parametrize("radius", [1e300, math.inf, 1e154, 2.5])
def test_disk_mask_huge_radius_is_the_same_on_every_backend(radius):
    points = torch.tensor([[[1.0, 2.0], [-3.0, 40.0]]])
    masks = {b: fastcomp.disk_mask(points, radius, 5, 6, backend=b)
             for b in _runnable("disk_mask", ["reference", "cpu", "triton", "cuda"])}
    assert len(masks) >= 2
    first = next(iter(masks.values()))
    for name, mask in masks.items():
        assert torch.equal(mask, first), name
    assert bool(first.all()) == (radius > 100)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -0.5, 0.0])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_bad_scales_are_refused_on_every_backend(scale, backend):
    q = torch.randn(1, 4, 4, 1, 16)
    with pytest.raises(ValueError, match=r"local_conditional_attention: scale must be finite and > 0.*got"):
        fastcomp.local_conditional_attention(q, q, q, 3, scale=scale, backend=backend)


def test_numpy_numbers_are_accepted_where_python_ones_are():
    q = torch.randn(1, 5, 5, 1, 16)
    expected = fastcomp.local_conditional_attention(q, q, q, 3, scale=0.25)
    for kernel, scale in ((np.int64(3), np.float32(0.25)), ((np.int32(3), np.int64(3)), np.float64(0.25))):
        torch.testing.assert_close(fastcomp.local_conditional_attention(q, q, q, kernel, scale=scale), expected)
    points = torch.rand(1, 2, 2) * 4
    assert torch.equal(fastcomp.disk_mask(points, np.float32(1.5), np.int64(5), np.int64(5)),
                       fastcomp.disk_mask(points, 1.5, 5, 5))
    model = ConditionalDenoiser(img_channels=1, image_size=np.int64(8), channels=8, depth=np.int64(1),
                                num_heads=2, kernel_size=np.int64(3))
    assert model(torch.randn(1, 1, 8, 8), 1.0, torch.rand(1, 1, 2)).shape == (1, 1, 8, 8)
    res = pixel_locality(lambda t: t * 2, torch.randn(1, 1, 5, 5), radius=np.int64(1), chunk_size=np.int64(4))
    assert res.radius == 1 and type(res.radius) is int


# --- probes of a model whose output is NaN -----------------------------------------------------------------
# Was: a NaN profile, yet leakage 0 and mass radius 2 at every quantile.

@pytest.mark.parametrize("method", ["auto", "exact", "colored"])
def test_a_nan_jacobian_measures_nothing(method):
    def fn(x):
        return torch.nn.functional.avg_pool2d(x, 3, 1, 1) * float("nan")

    with pytest.warns(NonFiniteJacobianWarning, match="non-finite"):
        res = pixel_locality(fn, torch.randn(1, 1, 6, 6), radius=2, method=method)
    assert math.isnan(res.leakage)
    assert all(math.isnan(res.mass_radius(q)) for q in (0.5, 0.75, 0.95, 1.0))
    with pytest.warns(NonFiniteJacobianWarning):
        rows = locality_vs_noise(lambda x, s: fn(x), torch.randn(1, 1, 6, 6), [0.1], radius=2,
                                 method=method).rows()
    assert all(math.isnan(v) for k, v in rows[0].items() if k != "sigma")
