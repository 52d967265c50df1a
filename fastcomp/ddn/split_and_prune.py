"""Split-and-Prune (Yang, "Discrete Distribution Networks", ICLR 2025).

Every DDL node (candidate) should be the nearest one for about 1/K of the data. Nodes that are rarely hit
are dead weight; nodes hit far more often cover too much of the distribution. From the cumulative hit
counts p = counts / counts.sum(), when

    p_max - p_min > 1 / K    or    p_min < 0.5 / K

the most-hit node is split onto the least-hit one, which is pruned: the least-hit node's weight and bias
rows (and the optimizer's per-parameter state rows: Adam's exp_avg / exp_avg_sq, SGD's momentum) become
copies of the most-hit node's, and the two share the most-hit node's counts plus the pruned node's, so
the total count is conserved.
"""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn


def should_split(counts: torch.Tensor) -> bool:
    """The paper's criterion on cumulative hit counts [K] (any float dtype); False with no hits or K = 1."""
    K = counts.numel()
    total = float(counts.sum())
    if K < 2 or total <= 0:
        return False
    p = counts.double() / total
    p_max, p_min = float(p.max()), float(p.min())
    return (p_max - p_min > 1.0 / K) or (p_min < 0.5 / K)


class SplitAndPrune(nn.Module):
    """Keeps the hit frequencies of DDLs near 1/K by splitting the most-hit node onto the least-hit one.

    Call `.step()` once per training step, after `optimizer.step()` (and before the next forward). Every
    step it moves each layer's `hits` into a pending tally on the device (no host sync); every `interval`
    steps it sums the pending tallies over the ranks (torch.distributed all-reduce, when initialized), adds
    them to the cumulative counts, and applies the criterion up to `max_splits` times per layer. All ranks
    then hold the same counts and take the same decisions.

    Draining `hits` every step also keeps the counts right under DistributedDataParallel, which by default
    broadcasts rank 0's buffers (hits included) into every rank at each forward: after a drain they are
    zero everywhere, so the broadcast loses nothing. With several forwards per step (gradient
    accumulation) under DDP, call `.collect()` after each forward, or build DDP with
    broadcast_buffers=False.

    Args:
        layers: the DiscreteDistributionLayers to manage (e.g. `model.ddls`).
        optimizer: whose per-parameter state rows are copied along with the weights (or None).
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
    layer (float64 so the split can halve counts exactly).
    """

    def __init__(self, layers: Iterable[nn.Module], optimizer: Optional[torch.optim.Optimizer] = None, *,
                 interval: int = 1, max_splits: int = 1, perturb: float = 0.0, seed: int = 0):
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ValueError("SplitAndPrune: layers is empty; pass the model's DiscreteDistributionLayers")
        for i, layer in enumerate(layers):
            if not (hasattr(layer, "hits") and hasattr(layer, "weight") and hasattr(layer, "k")):
                raise TypeError(f"SplitAndPrune: layers[{i}] is a {type(layer).__name__}, expected a "
                                f"fastcomp.nn.DiscreteDistributionLayer (with weight, bias, hits, k)")
        if interval < 1 or max_splits < 1:
            raise ValueError(f"SplitAndPrune: interval and max_splits must be >= 1, got {interval}, {max_splits}")
        if perturb < 0:
            raise ValueError(f"SplitAndPrune: perturb is a relative noise level >= 0, got {perturb}")
        # A plain list: the layers belong to the model, not to this module's state_dict.
        self._layers: List[nn.Module] = layers
        self.optimizer = optimizer
        self.interval, self.max_splits, self.perturb, self.seed = interval, max_splits, perturb, seed
        # A Python int, not a buffer: step() reads it every step, and a CUDA scalar would sync each time.
        self.step_count = 0
        for i, layer in enumerate(layers):
            zeros = torch.zeros(layer.k, dtype=torch.float64, device=layer.hits.device)
            self.register_buffer(f"counts_{i}", zeros)
            self.register_buffer(f"pending_{i}", zeros.clone())
        self.history: List[tuple] = []  # (step, layer, split node, pruned node) of every split

    def get_extra_state(self):
        return {"step_count": self.step_count, "history": list(self.history)}

    def set_extra_state(self, state) -> None:
        self.step_count = int(state["step_count"])
        self.history = [tuple(h) for h in state["history"]]

    @property
    def layers(self) -> List[nn.Module]:
        return self._layers

    def counts(self, i: int) -> torch.Tensor:
        """float64 [K]: cumulative (all-reduced) hit counts of layer i."""
        return getattr(self, f"counts_{i}")

    def pending(self, i: int) -> torch.Tensor:
        return getattr(self, f"pending_{i}")

    @torch.no_grad()
    def collect(self) -> None:
        """Move every layer's `hits` into the pending tallies (on the device, no host sync)."""
        for i, layer in enumerate(self._layers):
            self.pending(i).add_(layer.hits.to(self.pending(i).device, torch.float64))
            layer.hits.zero_()

    def step(self) -> int:
        """Advance one training step; on check steps, split-and-prune. Returns the number of splits."""
        self.collect()
        self.step_count += 1
        if self.step_count % self.interval:
            return 0
        return self.check()

    @torch.no_grad()
    def accumulate(self) -> None:
        """Collect, sum the pending tallies over the ranks and add them to the cumulative counts."""
        self.collect()
        fresh = torch.cat([self.pending(i) for i in range(len(self._layers))])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(fresh, op=dist.ReduceOp.SUM)
        offset = 0
        for i, layer in enumerate(self._layers):
            self.counts(i).add_(fresh[offset:offset + layer.k])
            offset += layer.k
            self.pending(i).zero_()

    @torch.no_grad()
    def check(self) -> int:
        """Accumulate hits, then apply the criterion to every layer; returns the number of splits."""
        self.accumulate()
        splits = 0
        for i, layer in enumerate(self._layers):
            counts = self.counts(i)
            for _ in range(self.max_splits):
                if not should_split(counts):
                    break
                # argmax/argmin return the first extreme: a deterministic choice on every rank.
                src, dst = int(counts.argmax()), int(counts.argmin())
                if src == dst:
                    break
                self.split(i, src, dst)
                splits += 1
        return splits

    @torch.no_grad()
    def split(self, i: int, src: int, dst: int) -> None:
        """Copy node `src` of layer i onto node `dst` (weights, bias, optimizer state) and share counts."""
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
        # Both twins get half of the pair's counts: the total is conserved and neither twin is immediately
        # the least-hit node again.
        half = (counts[src] + counts[dst]) / 2
        counts[src] = half
        counts[dst] = half
        self.history.append((self.step_count, i, src, dst))

    def frequencies(self, i: int) -> torch.Tensor:
        """float64 [K]: cumulative hit frequencies of layer i."""
        c = self.counts(i)
        return c / c.sum().clamp_min(1)
