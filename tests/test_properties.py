"""Property tests over random sizes (hypothesis, derandomized so the suite stays deterministic)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import fastcomp
from fastcomp import _build
from fastcomp.reference import ddn_candidates, disk_mask_reference, local_conditional_attention_reference

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True)
f64 = torch.float64


@st.composite
def attention_problems(draw):
    H, W = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kh = 2 * draw(st.integers(0, (H - 1) // 2)) + 1
    kw = 2 * draw(st.integers(0, (W - 1) // 2)) + 1
    M = draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    return H, W, kh, kw, M, seed


@PROPERTY
@given(attention_problems())
def test_reference_attention_is_one_softmax_over_window_and_allowed_conditioners(problem):
    H, W, kh, kw, M, seed = problem
    g = torch.Generator().manual_seed(seed)
    B, heads, D = 2, 2, 3
    q, k, v = (torch.randn(B, H, W, heads, D, generator=g, dtype=f64) for _ in range(3))
    ck, cv = (torch.randn(B, M, heads, D, generator=g, dtype=f64) for _ in range(2))
    cmask = torch.rand(B, M, H, W, generator=g) < 0.4
    out = fastcomp.local_conditional_attention(q, k, v, (kh, kw), cond_k=ck, cond_v=cv, cond_mask=cmask)
    for i in range(H):
        for j in range(W):
            r0, c0 = min(max(i - kh // 2, 0), H - kh), min(max(j - kw // 2, 0), W - kw)
            for b in range(B):
                keys = [k[b, r0:r0 + kh, c0:c0 + kw].reshape(kh * kw, heads, D), ck[b, cmask[b, :, i, j]]]
                vals = [v[b, r0:r0 + kh, c0:c0 + kw].reshape(kh * kw, heads, D), cv[b, cmask[b, :, i, j]]]
                keys, vals = torch.cat(keys), torch.cat(vals)  # [L, heads, D]
                p = torch.softmax(torch.einsum("hd,lhd->hl", q[b, i, j], keys) * D ** -0.5, dim=-1)
                assert_close(out[b, i, j], torch.einsum("hl,lhd->hd", p, vals), name=f"{(b, i, j)}")


@PROPERTY
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 3), st.integers(1, 5), st.integers(1, 6),
       st.sampled_from(["l2", "l1"]), st.integers(0, 2**31 - 1))
def test_ddn_select_returns_the_argmin_candidate(B, K, Cout, H, W, metric, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, 3, H, W, generator=g, dtype=f64)
    weight = torch.randn(K, Cout, 3, generator=g, dtype=f64)
    target = torch.randn(B, Cout, H, W, generator=g, dtype=f64)
    out, index, dist = fastcomp.ddn_select(features, weight, target, metric=metric)
    cand = ddn_candidates(features, weight)
    diff = cand - target[:, None]
    expected = (diff.square() if metric == "l2" else diff.abs()).mean(dim=(2, 3, 4))
    assert torch.equal(index, expected.argmin(dim=1))
    assert_close(out, cand[torch.arange(B), index])
    assert_close(dist, expected, dtype=torch.float32)


@pytest.mark.skipif(_build.compiler_problem() is not None, reason="no C++ compiler")
@PROPERTY
@given(st.integers(1, 3), st.integers(0, 5), st.integers(1, 20), st.integers(1, 20),
       st.floats(0, 12, allow_nan=False), st.integers(0, 2**31 - 1), st.booleans())
def test_disk_mask_backends_agree_with_the_reference(B, M, H, W, radius, seed, on_grid):
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(B, M, 2, generator=g, dtype=f64) * torch.tensor([H + 4.0, W + 4.0]) - 2
    if on_grid:  # integer and half-integer points put many pixels exactly on the boundary
        points = (points * 2).round() / 2
    ref = disk_mask_reference(points, radius, H, W)
    assert torch.equal(fastcomp.disk_mask(points, radius, H, W, backend="cpu"), ref)
    assert torch.equal(fastcomp.disk_mask(points.float(), radius, H, W, backend="cpu"),
                       disk_mask_reference(points.float(), radius, H, W))
