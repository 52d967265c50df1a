"""fastcomp.ddn.SplitAndPrune: criterion thresholds, split invariants, resume, and DDP (2 gloo processes)."""

from __future__ import annotations

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from fastcomp.ddn import SplitAndPrune, should_split
from fastcomp.nn import DiscreteDistributionLayer

from helpers import ddp_worker_env, run_spawned

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: see conftest.one_thread


# --- the criterion, exactly as stated: split when p_max - p_min > 1/K or p_min < 0.5/K ---------------
# The counts are chosen so that every frequency is a binary fraction: equalities are exact.
@pytest.mark.parametrize("counts,expected", [
    ([6, 4, 4, 2], False),   # p_max - p_min = 4/16 = 1/K exactly (not >), p_min = 2/16 = 0.5/K exactly (not <)
    ([7, 4, 3, 2], True),    # p_max - p_min = 5/16 > 1/K
    ([5, 5, 5, 1], True),    # p_max - p_min = 4/16 = 1/K, but p_min = 1/16 < 0.5/K
    ([4, 4, 4, 4], False),   # uniform
    ([0, 0, 0, 0], False),   # no hits yet: nothing to decide
    ([9], False),            # K = 1: nothing to split onto
    ([1, 1], False),
    ([3, 1], False),         # K = 2: gap 2/4 = 1/K exactly, p_min = 1/4 = 0.5/K exactly
    ([5, 3], False),         # gap 2/8 < 1/2; p_min = 3/8 > 1/4
    ([13, 3], True),         # p_min = 3/16 < 1/4
])
def test_criterion_thresholds(counts, expected):
    assert should_split(torch.tensor(counts, dtype=torch.float64)) is expected


def _layer_with_adam(K=4, Cout=2, Cin=3, seed=0):
    torch.manual_seed(seed)
    layer = DiscreteDistributionLayer(Cin, Cout, K)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    feats, target = torch.randn(6, Cin, 3, 5), torch.randn(6, Cout, 3, 5)
    out = layer(feats, target=target)
    out.output.square().mean().backward()
    # Make every row of the optimizer state distinct and non-zero.
    for p in layer.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    layer.hits.zero_()
    return layer, opt


# "range" conserves the counts (the twins share the pair's); sddn's bookkeeping, with no second-nearest
# statistics for the pruned node (hits set by hand), drops its one hit and halves the split node's.
@pytest.mark.parametrize("criterion, expected", [("range", [5.0, 5.0, 4.0, 3.0]), ("sddn", [4.5, 4.5, 4.0, 3.0])])
def test_split_copies_rows_and_optimizer_state_and_updates_counts(criterion, expected):
    K, Cout = 4, 2
    layer, opt = _layer_with_adam(K, Cout)
    sp = SplitAndPrune([layer], opt, criterion=criterion)
    before_w, before_b = layer.weight.detach().clone(), layer.bias.detach().clone()
    before_state = {id(p): {n: v.clone() for n, v in opt.state[p].items()} for p in layer.parameters()}
    layer.hits.copy_(torch.tensor([1, 9, 4, 3]))  # src = 1 (most hit), dst = 0 (least hit)
    assert sp.step() == 1
    assert sp.history == [(1, 0, 1, 0)]
    rows = lambda k: slice(k * Cout, (k + 1) * Cout)  # noqa: E731
    for p, before in ((layer.weight, before_w), (layer.bias, before_b)):
        assert torch.equal(p[rows(0)], before[rows(1)])  # the pruned node is now the split node's copy
        for k in (1, 2, 3):
            assert torch.equal(p[rows(k)], before[rows(k)])  # everything else untouched
        state = opt.state[p]
        for name in ("exp_avg", "exp_avg_sq"):
            old = before_state[id(p)][name]
            assert torch.equal(state[name][rows(0)], old[rows(1)])
            for k in (1, 2, 3):
                assert torch.equal(state[name][rows(k)], old[rows(k)])
        assert torch.equal(state["step"], before_state[id(p)]["step"])  # shared scalar state untouched
    assert sp.counts(0).tolist() == expected
    assert int(layer.hits.sum()) == 0  # drained


