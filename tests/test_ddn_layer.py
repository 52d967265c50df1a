"""fastcomp.nn.DiscreteDistributionLayer: every mode against the reference definitions (float64)."""

from __future__ import annotations

import pytest
import torch

import fastcomp
from fastcomp.nn import DiscreteDistributionLayer
from fastcomp.reference import ddn_candidates, ddn_select_reference
from helpers import assert_close


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: see conftest.one_thread

D = torch.float64


def make(B=3, Cin=4, Cout=3, K=5, H=7, W=9, **kw):
    layer = DiscreteDistributionLayer(Cin, Cout, K, **kw).to(D)
    feats = torch.randn(B, Cin, H, W, dtype=D, requires_grad=True)
    resid = torch.randn(B, Cout, H, W, dtype=D, requires_grad=True)
    target = torch.randn(B, Cout, H, W, dtype=D)
    return layer, feats, resid, target


@pytest.mark.parametrize("K,Cout,bias", [(1, 1, True), (2, 3, False), (5, 3, True), (5, 1, True)])
@pytest.mark.parametrize("metric", ["l2", "l1"])
def test_select_matches_reference_forward_and_grads(K, Cout, bias, metric):
    layer, feats, resid, target = make(Cout=Cout, K=K, bias=bias, metric=metric)
    out = layer(feats, resid, target=target)
    w = layer.weight.view(K, Cout, -1)
    b = None if layer.bias is None else layer.bias.view(K, Cout)
    ref_out, ref_idx, ref_dist = ddn_select_reference(feats, w, target, b, resid, metric)
    assert torch.equal(out.index, ref_idx)
    assert_close(out.distances, ref_dist, name="distances", dtype=torch.float32)
    assert_close(out.output, ref_out, name="output")
    grad = torch.randn_like(ref_out)
    wrt = [feats, resid, layer.weight] + ([layer.bias] if bias else [])
    got = torch.autograd.grad(out.output, wrt, grad)
    want = torch.autograd.grad(ref_out, wrt, grad)
    for name, g, r in zip(["features", "residual", "weight", "bias"], got, want):
        assert_close(g, r, name=f"d {name}")


def test_residual_is_optional_and_adds():
    layer, feats, resid, target = make()
    with torch.no_grad():
        idx = torch.tensor([0, 4, 2])
        without = layer(feats, index=idx).output
        with_res = layer(feats, resid, index=idx).output
    assert_close(with_res, without + resid, name="output with residual")


def test_hit_counts_on_device_and_exact():
    layer, feats, resid, target = make(K=5)
    assert layer.hits.dtype == torch.int64 and layer.hits.device == layer.weight.device
    assert "hits" in layer.state_dict()
    expected = torch.zeros(5, dtype=torch.int64)
    for _ in range(3):
        t = torch.randn_like(target)
        out = layer(feats, resid, target=t)
        expected += torch.bincount(out.index, minlength=5)
    assert torch.equal(layer.hits, expected) and int(layer.hits.sum()) == 9
    # Not counted: eval mode, or train=False.
    layer(feats, resid, target=target, train=False)
    layer.eval()
    layer(feats, resid, target=target)
    assert torch.equal(layer.hits, expected)
    assert_close(layer.hit_frequencies(), expected.double() / 9, name="frequencies")


def test_hits_survive_dtype_casts():
    layer = DiscreteDistributionLayer(2, 1, 3)
    layer.hits += torch.tensor([1, 2, 3])
    layer.half()
    assert layer.hits.dtype == torch.int64 and layer.hits.tolist() == [1, 2, 3]


def test_chain_dropout_always_random_but_counts_the_nearest():
    torch.manual_seed(1)
    layer, feats, resid, target = make(B=64, K=5, chain_dropout=1.0)
    ref_idx = ddn_select_reference(feats, layer.weight.view(5, 3, -1), target, layer.bias.view(5, 3), resid)[1]
    out = layer(feats, resid, target=target)
    # Hits and distances describe the nearest candidate; the kept one is random.
    assert torch.equal(layer.hits, torch.bincount(ref_idx, minlength=5))
    assert not torch.equal(out.index, ref_idx)
    assert len(out.index.unique()) > 1
    cand = ddn_candidates(feats, layer.weight.view(5, 3, -1), layer.bias.view(5, 3), resid)
    assert_close(out.output, cand[torch.arange(64), out.index], name="dropped output")
    # And it is differentiable through the kept candidate.
    out.output.sum().backward()
    assert layer.weight.grad is not None
    # Evaluation never drops.
    layer.eval()
    assert torch.equal(layer(feats, resid, target=target).index, ref_idx)


