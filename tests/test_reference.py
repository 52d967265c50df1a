"""The references are the spec: check them on cases whose answer is known by hand or by brute force."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import fastcomp
from fastcomp.reference import (
    conditioner_locality_reference,
    ddn_candidates,
    ddn_gather_reference,
    ddn_select_reference,
    disk_mask_reference,
    local_conditional_attention_reference,
    pixel_locality_reference,
    window_mask,
)

f64 = torch.float64


def qkv(B=2, H=5, W=7, heads=2, D=4, dtype=f64):
    return [torch.randn(B, H, W, heads, D, dtype=dtype) for _ in range(3)]


def dense_attention(q, keys, values, allowed, scale):
    """softmax(q k^T * scale) v written out by hand; q [N, D], keys [L, D], allowed [N, L] bool."""
    scores = (q @ keys.T) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ values


# --- local conditional attention -----------------------------------------------------------------

def test_window_rule_matches_brute_force():
    H, W, kh, kw = 6, 9, 3, 5
    mask = window_mask(H, W, kh, kw).reshape(H, W, H, W)
    for i in range(H):
        for j in range(W):
            r0 = min(max(i - kh // 2, 0), H - kh)
            c0 = min(max(j - kw // 2, 0), W - kw)
            expected = torch.zeros(H, W, dtype=torch.bool)
            expected[r0:r0 + kh, c0:c0 + kw] = True
            assert torch.equal(mask[i, j], expected), (i, j)
    # every query sees exactly kh * kw image keys, also at the borders
    assert bool((mask.reshape(H * W, H * W).sum(1) == kh * kw).all())


def test_full_kernel_without_conditioners_is_plain_softmax_attention():
    B, H, W, heads, D = 2, 5, 7, 3, 4
    q, k, v = qkv(B, H, W, heads, D)
    out = local_conditional_attention_reference(q, k, v, (H, W))
    flat = lambda t: t.reshape(B, H * W, heads, D)  # noqa: E731
    expected = torch.empty_like(flat(q))
    for b in range(B):
        for h in range(heads):
            expected[b, :, h] = dense_attention(flat(q)[b, :, h], flat(k)[b, :, h], flat(v)[b, :, h],
                                                torch.ones(H * W, H * W, dtype=torch.bool), D ** -0.5)
    assert_close(out, expected.reshape(B, H, W, heads, D))


def test_window_and_conditioners_by_hand():
    """One query pixel, computed from the definition: its window keys plus its allowed conditioners."""
    B, H, W, heads, D, M = 1, 5, 6, 1, 3, 4
    kh, kw = 3, 3
    q, k, v = qkv(B, H, W, heads, D)
    ck, cv = torch.randn(B, M, heads, D, dtype=f64), torch.randn(B, M, heads, D, dtype=f64)
    cmask = torch.rand(B, M, H, W) < 0.5
    scale = 0.7
    out = local_conditional_attention_reference(q, k, v, (kh, kw), ck, cv, cmask, scale)
    for i, j in [(0, 0), (4, 5), (2, 3), (0, 5)]:
        r0, c0 = min(max(i - 1, 0), H - kh), min(max(j - 1, 0), W - kw)
        keys = [k[0, r, c, 0] for r in range(r0, r0 + kh) for c in range(c0, c0 + kw)]
        vals = [v[0, r, c, 0] for r in range(r0, r0 + kh) for c in range(c0, c0 + kw)]
        keys += [ck[0, m, 0] for m in range(M) if cmask[0, m, i, j]]
        vals += [cv[0, m, 0] for m in range(M) if cmask[0, m, i, j]]
        keys, vals = torch.stack(keys), torch.stack(vals)
        p = torch.softmax(keys @ q[0, i, j, 0] * scale, dim=0)
        assert_close(out[0, i, j, 0], p @ vals, name=f"pixel {(i, j)}")


def test_all_false_conditioner_mask_changes_nothing():
    q, k, v = qkv()
    B, H, W, heads, D = q.shape
    ck, cv = torch.randn(B, 3, heads, D, dtype=f64), torch.randn(B, 3, heads, D, dtype=f64)
    none = local_conditional_attention_reference(q, k, v, (3, 5))
    masked_out = local_conditional_attention_reference(q, k, v, (3, 5), ck, cv,
                                                       torch.zeros(B, 3, H, W, dtype=torch.bool))
    assert_close(masked_out, none)
    # M = 0 conditioners is the same as none
    empty = torch.zeros(B, 0, heads, D, dtype=f64)
    assert_close(local_conditional_attention_reference(q, k, v, (3, 5), empty, empty,
                                                       torch.zeros(B, 0, H, W, dtype=torch.bool)), none)


def test_padding_conditioner_changes_nothing_next_to_real_ones():
    q, k, v = qkv()
    B, H, W, heads, D = q.shape
    ck, cv = torch.randn(B, 2, heads, D, dtype=f64), torch.randn(B, 2, heads, D, dtype=f64)
    cmask = torch.rand(B, 2, H, W) < 0.5
    cmask[:, 1] = False  # conditioner 1 is padding
    with_pad = local_conditional_attention_reference(q, k, v, (3, 3), ck, cv, cmask)
    without = local_conditional_attention_reference(q, k, v, (3, 3), ck[:, :1], cv[:, :1], cmask[:, :1])
    assert_close(with_pad, without)


def test_mask_none_means_every_pixel_sees_every_conditioner():
    q, k, v = qkv()
    B, H, W, heads, D = q.shape
    ck, cv = torch.randn(B, 3, heads, D, dtype=f64), torch.randn(B, 3, heads, D, dtype=f64)
    assert_close(local_conditional_attention_reference(q, k, v, (3, 3), ck, cv, None),
                 local_conditional_attention_reference(q, k, v, (3, 3), ck, cv,
                                                       torch.ones(B, 3, H, W, dtype=torch.bool)))


def test_reference_gradcheck():
    B, H, W, heads, D, M = 1, 4, 5, 1, 2, 2
    q, k, v = [t.requires_grad_() for t in qkv(B, H, W, heads, D)]
    ck = torch.randn(B, M, heads, D, dtype=f64, requires_grad=True)
    cv = torch.randn(B, M, heads, D, dtype=f64, requires_grad=True)
    cmask = torch.rand(B, M, H, W) < 0.5
    assert torch.autograd.gradcheck(
        lambda *a: local_conditional_attention_reference(*a[:3], (3, 3), a[3], a[4], cmask), (q, k, v, ck, cv))


def test_public_op_defaults_match_reference():
    q, k, v = qkv()
    out = fastcomp.local_conditional_attention(q, k, v, 3)
    assert_close(out, local_conditional_attention_reference(q, k, v, (3, 3)))
    assert out.shape == q.shape


def test_disk_mask_by_hand():
    points = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])
    mask = disk_mask_reference(points, 5.0, 8, 9)
    assert bool(mask[0, 0, 0, 0])  # 3^2 + 4^2 = 25 <= 25: on the boundary counts as inside
    assert not bool(mask[0, 0, 7, 8])  # 4^2 + 4^2 = 32 > 25
    assert int(mask[0, 0].sum()) == sum((i - 3) ** 2 + (j - 4) ** 2 <= 25 for i in range(8) for j in range(9))
    assert int(disk_mask_reference(points, 0.0, 8, 9)[0, 1].sum()) == 1  # radius 0: the point itself
    assert torch.equal(fastcomp.disk_mask(points, 5, 8, 9), mask)


# --- DDN selection -------------------------------------------------------------------------------

def ddn_inputs(B=3, Cin=4, Cout=3, K=5, H=7, W=9, dtype=f64):
    return (torch.randn(B, Cin, H, W, dtype=dtype), torch.randn(K, Cout, Cin, dtype=dtype),
            torch.randn(B, Cout, H, W, dtype=dtype), torch.randn(K, Cout, dtype=dtype),
            torch.randn(B, Cout, H, W, dtype=dtype))


def test_candidates_are_a_conv1x1_plus_bias_plus_residual():
    features, weight, _, bias, residual = ddn_inputs()
    K, Cout, Cin = weight.shape
    conv = F.conv2d(features, weight.reshape(K * Cout, Cin, 1, 1), bias.reshape(-1))
    expected = conv.reshape(features.shape[0], K, Cout, *features.shape[2:]) + residual[:, None]
    assert_close(ddn_candidates(features, weight, bias, residual), expected)


def test_select_with_k1_returns_that_candidate():
    features, weight, target, bias, residual = ddn_inputs(K=1)
    out, index, dist = ddn_select_reference(features, weight, target, bias, residual)
    assert torch.equal(index, torch.zeros(3, dtype=torch.int64))
    assert_close(out, ddn_candidates(features, weight, bias, residual)[:, 0])
    assert dist.dtype == torch.float32 and dist.shape == (3, 1)


@pytest.mark.parametrize("metric", ["l2", "l1"])
def test_select_picks_the_nearest_candidate(metric):
    features, weight, target, bias, residual = ddn_inputs()
    out, index, dist = fastcomp.ddn_select(features, weight, target, bias=bias, residual=residual, metric=metric)
    cand = ddn_candidates(features, weight, bias, residual)
    diff = cand - target[:, None]
    expected = (diff.square() if metric == "l2" else diff.abs()).mean(dim=(2, 3, 4))
    assert_close(dist, expected, dtype=torch.float32)
    for b in range(3):
        best = min(range(5), key=lambda kk: float(expected[b, kk]))
        assert int(index[b]) == best
        assert_close(out[b], cand[b, best])


def test_select_ties_go_to_the_smallest_index():
    features, weight, target, _, _ = ddn_inputs(K=4)
    weight = weight.clone()
    weight[3] = weight[1]  # candidates 1 and 3 are identical
    target = ddn_candidates(features, weight)[:, 1]  # ... and both exactly equal the target
    _, index, dist = ddn_select_reference(features, weight, target)
    assert torch.equal(index, torch.ones(3, dtype=torch.int64))
    assert bool((dist[:, 1] == 0).all() and (dist[:, 3] == 0).all())


def test_gather_returns_the_indexed_candidate_and_gradients_flow_through_it_only():
    features, weight, _, bias, residual = ddn_inputs()
    weight.requires_grad_()
    index = torch.tensor([4, 0, 4])
    out = fastcomp.ddn_gather(features, weight, index, bias=bias, residual=residual)
    assert_close(out, ddn_candidates(features, weight, bias, residual)[torch.arange(3), index])
    out.sum().backward()
    unused = [1, 2, 3]
    assert bool((weight.grad[unused] == 0).all()) and bool((weight.grad[[0, 4]] != 0).any())


def test_gather_equals_select_output():
    features, weight, target, bias, residual = ddn_inputs()
    out, index, _ = ddn_select_reference(features, weight, target, bias, residual)
    assert_close(ddn_gather_reference(features, weight, index, bias, residual), out)


# --- probes --------------------------------------------------------------------------------------

def conv_fn(kernel: torch.Tensor):
    """Single-channel convolution with zero padding; kernel [k, k]."""
    pad = kernel.shape[-1] // 2
    return lambda x: F.conv2d(x, kernel[None, None], padding=pad)


def test_3x3_conv_has_radius_1_and_no_leakage():
    w = torch.randn(3, 3, dtype=f64)
    res = fastcomp.probe.pixel_locality(conv_fn(w), torch.randn(2, 1, 9, 11, dtype=f64), radius=2,
                                        method="exact")
    assert res.mass_radius(1.0) == 1
    assert res.leakage == 0.0
    # Inside the image every Jacobian entry at offset delta is exactly the kernel tap w[delta]
    # (cross-correlation: out[p] = sum_delta w[delta] x[p + delta]), so the profile is |w| padded by zeros.
    expected = torch.zeros(5, 5, dtype=f64)
    expected[1:4, 1:4] = w.abs()
    assert_close(res.profile, expected)


def test_1x1_conv_has_radius_0():
    w = torch.randn(3, 2, 1, 1, dtype=f64)
    res = fastcomp.probe.pixel_locality(lambda x: F.conv2d(x, w), torch.randn(1, 2, 6, 5, dtype=f64), radius=1)
    assert res.mass_radius(1.0) == 0
    assert res.leakage == 0.0


def test_leakage_of_a_5x5_conv_probed_at_radius_1_is_the_outer_ring_mass():
    H, W = 7, 8
    w = torch.randn(5, 5, dtype=f64)
    res = pixel_locality_reference(conv_fn(w), torch.randn(1, 1, H, W, dtype=f64), radius=1)
    # |J| mass at offset delta: |w[delta]| times the number of output pixels p with p + delta inside.
    total = outside = 0.0
    for di in range(-2, 3):
        for dj in range(-2, 3):
            mass = abs(float(w[di + 2, dj + 2])) * (H - abs(di)) * (W - abs(dj))
            total += mass
            if max(abs(di), abs(dj)) > 1:
                outside += mass
    assert res.leakage == pytest.approx(outside / total, rel=1e-12)


def test_mass_radius_fractions():
    from fastcomp.probe import PixelLocality

    profile = torch.zeros(5, 5, dtype=f64)
    profile[2, 2] = 0.6
    profile[1, 2] = 0.3
    profile[0, 0] = 0.1
    res = PixelLocality(profile=profile, radius=2, leakage=0.0, method="exact")
    assert [res.mass_radius(q) for q in (0.5, 0.6, 0.9, 0.95, 1.0)] == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError, match="fraction"):
        res.mass_radius(1.5)


def test_batch_mixing_fn_is_refused():
    with pytest.raises(ValueError, match="mixes batch items"):
        pixel_locality_reference(lambda x: x - x.mean(dim=0, keepdim=True), torch.randn(2, 1, 4, 4, dtype=f64), 1)


def local_conditioner_fn(cond_mask):
    """Conditioner m influences exactly the pixels inside its mask: out = x + sum_m mask_m * tanh(c_m . u)."""
    u = torch.randn(3, 2, dtype=f64)  # [Dc, C]

    def fn(x, cond):
        effect = torch.tanh(cond @ u)  # [B, M, C]
        return x + torch.einsum("bmc,bmhw->bchw", effect, cond_mask.to(x.dtype))

    return fn


def test_conditioner_used_only_inside_its_mask_has_inside_fraction_1():
    B, M, H, W = 3, 4, 5, 7
    cmask = fastcomp.disk_mask(torch.rand(B, M, 2) * torch.tensor([H, W]), 1.5, H, W)
    cmask[0, 3] = False  # a padding conditioner the model ignores
    x, cond = torch.randn(B, 2, H, W, dtype=f64), torch.randn(B, M, 3, dtype=f64)
    res = fastcomp.probe.conditioner_locality(local_conditioner_fn(cmask), x, cond, cmask)
    assert res.attribution.shape == (B, M, H, W)
    assert float(res.attribution[~cmask].abs().max()) == 0.0
    real = cmask.flatten(2).any(-1)
    assert torch.equal(res.inside_fraction[real], torch.ones_like(res.inside_fraction[real]))
    assert bool(torch.isnan(res.inside_fraction[0, 3]))


def test_global_conditioner_use_has_inside_fraction_below_1():
    B, M, H, W = 2, 2, 5, 6
    cmask = fastcomp.disk_mask(torch.rand(B, M, 2) * torch.tensor([H, W]), 1.0, H, W)
    res = conditioner_locality_reference(local_conditioner_fn(torch.ones_like(cmask)),
                                         torch.randn(B, 1, H, W, dtype=f64), torch.randn(B, M, 3, dtype=f64), cmask)
    expected = cmask.sum(dim=(2, 3)).to(f64) / (H * W)  # attribution is uniform over the image
    assert_close(res.inside_fraction, expected)


@pytest.mark.parametrize("H, W, radius, kernels", [(13, 17, 2, (3, 3)), (13, 17, 3, (5, 3)), (9, 11, 3, (3, 3, 3)), (5, 4, 1, (3,)),
                                                   (4, 5, 3, (3, 3))])
def test_colored_equals_exact_for_a_radius_local_fn(H, W, radius, kernels):
    """A stack of convolutions whose receptive radius is <= R: colouring recovers the exact profile."""
    convs = [torch.randn(3, 2 if i == 0 else 3, k, k, dtype=f64) for i, k in enumerate(kernels)]

    def fn(x):
        for w in convs:
            x = torch.tanh(F.conv2d(x, w, padding=w.shape[-1] // 2))
        return x

    x = torch.randn(3, 2, H, W, dtype=f64)
    exact = fastcomp.probe.pixel_locality(fn, x, radius=radius, method="exact")
    colored = fastcomp.probe.pixel_locality(fn, x, radius=radius, method="colored")
    assert exact.leakage == 0.0
    assert (colored.profile - exact.profile).abs().max() < 1e-10 * exact.profile.abs().max()
    assert colored.mass_radius(1.0) == exact.mass_radius(1.0) == min(sum(k // 2 for k in kernels), radius)
    assert colored.method == "colored" and colored.leakage != colored.leakage  # NaN: not measured