def test_no_split_when_balanced_and_interval():
    layer, opt = _layer_with_adam()
    sp = SplitAndPrune([layer], opt, interval=3)
    w = layer.weight.detach().clone()
    layer.hits.copy_(torch.tensor([1, 9, 4, 3]))
    assert sp.step() == 0 and sp.step() == 0  # not a check step: pending only
    assert sp.counts(0).sum().item() == 0 and sp.pending(0).sum().item() == 17
    assert sp.step() == 1  # step 3 checks
    sp2 = SplitAndPrune([layer], opt)
    layer.hits.copy_(torch.tensor([4, 4, 4, 4]))
    w = layer.weight.detach().clone()
    assert sp2.step() == 0 and torch.equal(layer.weight, w)


def test_max_splits_and_perturb():
    layer, opt = _layer_with_adam(K=6, Cout=1)
    sp = SplitAndPrune([layer], opt, criterion="range", max_splits=10, perturb=0.1)
    layer.hits.copy_(torch.tensor([40, 0, 0, 0, 0, 0]))
    n = sp.step()
    assert 1 < n <= 10
    assert sp.counts(0).sum().item() == 40.0
    src, dst = sp.history[0][2:]
    # Perturbed copy: close to the split row, but not identical.
    diff = (layer.weight[dst] - layer.weight[src]).abs().max().item()
    assert 0 < diff