def test_chain_dropout_zero_and_probability():
    layer, feats, resid, target = make(B=400, Cin=2, Cout=1, K=8, H=2, W=2, chain_dropout=0.25)
    ref_idx = ddn_select_reference(feats, layer.weight.view(8, 1, -1), target, layer.bias.view(8, 1), resid)[1]
    changed = (layer(feats, resid, target=target).index != ref_idx).float().mean().item()
    # P(changed) = 0.25 * 7/8 ~ 0.22; 400 samples: 5 sigma ~ 0.1.
    assert 0.12 < changed < 0.32
    layer.chain_dropout = 0.0
    assert torch.equal(layer(feats, resid, target=target).index, ref_idx)


def test_generation_given_and_random_indices():
    layer, feats, resid, _ = make(B=4, K=5)
    cand = ddn_candidates(feats, layer.weight.view(5, 3, -1), layer.bias.view(5, 3), resid)
    idx = torch.tensor([4, 0, 0, 3])
    out = layer(feats, resid, index=idx)
    assert out.distances is None and torch.equal(out.index, idx)
    assert_close(out.output, cand[torch.arange(4), idx], name="gathered")
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    r1, r2 = layer(feats, resid, generator=g1), layer(feats, resid, generator=g2)
    assert torch.equal(r1.index, r2.index) and ((r1.index >= 0) & (r1.index < 5)).all()
    assert_close(r1.output, cand[torch.arange(4), r1.index], name="random")
    assert int(layer.hits.sum()) == 0  # generation never counts


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_guided_picks_the_scorers_minimum(chunk):
    layer, feats, resid, target = make(B=4, K=5)
    cand = ddn_candidates(feats, layer.weight.view(5, 3, -1), layer.bias.view(5, 3), resid).detach()
    goal = torch.randn(4, 3, 7, 9, dtype=D)
    calls = []

    def scorer(c):  # [B, m, Cout, H, W] -> [B, m]
        calls.append(c.shape[1])
        return (c - goal[:, None]).abs().flatten(2).mean(2)

    out = layer(feats, resid, scorer=scorer, chunk_size=chunk)
    want = (cand - goal[:, None]).abs().flatten(2).mean(2).argmin(1)
    assert torch.equal(out.index, want)
    assert max(calls) <= chunk and sum(calls) == 5
    assert_close(out.output, cand[torch.arange(4), want], name="guided output")


def test_guided_ties_go_to_the_smallest_index_across_chunks():
    layer, feats, resid, _ = make(B=2, K=5)
    out = layer(feats, resid, scorer=lambda c: torch.zeros(c.shape[:2], dtype=D), chunk_size=2)
    assert out.index.tolist() == [0, 0]


def test_guided_rejects_a_bad_scorer():
    layer, feats, resid, _ = make(B=2, K=5)
    with pytest.raises(ValueError, match="scorer must return a cost"):
        layer(feats, resid, scorer=lambda c: c.sum())
    with pytest.raises(ValueError, match="chunk_size"):
        layer(feats, resid, scorer=lambda c: c.flatten(2).sum(2), chunk_size=0)


def test_loss_helper_and_argument_errors():
    layer, feats, resid, target = make()
    out = layer(feats, resid, target=target)
    assert_close(layer.loss(out.output, target), (out.output - target).square().mean(), name="loss")
    with pytest.raises(ValueError, match="at most one of"):
        layer(feats, resid, target=target, index=out.index)
    with pytest.raises(ValueError, match="chain_dropout"):
        DiscreteDistributionLayer(2, 1, 3, chain_dropout=1.5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        DiscreteDistributionLayer(2, 1, 0)
    with pytest.raises(ValueError, match="Cin"):  # the op's own check names the argument
        layer(torch.randn(3, 7, 7, 9, dtype=D), resid, target=target)


def test_exported_from_fastcomp_nn():
    assert fastcomp.nn.DiscreteDistributionLayer is DiscreteDistributionLayer


@pytest.mark.gpu
def test_training_step_never_syncs_with_the_host():
    from fastcomp.ddn import SplitAndPrune

    layer = DiscreteDistributionLayer(8, 3, 16).cuda()
    sp = SplitAndPrune([layer], interval=1000)
    feats = torch.randn(4, 8, 8, 8, device="cuda")
    target = torch.randn(4, 3, 8, 8, device="cuda")
    layer(feats, target=target)  # warm-up: lazy initializations may sync once
    sp.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(feats, target=target)
        out.output.square().mean().backward()
        sp.step()  # not a check step: drains hits on the device only
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(sp.pending(0).sum()) == 8 and int(layer.hits.sum()) == 0
