"""The Discrete Distribution Layer (DDL) of Discrete Distribution Networks (Yang, ICLR 2025).

A DDL turns features h [B, Cin, H, W] into K candidate images through one 1x1 convolution and keeps one
per sample. The candidates are a learned residual on the previous layer's selection:

    candidate_k = weight[k] @ h + bias[k] + residual          # weight [K, Cout, Cin], bias [K, Cout]

Modes (all compute at most one candidate per sample except guided mode, which scores them in chunks):
- training/reconstruction (`target` given): the candidate nearest the target, via `fastcomp.ddn_select`;
- guided (`scorer` given): the candidate a black-box scorer likes best (zero-shot conditional generation);
- generation (`index` given, or nothing: uniform random indices): `fastcomp.ddn_gather`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.ddn import ddn_gather, ddn_select
from ..ops.ddn.reference import ddn_candidates

# scorer(candidates [B, n, Cout, H, W]) -> cost [B, n]; lower is better (a distance to the condition).
Scorer = Callable[[torch.Tensor], torch.Tensor]


class DDLOutput(NamedTuple):
    output: torch.Tensor  # [B, Cout, H, W], the kept candidate; differentiable
    index: torch.Tensor  # int64 [B], which candidate was kept
    distances: Optional[torch.Tensor]  # float32 [B, K] distance to the target (training mode), else None


class DiscreteDistributionLayer(nn.Module):
    """K candidates from a 1x1 conv as a residual on the previous selection; keeps one per sample.

    Args:
        in_channels: Cin of the features.
        out_channels: Cout of the candidates (the image channels).
        k: number of candidates K (the layer's output distribution has K atoms).
        bias: learn a per-candidate bias [K, Cout].
        chain_dropout: in training, with this probability per sample keep a uniformly random candidate
            instead of the nearest one (the paper's chain dropout: later layers see imperfect conditions,
            as they will in generation). Hit counts and `distances` still describe the nearest candidate.
        metric: "l2" or "l1", the distance used to pick the nearest candidate.
        backend: forwarded to fastcomp.ddn_select / ddn_gather (None: the fastest available).

    Parameters: `weight` [K * Cout, Cin] (a conv1x1 weight, viewed as [K, Cout, Cin]) and `bias` [K * Cout]
    (viewed as [K, Cout]). Buffer `hits` int64 [K]: how often each candidate was the nearest in training
    since it was last drained (fastcomp.ddn.SplitAndPrune drains it every step); updated on the device
    with no host sync. With `track_split_statistics()` (SplitAndPrune's sddn criterion turns it on) also
    `second_hits` and `distance_sum`, drained the same way.
    """

    def __init__(self, in_channels: int, out_channels: int, k: int, *, bias: bool = True,
                 chain_dropout: float = 0.0, metric: str = "l2", backend: Optional[str] = None,
                 init_scale: float = 1.0):
        super().__init__()
        if k < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(f"DiscreteDistributionLayer: in_channels, out_channels and k must be >= 1, got "
                             f"{in_channels}, {out_channels}, {k}")
        if not 0.0 <= chain_dropout <= 1.0:
            raise ValueError(f"DiscreteDistributionLayer: chain_dropout is a probability in [0, 1], "
                             f"got {chain_dropout}")
        if metric not in ("l2", "l1"):
            raise ValueError(f"DiscreteDistributionLayer: metric must be 'l2' or 'l1', got {metric!r}")
        self.in_channels, self.out_channels, self.k = in_channels, out_channels, k
        self.chain_dropout, self.metric, self.backend = chain_dropout, metric, backend
        self.weight = nn.Parameter(torch.empty(k * out_channels, in_channels))
        self.bias = nn.Parameter(torch.empty(k * out_channels)) if bias else None
        # int64: exact, and untouched by model.half() / .to(dtype), which cast floating buffers.
        self.register_buffer("hits", torch.zeros(k, dtype=torch.int64))
        self.reset_parameters(init_scale)

    def reset_parameters(self, init_scale: float = 1.0) -> None:
        # Each candidate is an independent conv1x1: fan-in init, so the K candidates start distinct.
        bound = init_scale / math.sqrt(self.in_channels)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, k={self.k}, bias={self.bias is not None}, "
                f"chain_dropout={self.chain_dropout}, metric={self.metric!r}")

    # --- views in the ops' layout ---------------------------------------------------------------------
    @property
    def weight_kco(self) -> torch.Tensor:  # [K, Cout, Cin]
        return self.weight.view(self.k, self.out_channels, self.in_channels)

    @property
    def bias_kc(self) -> Optional[torch.Tensor]:  # [K, Cout]
        return None if self.bias is None else self.bias.view(self.k, self.out_channels)

    # --- the modes ------------------------------------------------------------------------------------
    def forward(self, features: torch.Tensor, residual: Optional[torch.Tensor] = None, *,
                target: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None,
                scorer: Optional[Scorer] = None, chunk_size: int = 64,
                generator: Optional[torch.Generator] = None, train: Optional[bool] = None) -> DDLOutput:
        """features [B, Cin, H, W]; residual (the previous selection) [B, Cout, H, W] or None.

        Exactly one of `target` [B, Cout, H, W] (nearest candidate), `scorer` (guided) or `index` int64 [B]
        (given candidates) may be passed; none of them draws uniformly random indices (with `generator`).
        train (default: self.training) makes the target mode count hits and apply chain dropout.
        """
        given = [name for name, v in (("target", target), ("index", index), ("scorer", scorer)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"DiscreteDistributionLayer: pass at most one of target, index, scorer; got {given}")
        if target is not None:
            return self.select(features, target, residual, train=train)
        if scorer is not None:
            return self.guided(features, scorer, residual, chunk_size=chunk_size)
        if index is None:
            index = self.random_index(features.shape[0], features.device, generator)
        return DDLOutput(self.gather(features, index, residual), index, None)

    def select(self, features, target, residual=None, *, train: Optional[bool] = None) -> DDLOutput:
        """Keep the candidate nearest `target`; when `train` (default: self.training), count hits and
        apply chain dropout."""
        sel = ddn_select(features, self.weight_kco, target, bias=self.bias_kc, residual=residual,
                         metric=self.metric, backend=self.backend)
        output, index = sel.output, sel.index
        if self.training if train is None else train:
            self.record_selection(index, sel.distances)
            if self.chain_dropout > 0.0:
                B = index.shape[0]
                drop = torch.rand(B, device=index.device) < self.chain_dropout
                random_index = torch.randint(0, self.k, (B,), device=index.device)
                kept = torch.where(drop, random_index, index)
                # One extra candidate per sample; the nearest one's output is replaced where dropped.
                output = self.gather(features, kept, residual)
                index = kept
        return DDLOutput(output, index, sel.distances)

    @torch.no_grad()
    def record_selection(self, index: torch.Tensor, distances: torch.Tensor) -> None:
        """Count one training selection: index int64 [B] of the nearest candidates, distances [B, K].

        Adds to `hits`; with `track_split_statistics()` on, also counts each sample's second-nearest
        candidate in `second_hits` and adds the distances to `distance_sum` (what the sddn criterion of
        fastcomp.ddn.SplitAndPrune decides from). On the device, no host sync.
        """
        # index_add_ stays on the device: no host sync per step (bincount would read max(index)).
        self.hits.index_add_(0, index, torch.ones_like(index, dtype=self.hits.dtype))
        if not hasattr(self, "second_hits"):
            return
        distances = distances.detach()
        if self.k > 1:
            others = distances.to(torch.float64).scatter(1, index[:, None], float("inf"))
            second = others.argmin(dim=1)
            self.second_hits.index_add_(0, index * self.k + second, torch.ones_like(index))
        self.distance_sum.add_(distances.sum(dim=0, dtype=torch.float64).to(self.distance_sum.dtype))

    def track_split_statistics(self) -> None:
        """Also keep, per training step, sddn's Split-and-Prune statistics: `second_hits` int64 [K * K]
        (how often candidate j was the second-nearest of a sample nearest to i, at i * K + j) and
        `distance_sum` float64 [K]. Non-persistent buffers (they hold one step, drained by SplitAndPrune,
        whose criterion="sddn" turns this on); K * K int64 is 2 MiB at K = 512."""
        if hasattr(self, "second_hits"):
            return
        device = self.hits.device
        self.register_buffer("second_hits", torch.zeros(self.k * self.k, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("distance_sum", torch.zeros(self.k, dtype=torch.float64, device=device),
                             persistent=False)

    @classmethod
    def from_sddn(cls, module: nn.Module, *, backend: Optional[str] = None) -> "DiscreteDistributionLayer":
        """This layer from an sddn ``DiscreteDistributionOutput`` (the official DDN code, sddn 0.0.2):
        its candidate weights (sddn's 1x1 conv has no bias), its distance (l1 if ``module.l1_loss``, else
        l2) and its Split-and-Prune statistics, which a fastcomp.ddn.SplitAndPrune built on the layer
        continues from (``initial_split_statistics``: counts, second, distance_sum, seen).

        The layer takes the features sddn's conv reads: ``feat_last[:, :module.conv_inc]`` (all of
        ``feat_last`` unless the module leaks features), and the previous prediction as ``residual``
        (sddn's ``learn_residual``; zeros when there is none). Candidate k of the layer is candidate k of
        the module, so both select the same index for the same target (sddn first resizes the target to
        ``module.size`` when set: pass the layer a target at the features' resolution).
        """
        conv = getattr(module, "multi_out_conv1x1", None)
        if conv is None or not hasattr(module, "sdd") or not hasattr(module, "predict_c"):
            raise TypeError(f"DiscreteDistributionLayer.from_sddn: expected an sddn DiscreteDistributionOutput, "
                            f"got {type(module).__name__}")
        conv = getattr(conv, "conv1x1", conv)  # AdaptConv2d wraps the conv
        if getattr(module, "adapt_conv", 0):
            raise NotImplementedError("DiscreteDistributionLayer.from_sddn: sddn's adapt_conv (per-sample weight "
                                      "offsets from an SE branch) has no counterpart in the layer; use "
                                      "adapt_conv = 0")
        if not getattr(module, "learn_residual", True):
            raise NotImplementedError("DiscreteDistributionLayer.from_sddn: learn_residual = False is not "
                                      "supported; the layer's candidates are residuals on `residual`")
        distance = getattr(module, "distance_func", None) or getattr(module, "loss_func", None)
        metrics = {"mse_loss_multi_output": "l2", "l1_loss_multi_output": "l1"}
        if distance is None:
            metric = "l1" if getattr(module, "l1_loss", False) else "l2"
        elif getattr(distance, "__name__", None) in metrics:
            metric = metrics[distance.__name__]
        else:
            raise NotImplementedError(f"DiscreteDistributionLayer.from_sddn: the module selects with a custom "
                                      f"distance ({distance!r}); the layer has l2 (sddn's mse_loss_multi_output) "
                                      f"and l1 (l1_loss_multi_output)")
        K, Cout, Cin = module.k, module.predict_c, conv.in_channels
        weight = conv.weight.detach()
        layer = cls(Cin, Cout, K, bias=conv.bias is not None, metric=metric,
                    chain_dropout=float(getattr(module, "chain_dropout", 0.0)), backend=backend)
        layer.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight.reshape(K * Cout, Cin))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
        sdd = module.sdd
        stats = {"counts": sdd.count, "second": sdd.near2, "distance_sum": sdd.loss_acc}
        layer.initial_split_statistics = {name: torch.as_tensor(value, dtype=torch.float64).clone()
                                          for name, value in stats.items()}
        layer.initial_split_statistics["seen"] = float(sdd.iter)
        return layer.train(module.training)

    def gather(self, features, index, residual=None) -> torch.Tensor:
        """Only the given candidates: [B, Cout, H, W] = weight[index[b]] @ features[b] + bias + residual."""
        return ddn_gather(features, self.weight_kco, index, bias=self.bias_kc, residual=residual,
                          backend=self.backend)

    def random_index(self, batch: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Uniform indices int64 [batch] (the paper's unconditional generation)."""
        if generator is not None:
            return torch.randint(0, self.k, (batch,), generator=generator,
                                 device=generator.device).to(device)
        return torch.randint(0, self.k, (batch,), device=device)

    @torch.no_grad()
    def candidates(self, features, residual=None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Candidates start..stop-1, materialized: [B, stop - start, Cout, H, W] (guided sampling only)."""
        stop = self.k if stop is None else stop
        bias = None if self.bias is None else self.bias_kc[start:stop]
        return ddn_candidates(features, self.weight_kco[start:stop], bias, residual)

    def guided(self, features, scorer: Scorer, residual=None, *, chunk_size: int = 64) -> DDLOutput:
        """Keep the candidate with the lowest scorer cost. Candidates are materialized chunk_size at a
        time (peak memory B x chunk_size x Cout x H x W); the kept one is recomputed by ddn_gather so the
        output is differentiable like the other modes."""
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"DiscreteDistributionLayer: chunk_size must be an int >= 1, got {chunk_size!r}")
        B = features.shape[0]
        best_cost = torch.full((B,), float("inf"), device=features.device, dtype=torch.float64)
        best_index = torch.zeros(B, dtype=torch.int64, device=features.device)
        for start in range(0, self.k, chunk_size):
            stop = min(start + chunk_size, self.k)
            cost = scorer(self.candidates(features, residual, start, stop))
            if cost.shape != (B, stop - start):
                raise ValueError(f"DiscreteDistributionLayer: scorer must return a cost [B, n] = "
                                 f"[{B}, {stop - start}] for candidates [B, n, Cout, H, W]; got "
                                 f"{list(cost.shape)}")
            cost = cost.detach().to(torch.float64)
            chunk_best, chunk_arg = cost.min(dim=1)
            # Strict < keeps the earlier chunk on ties: the same smallest-k rule as ddn_select.
            better = chunk_best < best_cost
            best_cost = torch.where(better, chunk_best, best_cost)
            best_index = torch.where(better, chunk_arg + start, best_index)
        return DDLOutput(self.gather(features, best_index, residual), best_index, None)

    @staticmethod
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The DDN training loss of one layer: mean squared error of the kept candidate to the target."""
        return F.mse_loss(output, target)

    def hit_frequencies(self) -> torch.Tensor:
        """float64 [K]: hits / total (uniform if there are none yet)."""
        hits = self.hits.double()
        total = hits.sum()
        return torch.where(total > 0, hits / total.clamp_min(1), torch.full_like(hits, 1.0 / self.k))
