"""Attention layers on fastcomp.local_conditional_attention: [B, H, W, C] in, [B, H, W, C] out."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

KernelSize = Union[int, tuple[int, int]]


def local_conditional_attention(*args, **kwargs) -> torch.Tensor:
    """fastcomp.local_conditional_attention, imported on first use: fastcomp/__init__ imports nn before
    the ops (and the ops' references import fastcomp.probe), so a module-level import would be circular."""
    from ..ops.attention import local_conditional_attention as op

    return op(*args, **kwargs)


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


class NeighborhoodAttention2D(nn.Module):
    """Drop-in for NATTEN's ``natten.NeighborhoodAttention2D`` (dilation 1, non-causal, no relative
    position bias): x [B, H, W, embed_dim] -> [B, H, W, embed_dim], H and W at least the kernel size.

    Same constructor and parameter names (qkv, proj), so a NATTEN model switches by changing one import
    and loads its state_dict unchanged. Options this kernel does not implement raise NotImplementedError.
    """

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: KernelSize, dilation: int = 1,
                 is_causal: bool = False, rel_pos_bias: bool = False, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0, *,
                 backend: Optional[str] = None):
        super().__init__()
        name = "fastcomp.nn.NeighborhoodAttention2D"
        if dilation not in (1, (1, 1)):
            raise NotImplementedError(f"{name}: dilation={dilation!r} is not supported (only dilation=1); "
                                      f"use natten.NeighborhoodAttention2D for dilated windows")
        if is_causal not in (False, (False, False)):
            raise NotImplementedError(f"{name}: is_causal=True is not supported; use natten for causal windows")
        if rel_pos_bias:
            raise NotImplementedError(f"{name}: rel_pos_bias=True is not supported (the fused kernel has no "
                                      f"relative position bias); construct it with rel_pos_bias=False")
        if attn_drop > 0:
            raise NotImplementedError(f"{name}: attn_drop={attn_drop} is not supported (the fused kernel never "
                                      f"materializes attention weights to drop); use attn_drop=0.0")
        if embed_dim % num_heads != 0:
            raise ValueError(f"{name}: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.kernel_size = embed_dim, num_heads, kernel_size
        self.head_dim = embed_dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"NeighborhoodAttention2D: x must be [B, H, W, embed_dim={self.embed_dim}], "
                             f"got {list(x.shape)}")
        q, k, v = _split_heads(self.qkv(x), 3 * self.num_heads).chunk(3, dim=-2)  # each [B, H, W, heads, D]
        out = local_conditional_attention(q, k, v, self.kernel_size, scale=self.scale, backend=self.backend)
        return self.proj_drop(self.proj(out.flatten(-2)))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}"
