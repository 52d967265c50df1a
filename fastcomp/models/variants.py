"""Conditioning designs for the length-generalization study (`fastcomp study length-generalization`).

Every design is a conditional denoiser D(x; sigma, points, valid) with ConditionalDenoiser's API (keyword
constructor whose arguments are `.config`, forward(x, sigma, points, valid), `img_channels`, `image_size`,
`sigma_data`), so fastcomp.train, the samplers and the probes take any of them. Each is told where its pixels
are (Fourier features of the token centres added after the stem), and each has an intervention,
`local_conditioners=True`: the same network and parameters with only its conditioner path made local (each
pixel or feature-map position sees only the conditioners whose disk covers it); everything else, the pixel
path included, stays global.

    VARIANTS            the designs by name (build_denoiser(name, ...) builds one):
      tokens-rope       ConditionalDenoiser(locality="global"): conditioner tokens in the pixels' softmax,
                        2-D rotary position embedding of queries and keys
      tokens-abs        the same without the rotary embedding: absolute Fourier position features only
      unet              UNetDenoiser: a convolutional U-Net (16 -> 8 -> 4 tokens a side and back, global
                        self-attention at the bottom) with cross-attention to the conditioner tokens at
                        every resolution: the usual text-to-image layout
      vector            VectorDenoiser: the conditioners summed into one embedding (permutation-invariant,
                        any number of them) that joins the noise-level embedding in every block's adaptive
                        LayerNorm (FiLM): the usual class-conditioning layout
      local             ConditionalDenoiser(locality="local"): local in pixels and conditioners (Bradley's
                        experiment 3); it has no separate intervention, it is one
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import _split_heads
from ..ops import _checks as check
from .diffusion import (ConditionalDenoiser, DenoiserBlock, GlobalConditionalAttention, NoiseEmbedding,
                        conditioner_disk_mask, fourier_coordinates, pixel_conditioner_keep, rope_angles,
                        rope_wavelengths)

# name -> (what it is, whether it has an intervention)
VARIANTS = {
    "tokens-rope": ("conditioner tokens in one softmax with the pixels, 2-D rotary position embedding", True),
    "tokens-abs": ("conditioner tokens in one softmax with the pixels, absolute Fourier positions only", True),
    "unet": ("convolutional U-Net with cross-attention to the conditioner tokens at every resolution", True),
    "vector": ("conditioners summed into one embedding, injected with the noise level by adaptive LayerNorm",
               True),
    "local": ("local in pixels and conditioners (windowed attention, disk-masked conditioners)", False),
}


def build_denoiser(variant: str, *, local_conditioners: bool = False, img_channels: int = 3,
                   image_size: int = 32, channels: int = 64, depth: int = 3, num_heads: int = 4,
                   kernel_size: int = 3, cond_radius: float = 5.0, patch_size: int = 2,
                   backend: Optional[str] = None, unet_channels: Optional[int] = None) -> nn.Module:
    """One study model: `variant` (a VARIANTS name), as is or with its intervention (local_conditioners).

    channels / depth / num_heads size the token models and the vector model (depth blocks of `channels`);
    the U-Net's base width is unet_channels (default 7/16 of channels, doubled at 8 and 4 tokens a side),
    which keeps its parameter count within a few percent of the token models'. kernel_size is the local
    model's window (tokens); cond_radius the disk (pixels) of the local model and of every intervention.
    """
    if variant not in VARIANTS:
        raise ValueError(f"build_denoiser: variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    if local_conditioners and not VARIANTS[variant][1]:
        raise ValueError(f"build_denoiser: variant {variant!r} is already local in its conditioners; it has no "
                         "intervention (pass local_conditioners=False)")
    common = dict(img_channels=img_channels, image_size=image_size, num_heads=num_heads, cond_radius=cond_radius,
                  patch_size=patch_size, backend=backend)
    if variant in ("tokens-rope", "tokens-abs"):
        return ConditionalDenoiser(channels=channels, depth=depth, kernel_size=kernel_size, locality="global",
                                   rope=variant == "tokens-rope", local_conditioners=local_conditioners, **common)
    if variant == "local":
        return ConditionalDenoiser(channels=channels, depth=depth, kernel_size=kernel_size, locality="local",
                                   **common)
    if variant == "unet":
        if unet_channels is None:  # 7/16 of the width: 28 at 64, within a few percent of the token models' count
            unet_channels = max(1, round(channels * 7 / 16 / num_heads)) * num_heads
        return UNetDenoiser(channels=unet_channels,
                            local_conditioners=local_conditioners, **common)
    return VectorDenoiser(channels=channels, depth=depth, local_conditioners=local_conditioners, **common)


class CrossAttention(nn.Module):
    """Feature-map positions attend conditioner tokens (and a learned null token, so a position that may see
    no conditioner still has a key; it carries no information about any conditioner).

    forward(x [B, H, W, dim], cond [B, M, cond_dim], cond_mask [B, M] (key padding) or [B, M, H, W]
    (per position), rope ignored) -> [B, H, W, dim]. Masked keys are removed before the softmax.
    """

    def __init__(self, dim: int, num_heads: int, cond_dim: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads = dim, num_heads
        self.q = nn.Linear(dim, dim)
        self.cond_kv = nn.Linear(cond_dim, 2 * dim)
        self.null_kv = nn.Parameter(torch.zeros(2 * dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor, **_) -> torch.Tensor:
        B, H, W, C = x.shape
        M = cond.shape[1]
        q = _split_heads(self.q(x.reshape(B, H * W, C)), self.num_heads)  # [B, HW, h, D]
        kv = torch.cat([self.null_kv.expand(B, 1, -1), self.cond_kv(cond)], dim=1)  # [B, 1 + M, 2C]
        k, v = _split_heads(kv, 2 * self.num_heads).chunk(2, dim=-2)  # [B, 1 + M, h, D]
        if cond_mask.dim() == 4:
            keep = pixel_conditioner_keep(cond_mask, 1)  # [B, 1, HW, 1 + M]
        else:
            keep = torch.cat([cond_mask.new_ones(B, 1), cond_mask], dim=1)[:, None, None, :]  # [B, 1, 1, 1 + M]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=keep)  # [B, h, HW, D]
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))


class _SiblingDenoiser(nn.Module):
    """What the study's non-token models share with ConditionalDenoiser: EDM preconditioning and the input
    checks (the same methods, so a fix there applies here), the noise embedding, the conditioner features
    (Fourier features of (row, col) -> MLP, + a learned object embedding) and the token-centre grid."""

    preconditioning = ConditionalDenoiser.preconditioning
    _check = ConditionalDenoiser._check

    def _init_common(self, *, img_channels, image_size, patch_size, cond_radius, sigma_data, emb_dim):
        for name, value in (("img_channels", img_channels), ("image_size", image_size), ("patch_size", patch_size)):
            check.positive_int(self.OP, name, value)
        if image_size % patch_size:
            raise ValueError(f"{self.OP}: image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        if isinstance(cond_radius, bool) or not isinstance(cond_radius, (int, float)) or not cond_radius >= 0:
            raise ValueError(f"{self.OP}: cond_radius must be a number >= 0 (pixels), got {cond_radius!r}")
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not sigma_data > 0:
            raise ValueError(f"{self.OP}: sigma_data must be a positive number, got {sigma_data!r}")
        self.img_channels, self.image_size, self.patch_size = img_channels, image_size, patch_size
        self.grid_size = image_size // patch_size
        self.cond_radius, self.sigma_data = float(cond_radius), float(sigma_data)
        self.num_freqs = max(1, math.ceil(math.log2(image_size)))
        pos_dim = 4 * self.num_freqs
        self.noise_emb = NoiseEmbedding(emb_dim)
        self.cond_mlp = nn.Sequential(nn.Linear(pos_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.object_emb = nn.Parameter(torch.zeros(emb_dim))
        return pos_dim

    def _grid(self, stride: int, device, dtype) -> torch.Tensor:
        """[G, G, 2] (row, col) pixel centres of the tokens of a map with stride-pixel cells."""
        G = self.image_size // stride
        centres = torch.arange(G, device=device, dtype=dtype) * stride + (stride - 1) / 2
        return torch.stack(torch.meshgrid(centres, centres, indexing="ij"), dim=-1)

    def _inputs(self, x, sigma, points, valid):
        """Checked inputs -> (c_skip, c_out, c_in, noise embedding [B, E], points with the padding rows zeroed
        (a padding row never enters the network, whatever it holds), valid, per-conditioner features [B, M, E])."""
        sigma, valid = self._check(x, sigma, points, valid)
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        dtype = self.noise_emb.mlp[0].weight.dtype
        emb = self.noise_emb(c_noise.to(dtype))
        points = torch.where(valid[..., None], points.to(dtype), torch.zeros((), dtype=dtype, device=x.device))
        feats = self.cond_mlp(fourier_coordinates(points, self.image_size, self.num_freqs)) + self.object_emb
        return c_skip, c_out, c_in, emb, points, valid, feats

    def _cond_mask(self, points, valid, stride: int):
        """[B, M] key padding, or with local_conditioners [B, M, G, G] for a map of stride-pixel cells: a cell
        sees a conditioner when its centre is within max(cond_radius, 0.75 stride) pixels, so every
        conditioner reaches at least one cell at every resolution (the nearest centre is <= 0.71 stride away)."""
        if not self.local_conditioners:
            return valid
        radius = max(self.cond_radius, 0.75 * stride)
        return conditioner_disk_mask(points, valid, radius, stride, self.image_size // stride,
                                     reference=self.config["backend"] == "reference")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


class UNetDenoiser(_SiblingDenoiser):
    """A small convolutional U-Net with cross-attention to conditioner tokens at every resolution.

    stem: stride-patch_size conv to a (S/p)^2 map (+ Fourier features of the cell centres); levels of
    channels * (1, 2, 2) at S/p, S/2p, S/4p cells a side, each with `blocks` blocks [3x3 conv | attention |
    MLP] pre-normed by an adaptive (noise-level) LayerNorm, joined by stride-2 convs down and nearest
    upsampling + skip concatenation up; the attention is cross-attention to the conditioner tokens (plus a
    null token) on every level but the bottom, where it is global self-attention over the cells plus the
    conditioner tokens in one softmax, so the receptive field is the whole image.

    local_conditioners: every position at every resolution sees only the conditioners within
    max(cond_radius, 0.75 cell) of its centre (nothing else changes).
    forward(x [B, C, S, S], sigma, points [B, M, 2], valid [B, M] or None) -> [B, C, S, S].
    """

    OP = "UNetDenoiser"
    MULT = (1, 2, 2)

    def __init__(self, *, img_channels: int = 3, image_size: int = 32, channels: int = 32, blocks: int = 1,
                 num_heads: int = 4, cond_radius: float = 5.0, sigma_data: float = 0.5,
                 backend: Optional[str] = None, patch_size: int = 2, local_conditioners: bool = False):
        super().__init__()
        check.positive_int(self.OP, "channels", channels)
        check.positive_int(self.OP, "blocks", blocks)
        check.positive_int(self.OP, "num_heads", num_heads)
        if not isinstance(local_conditioners, bool):
            raise TypeError(f"{self.OP}: local_conditioners must be True or False, got {local_conditioners!r}")
        widths = [channels * m for m in self.MULT]
        if any(w % num_heads for w in widths):
            raise ValueError(f"{self.OP}: channels ({channels}) must be divisible by num_heads ({num_heads})")
        scale = patch_size * 2 ** (len(widths) - 1)
        if image_size % scale:
            raise ValueError(f"{self.OP}: image_size ({image_size}) must be a multiple of patch_size * "
                             f"{2 ** (len(widths) - 1)} = {scale} (the bottom level's cell)")
        self.config = dict(img_channels=img_channels, image_size=image_size, channels=channels, blocks=blocks,
                           num_heads=num_heads, cond_radius=float(cond_radius), sigma_data=float(sigma_data),
                           backend=backend, patch_size=patch_size, local_conditioners=local_conditioners)
        self.local_conditioners = local_conditioners
        E = widths[-1]  # noise and conditioner embeddings: the widest level's width
        pos_dim = self._init_common(img_channels=img_channels, image_size=image_size, patch_size=patch_size,
                                    cond_radius=cond_radius, sigma_data=sigma_data, emb_dim=E)
        self.cond_noise = nn.Linear(E, E)
        self.stem = nn.Conv2d(img_channels, widths[0], patch_size, stride=patch_size)
        self.pixel_pos = nn.Linear(pos_dim, widths[0])
        bottom = len(widths) - 1

        def level(w: int, is_bottom: bool) -> nn.ModuleList:
            out = nn.ModuleList()
            for _ in range(blocks):
                block = DenoiserBlock(w, num_heads, 1, E, "global", backend)
                block.attn = (GlobalConditionalAttention(w, num_heads, 1, cond_dim=E, backend=backend) if is_bottom
                              else CrossAttention(w, num_heads, cond_dim=E))
                out.append(block)
            return out

        self.down = nn.ModuleList([level(w, i == bottom) for i, w in enumerate(widths)])
        self.downsample = nn.ModuleList([nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)
                                         for i in range(bottom)])
        self.merge = nn.ModuleList([nn.Linear(widths[i + 1] + widths[i], widths[i]) for i in range(bottom)])
        self.up = nn.ModuleList([level(widths[i], False) for i in range(bottom)])
        self.out_norm = nn.LayerNorm(widths[0])
        self.out = nn.ConvTranspose2d(widths[0], img_channels, patch_size, stride=patch_size)
        nn.init.zeros_(self.out.weight)  # a fresh model predicts D = c_skip * x
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, sigma: Union[torch.Tensor, float], points: torch.Tensor,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        c_skip, c_out, c_in, emb, points, valid, feats = self._inputs(x, sigma, points, valid)
        dtype = emb.dtype
        cond = feats + self.cond_noise(emb)[:, None, :]  # [B, M, E]
        p = self.patch_size
        strides = [p * 2 ** i for i in range(len(self.down))]
        masks = [self._cond_mask(points, valid, s) for s in strides]
        h = self.stem((c_in[:, None, None, None] * x).to(dtype)).permute(0, 2, 3, 1)  # [B, G, G, C0]
        h = h + self.pixel_pos(fourier_coordinates(self._grid(p, x.device, dtype), self.image_size, self.num_freqs))
        skips = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb, cond, masks[i])
            if i < len(self.downsample):
                skips.append(h)
                h = self.downsample[i](h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        for i in reversed(range(len(self.up))):
            h = F.interpolate(h.permute(0, 3, 1, 2), scale_factor=2, mode="nearest").permute(0, 2, 3, 1)
            h = self.merge[i](torch.cat([h, skips[i]], dim=-1))
            for block in self.up[i]:
                h = block(h, emb, cond, masks[i])
        f = self.out(self.out_norm(h).permute(0, 3, 1, 2))
        return c_skip[:, None, None, None] * x + c_out[:, None, None, None] * f.to(x.dtype)


class VectorDenoiser(_SiblingDenoiser):
    """Class-conditioning layout: the conditioners enter as one embedding vector.

    e = sum over valid conditioners m of phi(point_m) (phi: Fourier features -> MLP, + an object embedding;
    a sum, so permutation-invariant and any number of conditioners), added to the noise-level embedding
    that modulates every block's LayerNorms (adaptive LayerNorm / FiLM). The backbone is
    ConditionalDenoiser's global one without conditioner tokens: depth blocks [3x3 conv | global
    self-attention (2-D rotary embedding when rope) | MLP] on the (S/p)^2 token grid.

    local_conditioners: the embedding becomes per token, e(p) = sum over the conditioners whose
    cond_radius disk covers token p, so each token's modulation sees only the conditioners near it.
    forward(x [B, C, S, S], sigma, points [B, M, 2], valid [B, M] or None) -> [B, C, S, S].
    """

    OP = "VectorDenoiser"

    def __init__(self, *, img_channels: int = 3, image_size: int = 32, channels: int = 64, depth: int = 3,
                 num_heads: int = 4, cond_radius: float = 5.0, sigma_data: float = 0.5,
                 backend: Optional[str] = None, patch_size: int = 2, rope: bool = True,
                 local_conditioners: bool = False):
        super().__init__()
        for name, value in (("channels", channels), ("depth", depth), ("num_heads", num_heads)):
            check.positive_int(self.OP, name, value)
        if channels % num_heads:
            raise ValueError(f"{self.OP}: channels ({channels}) must be divisible by num_heads ({num_heads})")
        for name, value in (("rope", rope), ("local_conditioners", local_conditioners)):
            if not isinstance(value, bool):
                raise TypeError(f"{self.OP}: {name} must be True or False, got {value!r}")
        self.config = dict(img_channels=img_channels, image_size=image_size, channels=channels, depth=depth,
                           num_heads=num_heads, cond_radius=float(cond_radius), sigma_data=float(sigma_data),
                           backend=backend, patch_size=patch_size, rope=rope, local_conditioners=local_conditioners)
        self.local_conditioners, self.rope = local_conditioners, rope
        pos_dim = self._init_common(img_channels=img_channels, image_size=image_size, patch_size=patch_size,
                                    cond_radius=cond_radius, sigma_data=sigma_data, emb_dim=channels)
        self.register_buffer("rope_wavelengths", rope_wavelengths(channels // num_heads, image_size)
                             if rope else None, persistent=False)
        self.stem = nn.Conv2d(img_channels, channels, patch_size, stride=patch_size)
        self.pixel_pos = nn.Linear(pos_dim, channels)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = DenoiserBlock(channels, num_heads, 1, channels, "global", backend)
            block.attn.cond_kv = None  # no conditioner tokens: the self-attention's conditioner keys are unused
            self.blocks.append(block)
        self.out_norm = nn.LayerNorm(channels)
        self.out = nn.ConvTranspose2d(channels, img_channels, patch_size, stride=patch_size)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, sigma: Union[torch.Tensor, float], points: torch.Tensor,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        c_skip, c_out, c_in, emb, points, valid, feats = self._inputs(x, sigma, points, valid)
        dtype = emb.dtype
        p, G = self.patch_size, self.grid_size
        zero = torch.zeros((), dtype=dtype, device=x.device)
        if self.local_conditioners:
            mask = self._cond_mask(points, valid, p)  # [B, M, G, G]
            # where, not a product with the mask: nothing of a conditioner reaches a token it does not cover
            per_token = torch.where(mask[..., None], feats[:, :, None, None, :], zero).sum(dim=1)  # [B, G, G, E]
            emb = emb[:, None, None, :] + per_token
        else:
            emb = emb + torch.where(valid[..., None], feats, zero).sum(dim=1)  # [B, E]
        grid = self._grid(p, x.device, dtype)
        h = self.stem((c_in[:, None, None, None] * x).to(dtype)).permute(0, 2, 3, 1)  # [B, G, G, C]
        h = h + self.pixel_pos(fourier_coordinates(grid, self.image_size, self.num_freqs))
        rope = None
        if self.rope:
            rope = (rope_angles(grid.reshape(1, G * G, 2), self.rope_wavelengths.to(dtype)), None)
        for block in self.blocks:
            h = block(h, emb, None, None, rope)
        f = self.out(self.out_norm(h).permute(0, 3, 1, 2))
        return c_skip[:, None, None, None] * x + c_out[:, None, None, None] * f.to(x.dtype)


__all__ = ["VARIANTS", "build_denoiser", "UNetDenoiser", "VectorDenoiser", "CrossAttention"]
