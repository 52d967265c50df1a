"""Attention layers on fastcomp.local_conditional_attention: [B, H, W, C] in, [B, H, W, C] out."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..ops.attention import local_conditional_attention

KernelSize = Union[int, tuple[int, int]]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., heads * D] -> [..., heads, D]."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


class LocalConditionalAttention(nn.Module):
    """Windowed self-attention over image tokens plus masked cross-attention to conditioner tokens, in one
    softmax (replaces a self-attention + cross-attention pair in a DiT/U-Net block).

    dim: channels of x; num_heads divides dim; kernel_size: odd int or (kh, kw) window;
    cond_dim: channels of the conditioner tokens (default dim). backend: passed to the op (None = best).

    forward(x [B, H, W, dim], cond [B, M, cond_dim] or None, cond_mask [B, M, H, W] bool or None)
    -> [B, H, W, dim]. cond_mask[b, m, i, j] says whether pixel (i, j) may attend conditioner m (None: all
    may); a conditioner whose mask is all false is padding and changes nothing.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: KernelSize, cond_dim: Optional[int] = None,
                 qkv_bias: bool = True, *, backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"LocalConditionalAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.kernel_size = dim, num_heads, kernel_size
        self.cond_dim = dim if cond_dim is None else cond_dim
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.cond_kv = nn.Linear(self.cond_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None,
                cond_mask: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"LocalConditionalAttention: x must be [B, H, W, dim={self.dim}], got {list(x.shape)}")
        q, k, v = _split_heads(self.qkv(x), 3 * self.num_heads).chunk(3, dim=-2)  # each [B, H, W, heads, D]
        cond_k = cond_v = None
        if cond is not None:
            if cond.dim() != 3 or cond.shape[0] != x.shape[0] or cond.shape[-1] != self.cond_dim:
                raise ValueError(f"LocalConditionalAttention: cond must be [B={x.shape[0]}, M, "
                                 f"cond_dim={self.cond_dim}], got {list(cond.shape)}")
            cond_k, cond_v = _split_heads(self.cond_kv(cond), 2 * self.num_heads).chunk(2, dim=-2)  # [B, M, heads, D]
        out = local_conditional_attention(q, k, v, self.kernel_size, cond_k=cond_k, cond_v=cond_v,
                                          cond_mask=cond_mask, backend=backend or self.backend)
        return self.proj(out.flatten(-2))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"cond_dim={self.cond_dim}")


def _per_axis(name: str, value, kind) -> tuple:
    """NATTEN's convention: an int (or bool) means the same for both axes, else a pair."""
    def one(v) -> bool:  # bool is an int subclass: not a size
        return isinstance(v, kind) and (kind is bool or not isinstance(v, bool))

    if one(value):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(one(v) for v in value):
        return tuple(value)
    raise TypeError(f"fastcomp.nn.NeighborhoodAttention2D: {name} must be a {kind.__name__} or a pair of "
                    f"them, got {value!r}")


class NeighborhoodAttention2D(nn.Module):
    """Drop-in for NATTEN 0.21's ``natten.NeighborhoodAttention2D`` (stride 1, dilation 1, non-causal):
    x [B, H, W, embed_dim] -> [B, H, W, embed_dim], H and W at least the kernel size.

    Same constructor as NATTEN 0.21, ``(embed_dim, num_heads, kernel_size, stride=1, dilation=1,
    is_causal=False, qkv_bias=True, qk_scale=None, proj_drop=0.0)``, and the same parameter names (qkv,
    proj), so a NATTEN model switches by changing one import (or by fastcomp.patch.replace_natten) and
    loads its state_dict unchanged. Options this kernel does not implement (stride or dilation > 1,
    causal windows, even kernel sizes) raise NotImplementedError naming the option.

    The older NATTEN keywords ``rel_pos_bias`` and ``attn_drop`` are still accepted by name (False and
    0.0 only); they are keyword-only because NATTEN 0.21 put ``stride`` where older versions had
    ``dilation``, and a positional fourth argument is ``stride`` here, as in NATTEN 0.21.
    """

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: KernelSize, stride: KernelSize = 1,
                 dilation: KernelSize = 1, is_causal: Union[bool, tuple[bool, bool]] = False,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, proj_drop: float = 0.0, *,
                 rel_pos_bias: bool = False, attn_drop: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        name = "fastcomp.nn.NeighborhoodAttention2D"
        kh, kw = _per_axis("kernel_size", kernel_size, int)
        if kh % 2 == 0 or kw % 2 == 0:
            raise NotImplementedError(f"{name}: kernel_size={kernel_size!r} has an even side; the fused kernel "
                                      f"needs odd windows (a centre pixel); use natten for even windows")
        if _per_axis("stride", stride, int) != (1, 1):
            raise NotImplementedError(f"{name}: stride={stride!r} is not supported (only stride=1, the "
                                      f"standard sliding window); use natten.NeighborhoodAttention2D for "
                                      f"strided windows")
        if _per_axis("dilation", dilation, int) != (1, 1):
            raise NotImplementedError(f"{name}: dilation={dilation!r} is not supported (only dilation=1); "
                                      f"use natten.NeighborhoodAttention2D for dilated windows")
        if _per_axis("is_causal", is_causal, bool) != (False, False):
            raise NotImplementedError(f"{name}: is_causal={is_causal!r} is not supported (only False); use "
                                      f"natten for causal windows")
        if rel_pos_bias:
            raise NotImplementedError(f"{name}: rel_pos_bias=True is not supported (the fused kernel has no "
                                      f"relative position bias); construct it with rel_pos_bias=False")
        if attn_drop > 0:
            raise NotImplementedError(f"{name}: attn_drop={attn_drop} is not supported (the fused kernel never "
                                      f"materializes attention weights to drop); use attn_drop=0.0")
        if embed_dim % num_heads != 0:
            raise ValueError(f"{name}: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.kernel_size = embed_dim, num_heads, kernel_size
        # NATTEN 0.21's attributes, so code reading them off a swapped layer keeps working.
        self.stride, self.dilation, self.is_causal = (1, 1), (1, 1), (False, False)
        self.head_dim = embed_dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_natten(cls, module: nn.Module, *, backend: Optional[str] = None) -> "NeighborhoodAttention2D":
        """This layer with the weights, options, device, dtype and train/eval mode of a NATTEN 0.21
        ``natten.NeighborhoodAttention2D``; NotImplementedError (naming the option) where the NATTEN
        layer uses one this kernel lacks."""
        layer = cls(module.embed_dim, module.num_heads, tuple(module.kernel_size), stride=tuple(module.stride),
                    dilation=tuple(module.dilation), is_causal=tuple(module.is_causal),
                    qkv_bias=module.qkv.bias is not None, qk_scale=module.scale, proj_drop=module.proj_drop.p,
                    backend=backend)
        weight = module.qkv.weight
        layer.to(device=weight.device, dtype=weight.dtype)
        layer.load_state_dict(module.state_dict())
        return layer.train(module.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"NeighborhoodAttention2D: x must be [B, H, W, embed_dim={self.embed_dim}], "
                             f"got {list(x.shape)}")
        q, k, v = _split_heads(self.qkv(x), 3 * self.num_heads).chunk(3, dim=-2)  # each [B, H, W, heads, D]
        out = local_conditional_attention(q, k, v, self.kernel_size, scale=self.scale, backend=self.backend)
        return self.proj_drop(self.proj(out.flatten(-2)))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}"