def test_sgd_momentum_is_copied_too():
    layer = DiscreteDistributionLayer(3, 1, 3, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer.weight.grad = torch.randn_like(layer.weight)
    opt.step()
    buf = opt.state[layer.weight]["momentum_buffer"].clone()
    sp = SplitAndPrune([layer], opt)
    layer.hits.copy_(torch.tensor([0, 7, 1]))
    sp.step()
    assert torch.equal(opt.state[layer.weight]["momentum_buffer"][0], buf[1])


def _train(layer, opt, sp, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        feats = torch.randn(8, layer.in_channels, 3, 3, generator=gen)
        target = torch.randn(8, layer.out_channels, 3, 3, generator=gen) * 2 + 1
        opt.zero_grad()
        out = layer(feats, target=target)
        layer.loss(out.output, target).backward()
        opt.step()
        sp.step()


@pytest.mark.parametrize("criterion", ["sddn", "range"])
def test_state_dict_round_trip_gives_identical_subsequent_decisions(criterion):
    torch.manual_seed(0)
    layer = DiscreteDistributionLayer(4, 2, 6)
    opt = torch.optim.Adam(layer.parameters(), lr=5e-2)
    sp = SplitAndPrune([layer], opt, criterion=criterion, interval=2, perturb=0.05, seed=3)
    _train(layer, opt, sp, 4, seed=1)
    saved = copy.deepcopy((layer.state_dict(), opt.state_dict(), sp.state_dict()))
    assert {"_extra_state", "counts_0", "pending_0"} <= set(sp.state_dict())
    n_before = len(sp.history)
    _train(layer, opt, sp, 14, seed=2)
    continued = sp.history[n_before:]
    assert continued, "the test needs splits after the checkpoint"

    # A fresh process resumes from the checkpoint.
    torch.manual_seed(123)
    layer2 = DiscreteDistributionLayer(4, 2, 6)
    opt2 = torch.optim.Adam(layer2.parameters(), lr=5e-2)
    sp2 = SplitAndPrune([layer2], opt2, criterion=criterion, interval=2, perturb=0.05, seed=3)
    layer2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sp2.load_state_dict(saved[2])
    _train(layer2, opt2, sp2, 14, seed=2)
    assert sp2.history[n_before:] == continued and sp2.history == sp.history
    assert torch.equal(sp2.counts(0), sp.counts(0))
    assert torch.equal(layer2.weight, layer.weight)
    if criterion == "sddn":
        assert torch.equal(sp2.statistic("second", 0), sp.statistic("second", 0))


def test_rejects_non_ddl_layers():
    with pytest.raises(TypeError, match="DiscreteDistributionLayer"):
        SplitAndPrune([torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="empty"):
        SplitAndPrune([])


# --- DistributedDataParallel on 2 gloo CPU processes ---------------------------------------------------

def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    ddp_worker_env(rank, 2, port, set_rank_env=False)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        _ddp_steps(rank, out_dir)  # the DDP module dies in there, before its group: see tests/helpers.py
    finally:
        dist.destroy_process_group()


def _ddp_steps(rank: int, out_dir: str) -> None:
    torch.manual_seed(0)  # same initial weights on both ranks
    layer = DiscreteDistributionLayer(3, 1, 4)
    model = torch.nn.parallel.DistributedDataParallel(layer)  # default: broadcasts buffers each forward
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = SplitAndPrune([layer], opt, criterion="range", interval=2, perturb=0.05)
    # The sddn criterion on a second layer: its K x K statistics are all-reduced too.
    layer_sddn = DiscreteDistributionLayer(3, 1, 4)
    model_sddn = torch.nn.parallel.DistributedDataParallel(layer_sddn)
    opt_sddn = torch.optim.Adam(model_sddn.parameters(), lr=1e-2)
    sp_sddn = SplitAndPrune([layer_sddn], opt_sddn, interval=2, perturb=0.05)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    local = []  # this rank's nearest-candidate counts per step
    for _ in range(4):
        feats = torch.randn(5, 3, 2, 2, generator=gen)
        # Rank-dependent targets: the ranks' hit distributions differ.
        target = torch.randn(5, 1, 2, 2, generator=gen) + 3.0 * rank
        for m, o, s in ((model, opt, sp), (model_sddn, opt_sddn, sp_sddn)):
            o.zero_grad()
            out = m(feats, target=target)
            if s is sp:
                local.append(torch.bincount(out.index, minlength=4).double())
            out.output.square().mean().backward()
            o.step()
            s.step()
    torch.save({"local": local, "counts": sp.counts(0), "history": sp.history,
                "weight": layer.weight.detach(),
                "sddn": {"history": sp_sddn.history, "weight": layer_sddn.weight.detach(),
                         **{n: sp_sddn.statistic(n, 0) for n in ("counts", "second", "distance_sum", "seen")}}},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_gloo_processes_take_the_same_decision(tmp_path):
    def clean():
        for f in tmp_path.glob("rank*.pt"):
            f.unlink()

    run_spawned(_ddp_worker, (None, str(tmp_path)), on_retry=clean)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["history"] == r1["history"] and r0["history"], "both ranks split the same nodes"
    assert torch.equal(r0["counts"], r1["counts"])
    assert torch.equal(r0["weight"], r1["weight"])
    # Replay: at each check (steps 2 and 4) the counts gain both ranks' hits of the steps since the last
    # check, then the recorded splits share the pair's counts. DDP's per-forward buffer broadcast must not
    # have replaced rank 1's hits by rank 0's.
    assert not torch.equal(sum(r0["local"]), sum(r1["local"])), "the ranks should see different data"
    counts = torch.zeros(4, dtype=torch.float64)
    for check_step in (2, 4):
        counts += sum(r0["local"][check_step - 2:check_step]) + sum(r1["local"][check_step - 2:check_step])
        for step, _, src, dst in r0["history"]:
            if step == check_step:
                counts[src] = counts[dst] = (counts[src] + counts[dst]) / 2
    assert torch.equal(r0["counts"], counts)
    # sddn: the same decisions and statistics on both ranks, from both ranks' samples
    s0, s1 = r0["sddn"], r1["sddn"]
    assert s0["history"] == s1["history"]
    for name in ("counts", "second", "distance_sum", "seen", "weight"):
        assert torch.equal(s0[name], s1[name]), name
    assert s0["seen"].item() == 2 * 4 * 5
