"""A small Discrete Distribution Network (Yang, ICLR 2025): a coarse-to-fine single-shot generator.

L Discrete Distribution Layers are spread over stages of doubling resolution. Before each DDL a small
conv block updates the trunk features h from (h, previous selection); the DDL emits K candidates as a
residual on the previous selection and keeps one. Between stages h and the selection are upsampled.

    h_0 = learned constant [1, width, r_0, r_0];  x_0 = 0 [B, C, r_0, r_0]
    for l in 1..L:   (upsample h, x_{l-1} when the resolution doubles)
        h_l = block_l(h_{l-1}, x_{l-1})
        x_l = candidate_{i_l} of DDL_l(h_l, residual=x_{l-1}),  i_l in [0, K)
    image = x_L;  latent = (i_1, ..., i_L)  (L * log2(K) bits)

How i_l is chosen is the only difference between the modes: nearest to the target resized to the
layer's resolution (training, reconstruct, encode), given (decode), uniform (sample), or lowest cost of a
black-box scorer (guided_sample: zero-shot conditional generation; the only place candidates are
materialized, in chunks).
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.ddl import DDLOutput, DiscreteDistributionLayer


class DDNOutput(NamedTuple):
    output: torch.Tensor  # [B, C, H, W], the final selection
    latent: torch.Tensor  # int64 [B, L], the kept candidate of every layer
    loss: Optional[torch.Tensor]  # scalar: mean over layers of the per-layer MSE (with a target), else None


class DDNBlock(nn.Module):
    """Residual conv block conditioned on the previous selection: h + conv(act(norm(conv([h, x]))))."""

    def __init__(self, width: int, channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(width + channels, width, 3, padding=1)
        self.norm = nn.GroupNorm(min(8, width), width)
        self.conv_out = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """h [B, width, r, r], x [B, C, r, r] -> [B, width, r, r]."""
        y = self.conv_in(torch.cat([h, x], dim=1))
        return h + self.conv_out(F.silu(self.norm(y)))


def _resize_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Area-downsample (exact average over cells when sizes divide) or bilinear-upsample to size x size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] > size:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class DDN(nn.Module):
    """A coarse-to-fine DDN generator.

    Args:
        channels: image channels C.
        image_size: side of the (square) images.
        k: candidates per layer K.
        resolutions: the stage resolutions, increasing, ending at image_size (default: 2, 4, ..., image_size).
        layers_per_stage: DDLs per stage (an int for all stages, or one per stage).
        width: trunk channels.
        chain_dropout: the DDLs' chain dropout (training only).
        backend: backend of fastcomp.ddn_select / ddn_gather (None: the fastest).
    """

    def __init__(self, channels: int = 1, image_size: int = 16, k: int = 64, *,
                 resolutions: Optional[Sequence[int]] = None, layers_per_stage: Union[int, Sequence[int]] = 2,
                 width: int = 32, chain_dropout: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        if resolutions is None:
            resolutions, r = [], 2
            while r < image_size:
                resolutions.append(r)
                r *= 2
            resolutions.append(image_size)
        resolutions = [int(r) for r in resolutions]
        if resolutions[-1] != image_size or any(a >= b for a, b in zip(resolutions, resolutions[1:])):
            raise ValueError(f"DDN: resolutions must increase and end at image_size={image_size}, "
                             f"got {resolutions}")
        if isinstance(layers_per_stage, int):
            layers_per_stage = [layers_per_stage] * len(resolutions)
        if len(layers_per_stage) != len(resolutions) or min(layers_per_stage) < 1:
            raise ValueError(f"DDN: layers_per_stage needs one count >= 1 per resolution {resolutions}, "
                             f"got {list(layers_per_stage)}")
        self.channels, self.image_size, self.k = channels, image_size, k
        # The resolution every layer works at: [L].
        self.layer_resolutions: List[int] = [r for r, n in zip(resolutions, layers_per_stage) for _ in range(n)]
        self.h0 = nn.Parameter(torch.randn(1, width, resolutions[0], resolutions[0]) * 0.1)
        self.blocks = nn.ModuleList(DDNBlock(width, channels) for _ in self.layer_resolutions)
        # Small initial candidates: early in training the residual chain should not diverge from the target.
        self.ddls = nn.ModuleList(
            DiscreteDistributionLayer(width, channels, k, chain_dropout=chain_dropout, backend=backend,
                                      init_scale=0.5)
            for _ in self.layer_resolutions)

    @property
    def num_layers(self) -> int:
        return len(self.layer_resolutions)

    def _run(self, batch: int, pick: Callable[[int, DiscreteDistributionLayer, torch.Tensor, torch.Tensor],
                                             DDLOutput]):
        """The generator loop; pick(l, ddl, h, prev) chooses layer l's candidate. Returns the per-layer
        DDLOutputs."""
        r0 = self.layer_resolutions[0]
        h = self.h0.expand(batch, -1, -1, -1)
        prev = self.h0.new_zeros(batch, self.channels, r0, r0)
        selections = []
        for l, (res, block, ddl) in enumerate(zip(self.layer_resolutions, self.blocks, self.ddls)):
            if h.shape[-1] != res:
                h = F.interpolate(h, size=(res, res), mode="nearest")
                prev = _resize_to(prev, res)
            # The previous selection enters detached: each layer's candidates are trained only by their own
            # layer's loss (only the kept candidate gets a gradient); the trunk h gets every layer's.
            prev = prev.detach()
            h = block(h, prev)
            sel = pick(l, ddl, h, prev)
            selections.append(sel)
            prev = sel.output
        return selections

    def targets(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The per-layer targets: x area-downsampled to each layer's resolution."""
        return [_resize_to(x, r) for r in self.layer_resolutions]

    def _check_images(self, x: torch.Tensor, name: str = "x") -> None:
        want = (self.channels, self.image_size, self.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DDN: {name} must be images [B, {want[0]}, {want[1]}, {want[2]}], got {got}")

    def forward(self, x: torch.Tensor, *, train: Optional[bool] = None) -> DDNOutput:
        """Nearest-candidate pass over images x [B, C, H, W] with the training loss.

        train (default: self.training) counts hits and applies chain dropout."""
        self._check_images(x)
        targets = self.targets(x)
        sels = self._run(x.shape[0], lambda l, ddl, h, prev: ddl.select(h, targets[l], prev, train=train))
        loss = torch.stack([DiscreteDistributionLayer.loss(s.output, t) for s, t in zip(sels, targets)]).mean()
        return DDNOutput(sels[-1].output, torch.stack([s.index for s in sels], dim=1), loss)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """The training loss: mean over layers of MSE(kept candidate, target at that resolution)."""
        return self(x).loss

    def training_step(self, x: torch.Tensor, optimizer: torch.optim.Optimizer, split_and_prune=None) -> torch.Tensor:
        """One optimizer step on images x; then split_and_prune.step() if given. Returns the loss (detached,
        still on the device: no host sync)."""
        self.train()
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x)
        loss.backward()
        optimizer.step()
        if split_and_prune is not None:
            split_and_prune.step()
        return loss.detach()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the generator's closest reconstruction (no hit counting, no dropout)."""
        return self(x, train=False).output

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> latent int64 [B, L]."""
        return self(x, train=False).latent

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent int64 [B, L] -> images [B, C, H, W]; only the chosen candidates are computed."""
        if not isinstance(latent, torch.Tensor) or latent.dim() != 2 or latent.shape[1] != self.num_layers:
            got = list(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise ValueError(f"DDN.decode: latent must be int64 [B, L={self.num_layers}], got {got}")
        latent = latent.to(self.h0.device)
        return self._run(latent.shape[0], lambda l, ddl, h, prev: ddl(h, prev, index=latent[:, l]))[-1].output

    @torch.no_grad()
    def sample(self, n: int, *, generator: Optional[torch.Generator] = None,
               return_latent: bool = False):
        """n unconditional samples [n, C, H, W] (uniform indices at every layer)."""
        sels = self._run(n, lambda l, ddl, h, prev: ddl(h, prev, generator=generator))
        out = sels[-1].output
        return (out, torch.stack([s.index for s in sels], dim=1)) if return_latent else out

    @torch.no_grad()
    def guided_sample(self, n: int, scorer: Callable[[torch.Tensor], torch.Tensor], *, chunk_size: int = 64,
                      return_latent: bool = False):
        """Zero-shot conditional generation: at every layer keep the candidate of lowest scorer cost.

        scorer(candidates [n, m, C, r, r]) -> cost [n, m] (lower is better), called at every layer's
        resolution r with chunks of m <= chunk_size candidates; see SuperResolutionScorer,
        InpaintingScorer, ColorHintScorer. Returns images [n, C, H, W] (and latent [n, L])."""
        sels = self._run(n, lambda l, ddl, h, prev: ddl(h, prev, scorer=scorer, chunk_size=chunk_size))
        out = sels[-1].output
        return (out, torch.stack([s.index for s in sels], dim=1)) if return_latent else out


# --- black-box scorers for guided sampling --------------------------------------------------------------
# Each maps candidates [B, m, C, r, r] at any layer resolution r to a cost [B, m], lower is better. They
# compare at the coarser of the candidate's and the condition's resolution, by area averaging.


def _flat_resize(cand: torch.Tensor, size: int) -> torch.Tensor:
    B, m = cand.shape[:2]
    return _resize_to(cand.flatten(0, 1), size).unflatten(0, (B, m))


class SuperResolutionScorer:
    """Cost = MSE between the candidate and a low-resolution image low_res [B, C, h, h] at the coarser of
    the two resolutions (the candidate area-downsampled to h, or low_res to the candidate's size)."""

    def __init__(self, low_res: torch.Tensor):
        self.low_res = low_res

    def __call__(self, cand: torch.Tensor) -> torch.Tensor:
        r, h = cand.shape[-1], self.low_res.shape[-1]
        size = min(r, h)
        c = _flat_resize(cand, size)
        ref = _resize_to(self.low_res.to(cand.dtype), size)[:, None]
        return (c - ref).square().flatten(2).mean(dim=2)


class InpaintingScorer:
    """Cost = MSE over the known pixels: image [B, C, H, W], known [B, 1 or C, H, W] (bool or 0/1).

    At a coarser resolution each cell counts with the fraction of its pixels that are known, and is
    compared with the mean of its known pixels."""

    def __init__(self, image: torch.Tensor, known: torch.Tensor):
        self.known = known.to(image.dtype)
        self.image = image * self.known

    def __call__(self, cand: torch.Tensor) -> torch.Tensor:
        r = cand.shape[-1]
        w = _resize_to(self.known.to(cand.dtype), r)  # [B, 1|C, r, r], fraction known per cell
        ref = _resize_to(self.image.to(cand.dtype), r) / w.clamp_min(1e-6)
        w = w.expand(-1, cand.shape[2], -1, -1)[:, None]
        err = (w * (cand - ref[:, None]).square()).flatten(2).sum(dim=2)
        return err / w.flatten(2).sum(dim=2).clamp_min(1e-6)


class ColorHintScorer:
    """Cost = squared distance between the candidate's mean colour over a region and a hint colour.

    color [B, C]; region [B, 1, H, W] (bool or weights) or None for the whole image."""

    def __init__(self, color: torch.Tensor, region: Optional[torch.Tensor] = None):
        self.color, self.region = color, region

    def __call__(self, cand: torch.Tensor) -> torch.Tensor:
        r = cand.shape[-1]
        if self.region is None:
            mean = cand.flatten(3).mean(dim=3)  # [B, m, C]
        else:
            w = _resize_to(self.region.to(cand.dtype), r)[:, None]  # [B, 1, 1, r, r]
            mean = (w * cand).flatten(3).sum(dim=3) / w.flatten(3).sum(dim=3).clamp_min(1e-6)
        return (mean - self.color.to(cand.dtype)[:, None]).square().sum(dim=2)
