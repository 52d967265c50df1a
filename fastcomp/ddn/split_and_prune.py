"""Split-and-Prune (Yang, "Discrete Distribution Networks", ICLR 2025).

Every DDL node (candidate) should be the nearest one for about 1/K of the data. Nodes that are rarely hit
are dead weight; nodes hit far more often cover too much of the distribution. From the cumulative hit
frequencies p = counts / counts.sum(), the most-hit node s is split onto the least-hit node d, which is
pruned: d's weight and bias rows (and the optimizer's per-parameter state rows: Adam's exp_avg /
exp_avg_sq, SGD's momentum) become copies of s's. Two criteria decide when:

- ``"sddn"`` (the default): the official DDN code's rule and bookkeeping (sddn 0.0.2,
  ``SplitableDiscreteDistribution.try_split`` / ``split``). Split when the total-variation estimate
  improves, ``|p_s / 2 - 1/K| * 2 + p_d < p_s - p_d``, or when ``p_d < 1 / (2K)``; among never-hit nodes
  d is the one with the largest accumulated distance. It also counts, per node, how often each other
  node was a sample's second-nearest candidate: on a split, the pruned node's hits and second-nearest
  statistics move to the nodes that were its samples' second choices, and the twins share the split
  node's. :func:`sddn_split_decision` and :func:`sddn_split_statistics` are that code, on tensors.
- ``"range"``: ``p_max - p_min > 1/K or p_min < 0.5/K`` (:func:`should_split`), the two twins sharing
  the pair's counts (the total is conserved).

The two tests agree in exact arithmetic (for p_s < 2/K sddn's reduces to p_s - p_d > 1/K, for p_s >= 2/K
to p_d < 1/K, which then implies p_s - p_d > 1/K). The rules differ in the node pruned among never-hit
ones and in the statistics a split leaves behind, which steer every later decision.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn


CRITERIA = ("sddn", "range")


def should_split(counts: torch.Tensor) -> bool:
    """The "range" criterion on cumulative hit counts [K] (any float dtype): p_max - p_min > 1/K or
    p_min < 0.5/K. False with no hits or K = 1."""
    K = counts.numel()
    total = float(counts.sum())
    if K < 2 or total <= 0:
        return False
    p = counts.double() / total
    p_max, p_min = float(p.max()), float(p.min())
    return (p_max - p_min > 1.0 / K) or (p_min < 0.5 / K)


def sddn_split_decision(counts: torch.Tensor, distance_sum: torch.Tensor) -> Optional[Tuple[int, int]]:
    """sddn's ``try_split`` decision: (split node, pruned node), or None to leave the layer alone.

    counts: float64 [K] cumulative hits; distance_sum: float64 [K] accumulated distance of every sample to
    every candidate (sddn's ``loss_acc``). The split node is the first most-hit one; the pruned node is the
    first least-hit one or, if it was never hit, the never-hit node with the largest accumulated distance.
    """
    K = counts.numel()
    total = float(counts.sum())
    if K < 2 or total <= 0:  # sddn: nothing seen yet
        return None
    src, dst = int(counts.argmax()), int(counts.argmin())  # first extremes, as numpy's argmax / argmin
    if float(counts[dst]) == 0:
        dst = int(((counts == 0) * distance_sum).argmax())
    p_s, p_d, p = float(counts[src]) / total, float(counts[dst]) / total, 1.0 / K
    # Total variation to the uniform 1/K, now (s over by p_s - p, d under by p - p_d, simplified by sddn
    # to p_s - p_d) and after the split (two twins at p_s / 2, d's own mass dropped).
    tv_now, tv_split = p_s - p_d, abs(p_s / 2 - p) * 2 + p_d
    if tv_split < tv_now or p_d < p / 2:
        return src, dst
    return None


@torch.no_grad()
def sddn_split_statistics(counts: torch.Tensor, second: torch.Tensor, distance_sum: torch.Tensor,
                          seen: float, src: int, dst: int) -> None:
    """sddn's ``split`` bookkeeping, in place: node ``src`` is split onto node ``dst``, which is pruned.

    counts float64 [K]; second float64 [K, K], second[i, j] = how often j was the second-nearest node of a
    sample whose nearest was i; distance_sum float64 [K]; seen: samples counted so far (K = 2 only).
    The pruned node's hits go to the nodes its samples chose second, in proportion, and its row and
    column of ``second`` to the nodes that chose it or that it chose; then the twins share the split
    node's hits, and its ``second`` row becomes the twins' mutual count. Operation for operation the
    numpy code of sddn 0.0.2, including its quirks (the K = 2 reset, a pruned node with no second-nearest
    statistics loses its hits, and where some row of ``second`` is empty, the pruned node's row of the
    redistribution weights is zeroed: sddn indexes with a scalar bool there).
    """
    K, s, d = counts.numel(), src, dst
    if K == 2:  # sddn: second-nearest counts carry no information for two nodes; reset them
        second.copy_(1 - torch.eye(2, dtype=second.dtype, device=second.device))
        second.mul_(seen / float(second.sum()))

    def weight_per_row() -> torch.Tensor:  # each row of `second` as a distribution
        w = second / second.sum(dim=1, keepdim=True)
        finite = torch.isfinite(w)
        w = torch.where(finite, w, torch.full_like(w, 1.0 / (K - 1)))
        if not bool(finite.all()):
            w[d] = 0
        return w

    near2_sum = float(second[d].sum())
    if near2_sum:
        second[d, d] = 0
        not_self_sum = float(second[d].sum())
        if not_self_sum:
            to = second[d] / not_self_sum
        else:
            to = torch.full_like(counts, 1.0 / (K - 1))
            to[d] = 0
        counts += counts[d] * to
        counts[d] = 0
        second += (near2_sum * to)[:, None] * weight_per_row()
        second += second[:, d:d + 1] * to[None]
        second[:, d] = 0
        second[d] = 0
    else:
        as_other = second[:, d:d + 1].clone()
        if float(as_other.sum()):
            second[:, d] = 0
            second += as_other * weight_per_row()
    half = counts[s] / 2
    counts[s] = half
    counts[d] = half
    old_row = second[s].sum()
    second[s] = 0
    second[d] = 0
    column = second[:, s] / 2
    second[:, s] = column
    second[:, d] = column
    second[s, d] = old_row / 2
    second[d, s] = old_row / 2
    distance_sum[d] = distance_sum[s]


# The statistics each criterion keeps per layer: (name here, the layer's per-step buffer it drains).
_STATISTICS = {"range": (("counts", "hits"),),
               "sddn": (("counts", "hits"), ("second", "second_hits"), ("distance_sum", "distance_sum"))}


class SplitAndPrune(nn.Module):
    """Keeps the hit frequencies of DDLs near 1/K by splitting the most-hit node onto the least-hit one.

    Call `.step()` once per training step, after `optimizer.step()` (and before the next forward). Every
    step it moves each layer's per-step statistics (`hits`, and for the sddn criterion `second_hits` and
    `distance_sum`) into pending tallies on the device (no host sync); every `interval` steps it sums the
    pending tallies over the ranks (torch.distributed all-reduce, when initialized), adds them to the
    cumulative statistics, and applies the criterion up to `max_splits` times per layer. All ranks then
    hold the same statistics and take the same decisions.

    Draining every step also keeps the counts right under DistributedDataParallel, which by default
    broadcasts rank 0's buffers (hits included) into every rank at each forward: after a drain they are
    zero everywhere, so the broadcast loses nothing. With several forwards per step (gradient
    accumulation) under DDP, call `.collect()` after each forward, or build DDP with
    broadcast_buffers=False.

    Args:
        layers: the DiscreteDistributionLayers to manage (e.g. `model.ddls`).
        optimizer: whose per-parameter state rows are copied along with the weights (or None).
        criterion: "sddn" (default: the official code's total-variation rule and its second-nearest
            bookkeeping; it turns on `layer.track_split_statistics()`, K x K counts per layer) or "range"
            (p_max - p_min > 1/K or p_min < 0.5/K); see the module docstring.
        interval: steps between checks; a check reads the counts on the host, so not every step on a GPU.
        max_splits: splits per layer per check.
        perturb: after a split the pruned node's copy gets this much Gaussian noise (relative to the RMS
            of the copied rows) so the twins can start to specialize: with exact copies the nearest-candidate
            tie always goes to the smaller index and the other twin would never be hit. 0 copies exactly.
            The noise comes from a generator seeded by (seed, step, layer), identical on every rank.
        seed: base seed of that noise.

    State (in `state_dict()`, so a resumed run decides exactly as an uninterrupted one): `step_count` and
    `history` (as the module's extra state: plain Python, so reading them never syncs with a device), the
    cumulative `counts_<i>` float64 [K_i] and the not yet all-reduced `pending_<i>` float64 [K_i] of every
    layer (float64 so the split can halve counts exactly); for "sddn" also `second_<i>` [K_i, K_i],
    `distance_sum_<i>` [K_i], their `pending_second_<i>` / `pending_distance_sum_<i>`, and `seen_<i>` (the
    samples counted). A layer made by `DiscreteDistributionLayer.from_sddn` starts from the statistics
    of the sddn module it came from.
    """

    def __init__(self, layers: Iterable[nn.Module], optimizer: Optional[torch.optim.Optimizer] = None, *,
                 criterion: str = "sddn", interval: int = 1, max_splits: int = 1, perturb: float = 0.0,
                 seed: int = 0):
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ValueError("SplitAndPrune: layers is empty; pass the model's DiscreteDistributionLayers")
        for i, layer in enumerate(layers):
            if not (hasattr(layer, "hits") and hasattr(layer, "weight") and hasattr(layer, "k")):
                raise TypeError(f"SplitAndPrune: layers[{i}] is a {type(layer).__name__}, expected a "
                                f"fastcomp.nn.DiscreteDistributionLayer (with weight, bias, hits, k)")
        if criterion not in CRITERIA:
            raise ValueError(f"SplitAndPrune: criterion must be one of {CRITERIA}, got {criterion!r}")
        if interval < 1 or max_splits < 1:
            raise ValueError(f"SplitAndPrune: interval and max_splits must be >= 1, got {interval}, {max_splits}")
        if perturb < 0:
            raise ValueError(f"SplitAndPrune: perturb is a relative noise level >= 0, got {perturb}")
        # A plain list: the layers belong to the model, not to this module's state_dict.
        self._layers: List[nn.Module] = layers
        self.optimizer, self.criterion = optimizer, criterion
        self.interval, self.max_splits, self.perturb, self.seed = interval, max_splits, perturb, seed
        # A Python int, not a buffer: step() reads it every step, and a CUDA scalar would sync each time.
        self.step_count = 0
        for i, layer in enumerate(layers):
            if criterion == "sddn":
                layer.track_split_statistics()
            device, K = layer.hits.device, layer.k
            shapes = {"counts": (K,), "second": (K, K), "distance_sum": (K,)}
            for stat, _ in _STATISTICS[criterion]:
                zeros = torch.zeros(shapes[stat], dtype=torch.float64, device=device)
                self.register_buffer(f"{stat}_{i}", zeros)
                self.register_buffer(self._pending_name(stat, i), zeros.clone())
            if criterion == "sddn":
                self.register_buffer(f"seen_{i}", torch.zeros((), dtype=torch.float64, device=device))
            initial = getattr(layer, "initial_split_statistics", None)
            if initial is not None:  # a layer converted from sddn: continue from its statistics
                for stat, _ in _STATISTICS[criterion]:
                    self.statistic(stat, i).copy_(initial[stat])
                if criterion == "sddn":
                    self.statistic("seen", i).fill_(float(initial["seen"]))
        self.history: List[tuple] = []  # (step, layer, split node, pruned node) of every split

    @staticmethod
    def _pending_name(stat: str, i: int) -> str:
        return f"pending_{i}" if stat == "counts" else f"pending_{stat}_{i}"

    def get_extra_state(self):
        return {"step_count": self.step_count, "history": list(self.history)}

    def set_extra_state(self, state) -> None:
        self.step_count = int(state["step_count"])
        self.history = [tuple(h) for h in state["history"]]

    @property
    def layers(self) -> List[nn.Module]:
        return self._layers

    def statistic(self, name: str, i: int) -> torch.Tensor:
        """Cumulative (all-reduced) statistic of layer i: "counts" float64 [K]; for the sddn criterion also
        "second" [K, K] (second[a, b]: samples nearest to a with b second), "distance_sum" [K], "seen" []."""
        return getattr(self, f"{name}_{i}")

    def counts(self, i: int) -> torch.Tensor:
        """float64 [K]: cumulative (all-reduced) hit counts of layer i."""
        return self.statistic("counts", i)

    def pending(self, i: int, name: str = "counts") -> torch.Tensor:
        return getattr(self, self._pending_name(name, i))

    @torch.no_grad()
    def collect(self) -> None:
        """Move every layer's per-step statistics into the pending tallies (on the device, no host sync)."""
        for i, layer in enumerate(self._layers):
            for stat, source in _STATISTICS[self.criterion]:
                pending, buffer = self.pending(i, stat), getattr(layer, source)
                pending.add_(buffer.view(pending.shape).to(pending.device, torch.float64))
                buffer.zero_()

    def step(self) -> int:
        """Advance one training step; on check steps, split-and-prune. Returns the number of splits."""
        self.collect()
        self.step_count += 1
        if self.step_count % self.interval:
            return 0
        return self.check()

    @torch.no_grad()
    def accumulate(self) -> None:
        """Collect, sum the pending tallies over the ranks and add them to the cumulative statistics."""
        self.collect()
        pendings = [self.pending(i, stat) for i in range(len(self._layers)) for stat, _ in _STATISTICS[self.criterion]]
        fresh = torch.cat([p.flatten() for p in pendings])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(fresh, op=dist.ReduceOp.SUM)
        offset = 0
        for i in range(len(self._layers)):
            for stat, _ in _STATISTICS[self.criterion]:
                total = self.statistic(stat, i)
                part = fresh[offset:offset + total.numel()].view(total.shape)
                offset += total.numel()
                total.add_(part)
                if stat == "counts" and self.criterion == "sddn":
                    self.statistic("seen", i).add_(part.sum())
                self.pending(i, stat).zero_()

    def decision(self, i: int) -> Optional[Tuple[int, int]]:
        """(split node, pruned node) that the criterion picks for layer i now, or None."""
        counts = self.counts(i)
        if self.criterion == "sddn":
            return sddn_split_decision(counts, self.statistic("distance_sum", i))
        if not should_split(counts):
            return None
        # argmax/argmin return the first extreme: a deterministic choice on every rank.
        src, dst = int(counts.argmax()), int(counts.argmin())
        return None if src == dst else (src, dst)

    @torch.no_grad()
    def check(self) -> int:
        """Accumulate the statistics, then apply the criterion to every layer; returns the number of splits."""
        self.accumulate()
        splits = 0
        for i in range(len(self._layers)):
            for _ in range(self.max_splits):
                chosen = self.decision(i)
                if chosen is None:
                    break
                self.split(i, *chosen)
                splits += 1
        return splits

    @torch.no_grad()
    def split(self, i: int, src: int, dst: int) -> None:
        """Copy node `src` of layer i onto node `dst` (weights, bias, optimizer state) and update the
        statistics as the criterion does."""
        layer = self._layers[i]
        cout = layer.out_channels
        rows_src, rows_dst = slice(src * cout, (src + 1) * cout), slice(dst * cout, (dst + 1) * cout)
        params = [p for p in (layer.weight, layer.bias) if p is not None]
        noise_gen = None
        if self.perturb > 0:
            noise_gen = torch.Generator(device="cpu")
            noise_gen.manual_seed((self.seed * 1_000_003 + self.step_count) * 1009 + i)
        for p in params:
            p[rows_dst] = p[rows_src]
            if noise_gen is not None:
                rms = p[rows_src].double().square().mean().sqrt().item()
                noise = torch.randn(p[rows_dst].shape, generator=noise_gen, dtype=torch.float64)
                p[rows_dst] += (self.perturb * rms * noise).to(p.dtype).to(p.device)
            if self.optimizer is not None:
                for value in self.optimizer.state.get(p, {}).values():
                    # Per-parameter state shaped like the parameter (moments, momentum) holds per-row
                    # statistics; scalars such as Adam's `step` are shared by all rows.
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        value[rows_dst] = value[rows_src]
        counts = self.counts(i)
        if self.criterion == "sddn":
            sddn_split_statistics(counts, self.statistic("second", i), self.statistic("distance_sum", i),
                                  float(self.statistic("seen", i)), src, dst)
        else:
            # Both twins get half of the pair's counts: the total is conserved and neither twin is
            # immediately the least-hit node again.
            half = (counts[src] + counts[dst]) / 2
            counts[src] = half
            counts[dst] = half
        self.history.append((self.step_count, i, src, dst))

    def frequencies(self, i: int) -> torch.Tensor:
        """float64 [K]: cumulative hit frequencies of layer i."""
        c = self.counts(i)
        return c / c.sum().clamp_min(1)
