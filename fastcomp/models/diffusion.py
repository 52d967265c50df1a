"""A small conditional diffusion denoiser with a local / global switch (Bradley, arXiv 2509.16447).

    x [B, C, S, S] noisy image, sigma [B], points [B, M, 2] (row, col), valid [B, M]
      -> EDM preconditioning (Karras et al. 2022):  D = c_skip * x + c_out * F(c_in * x; c_noise, cond)
    F: 3x3 conv stem (+ pixel-position Fourier features)
       -> depth x [ 3x3 conv | attention (image tokens + conditioner tokens, one softmax) | MLP ],
          each sub-layer pre-normed by a per-pixel LayerNorm with noise-level scale/shift (adaLN)
       -> per-pixel LayerNorm -> 3x3 conv to C channels
    conditioner tokens: Fourier features of (row, col) -> MLP, + a learned "object" embedding + the noise
    embedding.

locality="local": the attention is fastcomp.nn.LocalConditionalAttention with a kernel_size window and
cond_mask = disk_mask(points, cond_radius) & valid, so pixel i sees only conditioners within cond_radius.
Every other layer is per-pixel or a 3x3 conv (no GroupNorm, no pooling, no downsampling), so the
denoiser's output at a pixel depends only on pixels within `receptive_radius` and on conditioners within
`cond_radius + receptive_radius` of it: a local conditional score.
locality="global": the same blocks and parameters, but every pixel attends every pixel and every valid
conditioner (one softmax, scaled_dot_product_attention with a key-padding mask), with a 2-D rotary
position embedding (rope=True) so that a logit can depend on a key's offset from the pixel.
locality="global", local_conditioners=True: global in pixels, but each pixel attends only the conditioners
whose disk covers it (the intervention of `fastcomp study length-generalization`).
Sibling models with the same constructor-config / forward API (a U-Net with cross-attention, a pooled
conditioning vector with FiLM) are in fastcomp.models.variants.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import disk_mask
from ..nn.attention import LocalConditionalAttention, _split_heads
from ..ops import _checks as check

OP = "ConditionalDenoiser"
LOCALITIES = ("local", "global")


def fourier_coordinates(points: torch.Tensor, size: int, num_freqs: int) -> torch.Tensor:
    """[..., 2] (row, col) in pixels -> [..., 4 * num_freqs] sin/cos of 2 pi f (coord / size),
    f = 1, 2, 4, ... cycles per image (the highest reaches the pixel grid's Nyquist rate at 32 px)."""
    freqs = 2.0 ** torch.arange(num_freqs, device=points.device, dtype=points.dtype)  # [F]
    angles = 2 * math.pi * (points / size).unsqueeze(-1) * freqs  # [..., 2, F]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # [..., 4F]


class NoiseEmbedding(nn.Module):
    """c_noise [B] -> [B, dim]: sin/cos at geometric frequencies, then a 2-layer MLP."""

    def __init__(self, dim: int, num_freqs: int = 16):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.linspace(-1.0, 5.0, num_freqs), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.unsqueeze(-1) * self.freqs.to(c_noise.dtype)  # [B, F]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


def rope_wavelengths(head_dim: int, size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The axial rotary embedding's wavelengths in pixels, head_dim // 4 per axis: from 2 * size (one turn
    across twice the image, so no two positions alias) halving down, but never below 4 px (2 tokens of a
    2-px grid: finer would alias on the token grid)."""
    n = head_dim // 4
    if n == 0:
        return torch.zeros(0, dtype=dtype, device=device)
    ratio = 0.5 if n == 1 else max(0.5, (4.0 / (2 * size)) ** (1.0 / (n - 1)))
    return 2.0 * size * ratio ** torch.arange(n, dtype=dtype, device=device)


def rope_angles(positions: torch.Tensor, wavelengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [..., N, 2] (row, col) in pixels -> (cos, sin) [..., N, 2 n] of 2 pi pos / wavelength, rows'
    angles then columns'."""
    angles = 2 * math.pi * positions.unsqueeze(-1) / wavelengths  # [..., N, 2, n]
    angles = angles.flatten(-2)
    return angles.cos(), angles.sin()


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of t [B, N, h, D]'s first 2 * cos.shape[-1] channels by the angles
    (cos, sin) [B or 1, N, P]; the remaining channels (D not a multiple of 4) pass through unrotated."""
    n = 2 * cos.shape[-1]
    if n == 0:
        return t
    pairs = t[..., :n].unflatten(-1, (-1, 2))  # [B, N, h, P, 2]
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, :, None, :].to(t.dtype), sin[:, :, None, :].to(t.dtype)
    rotated = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    return torch.cat([rotated, t[..., n:]], dim=-1) if n < t.shape[-1] else rotated


def pixel_conditioner_keep(cond_mask: torch.Tensor, always: int) -> torch.Tensor:
    """cond_mask [B, M, H, W] bool (may pixel (i, j) attend conditioner m?) -> the attention mask
    [B, 1, HW, always + M] of one softmax over `always` keys every pixel sees (the pixel keys, say), then
    the conditioner keys where allowed."""
    B, M, H, W = cond_mask.shape
    return torch.cat([cond_mask.new_ones(B, H * W, always), cond_mask.flatten(2).transpose(1, 2)], dim=2)[:, None]


def conditioner_disk_mask(points: torch.Tensor, valid: torch.Tensor, radius: float, stride: int, grid: int, *,
                          reference: bool = False) -> torch.Tensor:
    """Which conditioners each token of a grid x grid map of stride-pixel cells sees: [B, M, grid, grid]
    bool, true where the token's centre (stride * i + (stride - 1) / 2 pixels) lies within `radius` pixels
    of points [B, M, 2] (row, col) and valid [B, M]. The mask is piecewise constant in the points, so it is
    built from detached points: probes differentiate the conditioner tokens only. reference: plain
    PyTorch (torch.func transforms, e.g. forward-mode probes, run through it)."""
    token_points = (points.detach() - (stride - 1) / 2) / stride  # token (i, j) has its centre at s i + (s-1)/2
    mask = disk_mask(token_points, radius / stride, grid, grid, backend="reference" if reference else None)
    return mask & valid[:, :, None, None]


class GlobalConditionalAttention(LocalConditionalAttention):
    """LocalConditionalAttention's parameters (qkv, cond_kv, proj) used globally: every pixel attends every
    pixel and every conditioner the mask allows, in one softmax. cond_mask here is a key-padding mask
    [B, M] bool (True = attend); None = all. Same parameter count as the local layer by construction.
    A per-pixel mask [B, M, H, W] (ConditionalDenoiser(local_conditioners=True)) lets pixel (i, j) attend
    conditioner m only where cond_mask[b, m, i, j]: the pixel keys stay global, the conditioner keys local.

    rope = (pixel (cos, sin) [1, HW, P], conditioner (cos, sin) [B, M, P]) from rope_angles, or None:
    2-D axial rotary position embedding of the queries, the pixel keys and the conditioner keys, so a
    logit can depend on the offset between a pixel and a key's position. Without it the global model has
    to learn to match a pixel's absolute position embedding against a conditioner's Fourier features
    through q.k, and in our runs it never did (4000 steps: its loss was the same with the conditioners
    shuffled between images). RoPE adds no parameters and no locality: the weights stay global, the
    model only gets to express "near" cheaply, which makes it a stronger baseline, not a local one.
    """

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None,
                cond_mask: Optional[torch.Tensor] = None, *, backend: Optional[str] = None,
                rope: Optional[tuple] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = _split_heads(self.qkv(x.reshape(B, H * W, C)), 3 * self.num_heads).chunk(3, dim=-2)  # [B, HW, h, D]
        if rope is not None:
            q, k = apply_rope(q, *rope[0]), apply_rope(k, *rope[0])
        keep = None
        if cond is not None and cond.shape[1] > 0:
            ck, cv = _split_heads(self.cond_kv(cond), 2 * self.num_heads).chunk(2, dim=-2)  # [B, M, h, D]
            if rope is not None:
                ck = apply_rope(ck, *rope[1])
            if cond_mask is not None:  # masked-out tokens: zeros, as a softmax weight 0 times inf or NaN is NaN
                # a per-pixel mask [B, M, H, W] (local_conditioners): a token no pixel sees is masked out
                seen = cond_mask if cond_mask.dim() == 2 else cond_mask.flatten(2).any(dim=2)  # [B, M]
                ck, cv = (t.masked_fill(~seen[:, :, None, None], 0) for t in (ck, cv))
            k, v = torch.cat([k, ck], dim=1), torch.cat([v, cv], dim=1)  # [B, HW + M, h, D]
            if cond_mask is not None and cond_mask.dim() == 4:
                keep = pixel_conditioner_keep(cond_mask, H * W)  # [B, 1, HW, HW + M]
            elif cond_mask is not None:
                image_keys = cond_mask.new_ones(B, H * W)
                keep = torch.cat([image_keys, cond_mask], dim=1)[:, None, None, :]  # [B, 1, 1, HW + M]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=keep)  # [B, h, HW, D]
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))


class DenoiserBlock(nn.Module):
    """conv 3x3 -> attention -> MLP, each residual, pre-normed per pixel and modulated by the noise
    embedding (shift, scale; the modulation starts at zero so a fresh block is a plain pre-norm block)."""

    def __init__(self, channels: int, num_heads: int, kernel_size: int, emb_dim: int, locality: str,
                 backend: Optional[str]):
        super().__init__()
        self.locality = locality
        self.norms = nn.ModuleList([nn.LayerNorm(channels, elementwise_affine=False) for _ in range(3)])
        self.modulation = nn.Linear(emb_dim, 6 * channels)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        attn_cls = LocalConditionalAttention if locality == "local" else GlobalConditionalAttention
        self.attn = attn_cls(channels, num_heads, kernel_size, backend=backend)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor,
                rope: Optional[tuple] = None) -> torch.Tensor:
        """h [B, S, S, C] channels-last; emb [B, E] (or [B, S, S, E]: a modulation per pixel); cond
        [B, M, C]; cond_mask [B, M, S, S] (local, or global with local conditioners) or [B, M] (global);
        rope: the global attention's rotary angles (GlobalConditionalAttention)."""
        mods = self.modulation(emb)  # [B, 6C], or [B, S, S, 6C] for a per-pixel emb [B, S, S, E]
        mods = (mods[:, None, None, :] if mods.dim() == 2 else mods).chunk(6, dim=-1)  # 6 x [B, 1 or S, 1 or S, C]

        def pre(i: int) -> torch.Tensor:
            return self.norms[i](h) * (1 + mods[2 * i + 1]) + mods[2 * i]

        h = h + self.conv(F.silu(pre(0)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        attn_kwargs = {} if rope is None else {"rope": rope}  # the local layer takes no rope
        h = h + self.attn(pre(1), cond, cond_mask, **attn_kwargs)
        return h + self.mlp(pre(2))


class ConditionalDenoiser(nn.Module):
    """EDM-preconditioned conditional denoiser D(x; sigma, points), local or global in pixels and
    conditioners (see the module docstring).

    img_channels, image_size: the images [B, img_channels, image_size, image_size]; channels: width;
    depth: blocks; num_heads divides channels; kernel_size: the local attention window (odd);
    locality: "local" | "global"; cond_radius: pixels within this distance of a conditioner attend it
    (local only); sigma_data: the data's standard deviation (EDM); backend: the attention op's backend
    (None = fastest available; "reference" = plain PyTorch); patch_size: 1 = the blocks run at full
    resolution (3x3 conv stem and output); p > 1 = non-overlapping p x p patches in (a stride-p conv) and
    out (a stride-p transposed conv), so the blocks run on an (S/p)^2 token grid: p^2 times cheaper and
    still local (kernel_size and cond_radius then act on tokens of p x p pixels; cond_radius stays in pixels).

    rope (global only): 2-D axial rotary position embedding of the global attention's queries and keys,
    pixels at their token centres and conditioners at their points (see GlobalConditionalAttention); it
    lets the global model learn which conditioners are near a pixel, which without it it did not learn
    in our budgets. The local model ignores it (its masks already say which conditioners are near).

    local_conditioners (global only; the length-generalization study's intervention): the same global
    network with only its conditioner path made local: every pixel still attends every pixel, but only
    the conditioners whose cond_radius disk covers it (the local model's mask), in the same one softmax.

    forward(x [B, C, S, S], sigma [B] or float, points [B, M, 2] (row, col) in pixels, valid [B, M] bool
    or None = all valid; M may be 0) -> the denoised image [B, C, S, S].
    """

    def __init__(self, *, img_channels: int = 3, image_size: int = 32, channels: int = 64, depth: int = 4,
                 num_heads: int = 4, kernel_size: int = 7, locality: str = "local", cond_radius: float = 6.0,
                 sigma_data: float = 0.5, backend: Optional[str] = None, patch_size: int = 1,
                 rope: bool = True, local_conditioners: bool = False):
        super().__init__()
        for name, value in (("img_channels", img_channels), ("image_size", image_size), ("channels", channels),
                            ("depth", depth), ("num_heads", num_heads), ("kernel_size", kernel_size),
                            ("patch_size", patch_size)):
            check.positive_int(OP, name, value)
        if locality not in LOCALITIES:
            raise ValueError(f"{OP}: locality must be one of {LOCALITIES}, got {locality!r}")
        if channels % num_heads:
            raise ValueError(f"{OP}: channels ({channels}) must be divisible by num_heads ({num_heads})")
        if image_size % patch_size:
            raise ValueError(f"{OP}: image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        grid_size = image_size // patch_size
        if kernel_size % 2 == 0 or kernel_size > grid_size:
            raise ValueError(f"{OP}: kernel_size must be odd and at most image_size / patch_size ({grid_size}), "
                             f"got {kernel_size}")
        if isinstance(cond_radius, bool) or not isinstance(cond_radius, (int, float)) or not cond_radius >= 0:
            raise ValueError(f"{OP}: cond_radius must be a number >= 0 (pixels), got {cond_radius!r}")
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not sigma_data > 0:
            raise ValueError(f"{OP}: sigma_data must be a positive number, got {sigma_data!r}")
        if not isinstance(rope, bool):
            raise TypeError(f"{OP}: rope must be True or False, got {rope!r}")
        if not isinstance(local_conditioners, bool):
            raise TypeError(f"{OP}: local_conditioners must be True or False, got {local_conditioners!r}")
        if local_conditioners and locality != "global":
            raise ValueError(f"{OP}: local_conditioners=True makes a global model's conditioner attention local; "
                             f"locality={locality!r} already is local in its conditioners (pass "
                             "locality='global', or leave local_conditioners=False)")
        self.config = dict(img_channels=img_channels, image_size=image_size, channels=channels, depth=depth,
                           num_heads=num_heads, kernel_size=kernel_size, locality=locality,
                           cond_radius=float(cond_radius), sigma_data=float(sigma_data), backend=backend,
                           patch_size=patch_size, rope=rope, local_conditioners=local_conditioners)
        self.img_channels, self.image_size, self.locality = img_channels, image_size, locality
        self.kernel_size, self.depth, self.patch_size, self.grid_size = kernel_size, depth, patch_size, grid_size
        self.cond_radius, self.sigma_data = float(cond_radius), float(sigma_data)
        self.local_conditioners = local_conditioners
        self.num_freqs = max(1, math.ceil(math.log2(image_size)))  # up to the grid's Nyquist frequency
        self.rope = rope and locality == "global"
        self.register_buffer("rope_wavelengths", rope_wavelengths(channels // num_heads, image_size)
                             if self.rope else None, persistent=False)  # None: a local model has no use for it
        pos_dim = 4 * self.num_freqs

        if patch_size == 1:
            self.stem = nn.Conv2d(img_channels, channels, 3, padding=1)
        else:
            self.stem = nn.Conv2d(img_channels, channels, patch_size, stride=patch_size)
        self.pixel_pos = nn.Linear(pos_dim, channels)  # absolute position: per pixel, so still local
        self.noise_emb = NoiseEmbedding(channels)
        self.cond_mlp = nn.Sequential(nn.Linear(pos_dim, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.object_emb = nn.Parameter(torch.zeros(channels))
        self.cond_noise = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList([DenoiserBlock(channels, num_heads, kernel_size, channels, locality, backend)
                                     for _ in range(depth)])
        self.out_norm = nn.LayerNorm(channels)
        if patch_size == 1:
            self.out = nn.Conv2d(channels, img_channels, 3, padding=1)
        else:
            self.out = nn.ConvTranspose2d(channels, img_channels, patch_size, stride=patch_size)
        nn.init.zeros_(self.out.weight)  # a fresh model predicts D = c_skip * x
        nn.init.zeros_(self.out.bias)

    @property
    def receptive_radius(self) -> int:
        """Chebyshev radius (pixels) of F's dependence on x for the local model: each block's 3x3 conv adds
        1 token and its window kernel_size - 1 (the window is clamped inside the grid, so a border token's
        window reaches kernel_size - 1 tokens inward); patch_size 1: the 3x3 stem and output convs add 1
        each; p > 1: a token spans p pixels, so the reach is p * tokens + p - 1 pixels."""
        tokens = self.depth * self.kernel_size
        if self.patch_size == 1:
            return tokens + 2
        return self.patch_size * tokens + self.patch_size - 1

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """EDM's (c_skip, c_out, c_in, c_noise) for sigma [B] (Karras et al. 2022, table 1)."""
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.clamp(min=1e-20).log() / 4  # sigma = 0 has c_out = 0; keep F finite there
        return c_skip, c_out, c_in, c_noise

    def _check(self, x, sigma, points, valid) -> tuple[torch.Tensor, torch.Tensor]:
        check.tensor(OP, "x", x, ndim=4, layout="[B, C, S, S]")
        check.floating(OP, "x", x)
        B = x.shape[0]
        check.shape(OP, "x", x, (B, self.img_channels, self.image_size, self.image_size), "[B, C, S, S]",
                    f"C = img_channels, S = image_size of this model")
        check.tensor(OP, "points", points, ndim=3, layout="[B, M, 2]")
        if not points.is_floating_point():
            raise TypeError(f"{OP}: points must be a floating tensor of (row, col) pixel coordinates, got "
                            f"{check.dtype_name(points.dtype)}; call .float()")
        check.shape(OP, "points", points, (B, points.shape[1], 2), "[B, M, 2]", "B from x, (row, col) last")
        if valid is None:
            valid = torch.ones(points.shape[:2], dtype=torch.bool, device=points.device)
        else:
            check.tensor(OP, "valid", valid, ndim=2, layout="[B, M]")
            if valid.dtype != torch.bool:
                raise TypeError(f"{OP}: valid must be a bool tensor [B, M] (False = padding row), got "
                                f"{check.dtype_name(valid.dtype)}; call .bool()")
            check.shape(OP, "valid", valid, points.shape[:2], "[B, M]", "B, M from points")
        if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
            sigma = torch.full((B,), float(sigma), dtype=x.dtype, device=x.device)
        elif isinstance(sigma, torch.Tensor):
            if sigma.dim() == 0:
                sigma = sigma.expand(B)
            if sigma.shape != (B,):
                raise ValueError(f"{OP}: sigma must be a float or a [B] = [{B}] tensor, got "
                                 f"{check.fmt_shape(sigma.shape)}")
            sigma = sigma.to(x.dtype)
        else:
            raise TypeError(f"{OP}: sigma must be a float or a [B] tensor, got {type(sigma).__name__}")
        check.same_device(OP, "x", x, sigma=sigma, points=points, valid=valid)
        return sigma, valid

    def forward(self, x: torch.Tensor, sigma: Union[torch.Tensor, float], points: torch.Tensor,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        sigma, valid = self._check(x, sigma, points, valid)
        B, _, S, _ = x.shape
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        dtype = self.stem.weight.dtype
        emb = self.noise_emb(c_noise.to(dtype))  # [B, E]
        # Padding rows (valid False) may hold anything, NaN included: their tokens are masked out, but a
        # non-finite token would still poison the softmax products, so their points are zeroed first.
        points = points.to(dtype).masked_fill(~valid[:, :, None], 0)

        p, G = self.patch_size, self.grid_size
        centres = torch.arange(G, device=x.device, dtype=dtype) * p + (p - 1) / 2  # token centres in pixels
        grid = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), dim=-1)  # [G, G, 2]
        h = self.stem((c_in[:, None, None, None] * x).to(dtype)).permute(0, 2, 3, 1)  # [B, G, G, C]
        h = h + self.pixel_pos(fourier_coordinates(grid, self.image_size, self.num_freqs))

        cond = self.cond_mlp(fourier_coordinates(points, self.image_size, self.num_freqs))  # [B, M, C]
        cond = cond + self.object_emb + self.cond_noise(emb)[:, None, :]
        if self.locality == "local" or self.local_conditioners:
            # A reference model builds the mask in plain PyTorch too, so torch.func transforms (forward-mode
            # probes, vmap) run through the whole model.
            cond_mask = conditioner_disk_mask(points, valid, self.cond_radius, p, G,
                                              reference=self.config["backend"] == "reference")  # [B, M, G, G]
        else:
            cond_mask = valid  # [B, M] key-padding mask
        rope = None
        if self.rope:
            wavelengths = self.rope_wavelengths.to(dtype)
            rope = (rope_angles(grid.reshape(1, G * G, 2), wavelengths), rope_angles(points, wavelengths))
        for block in self.blocks:
            h = block(h, emb, cond, cond_mask, rope)
        f = self.out(self.out_norm(h).permute(0, 3, 1, 2))  # [B, C, S, S] (from [B, C', G, G])
        return c_skip[:, None, None, None] * x + c_out[:, None, None, None] * f.to(x.dtype)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
