"""fastcomp against the official DDN code (the installed sddn 0.0.2): SplitAndPrune(criterion="sddn") takes
every decision sddn's SplitableDiscreteDistribution takes on the same distance matrices and keeps the
same statistics; DiscreteDistributionLayer.from_sddn selects the candidates sddn's
DiscreteDistributionOutput selects, and Split-and-Prune continues from its statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastcomp
from fastcomp.ddn import SplitAndPrune
from fastcomp.nn import DiscreteDistributionLayer
from helpers import assert_close

sddn = pytest.importorskip("sddn", reason="sddn is not installed: `pip install sddn==0.0.2 boxx`")

pytestmark = [pytest.mark.usefixtures("one_thread"),  # tiny tensors: see conftest.one_thread
              # sddn divides empty rows of its second-nearest counts by zero, on purpose (then replaces them)
              pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")]


def _distance_matrices(steps: int, B: int, K: int, seed: int):
    """Random [B, K] distances skewed towards the first candidates (sddn's own test), so nodes die and
    splits happen; float64 so both sides see the same numbers."""
    rng = np.random.default_rng(seed)
    skew = np.linspace(0.59, 1.1, K)[None] ** 10
    return [rng.random((B, K)) * skew for _ in range(steps)]


def _assert_same_statistics(sp: SplitAndPrune, sdd, where: str, rtol: float = 1e-12) -> None:
    for name, theirs in (("counts", sdd.count), ("second", sdd.near2), ("distance_sum", sdd.loss_acc)):
        ours = sp.statistic(name, 0).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=1e-9, err_msg=f"{name} {where}")
    assert sp.statistic("seen", 0).item() == sdd.iter


@pytest.mark.parametrize("K, B, steps", [(5, 16, 120), (8, 1, 80), (2, 4, 40)])
def test_split_and_prune_takes_every_sddn_decision(K, B, steps):
    """K = 8 with one sample a step leaves nodes never hit (the pruned node is chosen by accumulated
    distance, and nodes with empty second-nearest rows take sddn's scalar-bool indexing); K = 2 takes
    sddn's reset of the second-nearest statistics."""
    layer = DiscreteDistributionLayer(2, 1, K)
    sp = SplitAndPrune([layer], criterion="sddn")
    sdd = sddn.SplitableDiscreteDistribution(K)
    splits = 0
    for step, dm in enumerate(_distance_matrices(steps, B, K, seed=K)):
        sdd.add_loss_matrix(dm)
        theirs = sdd.try_split()
        d = torch.from_numpy(dm)
        layer.record_selection(d.argmin(dim=1), d)
        before = len(sp.history)
        sp.step()
        ours = sp.history[before:]
        if theirs is None:
            assert not ours, f"step {step}: fastcomp split {ours}, sddn did not"
        else:
            assert [(s, dd) for _, _, s, dd in ours] == [(theirs["i_split"], theirs["i_disapear"])], f"step {step}"
            splits += 1
        _assert_same_statistics(sp, sdd, f"after step {step}")
    assert splits >= 3, "the sequence should exercise several splits"


def test_sddn_and_range_differ_in_the_pruned_node_and_the_bookkeeping_not_the_predicate():
    """In exact arithmetic sddn's total-variation test is the range test: for p_s < 2/K it reduces to
    p_s - p_d > 1/K, for p_s >= 2/K to p_d < 1/K, which then implies p_s - p_d > 1/K. The rules differ in
    the node they prune among never-hit ones and in the statistics a split leaves (compared with sddn
    above), which steer the later decisions."""
    from fastcomp.ddn import sddn_split_decision, should_split

    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        K = int(torch.randint(2, 9, (1,), generator=gen))
        counts = torch.randint(1, 40, (K,), generator=gen).double()
        assert should_split(counts) == (sddn_split_decision(counts, torch.zeros(K)) is not None), counts
    counts = torch.tensor([8.0, 8.0, 8.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    distance_sum = torch.tensor([1.0, 1, 1, 1, 2, 3], dtype=torch.float64)
    assert sddn_split_decision(counts, distance_sum) == (0, 5)  # the never-hit node farthest from the data
    assert should_split(counts) and int(counts.argmin()) == 4  # range: the first least-hit node


@pytest.mark.parametrize("leak", [False, True])
def test_from_sddn_selects_the_same_candidates_and_continues_its_statistics(leak):
    torch.manual_seed(0)
    K, C, feat_c = 6, 3, 8
    module = sddn.DiscreteDistributionOutput(k=K, last_c=feat_c, predict_c=C, leak_choice=leak)
    module.train()
    batches = [(torch.randn(5, feat_c, 5, 7), torch.randn(5, C, 5, 7), torch.randn(5, C, 5, 7))
               for _ in range(6)]
    for feat, prev, target in batches[:4]:  # sddn trains a little: statistics to carry over
        module({"feat_last": feat, "predict": prev, "target": target})

    layer = DiscreteDistributionLayer.from_sddn(module)
    assert (layer.in_channels, layer.out_channels, layer.k, layer.bias) == (module.conv_inc, C, K, None)
    assert layer.training
    sp = SplitAndPrune([layer])
    np.testing.assert_array_equal(sp.counts(0).numpy(), module.sdd.count)
    for feat, prev, target in batches[4:]:
        d = module({"feat_last": feat, "predict": prev, "target": target})
        theirs = module.sdd.try_split()
        if theirs is not None:  # what module.try_split() does with the decision: copy the weights
            module.multi_out_conv1x1.split((theirs["i_split"], theirs["i_disapear"]), C)
        out = layer(feat[:, :module.conv_inc], prev, target=target)
        # sddn's choice is d["predict"] = outputs[range(b), i_nears]; recover its index from the candidates
        cands = layer.candidates(feat[:, :module.conv_inc], prev)
        their_index = (cands - d["predict"][:, None]).abs().flatten(2).amax(2).argmin(1)
        assert torch.equal(out.index, their_index)
        assert_close(out.output, d["predict"], ratio=1e-5, name="selected candidate")
        before = len(sp.history)
        sp.step()
        ours = [(s, dd) for _, _, s, dd in sp.history[before:]]
        assert ours == ([] if theirs is None else [(theirs["i_split"], theirs["i_disapear"])])
        # sddn sums its float32 distances in float32, fastcomp in float64
        _assert_same_statistics(sp, module.sdd, "after a step", rtol=1e-6)

    # eval mode: the nearest candidate, no statistics (sddn: distance_matrix.argmin)
    module.eval()
    layer.eval()
    feat, prev, target = batches[0]
    d = module({"feat_last": feat, "predict": prev, "target": target})
    out = layer(feat[:, :module.conv_inc], prev, target=target)
    assert torch.equal(out.index, torch.as_tensor(d["idx_ks"][0]))
    assert_close(out.output, d["predict"], ratio=1e-5, name="eval selection")


def test_from_sddn_refuses_what_it_cannot_convert():
    with pytest.raises(TypeError, match="DiscreteDistributionOutput"):
        DiscreteDistributionLayer.from_sddn(torch.nn.Conv2d(3, 3, 1))
    module = sddn.DiscreteDistributionOutput(k=4, last_c=8, predict_c=3, leak_choice=False,
                                             distance_func=lambda a, b: (a - b[:, None]).abs().amax((-1, -2, -3)))
    with pytest.raises(NotImplementedError, match="custom"):
        DiscreteDistributionLayer.from_sddn(module)


def test_bench_peer_computes_ddn_select():
    """The `fastcomp bench` sddn provider must do ddn_select's work, or the ratio compares different things."""
    from fastcomp.bench import cases

    torch.manual_seed(0)
    K, Cout, Cin = 7, 3, 5
    f, r, t = torch.randn(4, Cin, 5, 6), torch.randn(4, Cout, 5, 6), torch.randn(4, Cout, 5, 6)
    w, b = torch.randn(K, Cout, Cin, requires_grad=True), torch.randn(K, Cout, requires_grad=True)
    module = sddn.DiscreteDistributionOutput(k=K, last_c=Cin, predict_c=Cout, leak_choice=False).train()
    out = cases.sddn_select(module, f, w, t, b, r)
    ref = fastcomp.ddn_select(f, w, t, bias=b, residual=r, backend="reference")
    assert_close(out, ref.output, name="sddn peer output")
    assert torch.equal(torch.as_tensor(module.sdd.count), torch.bincount(ref.index, minlength=K).double())
    gw, gb = torch.autograd.grad(out.square().sum(), [w, b])
    rw, rb = torch.autograd.grad(ref.output.square().sum(), [w, b])
    assert_close(gw, rw, name="d/dweight")
    assert_close(gb, rb, name="d/dbias")
