"""fastcomp inside diffusers models: attention processors for the ``Attention`` layers of a UNet or a 2-D
transformer (UNet2DConditionModel, Transformer2DModel, PixArtTransformer2DModel, DiT, ...).

    from fastcomp.integrations.diffusers import (apply_neighborhood_attention,
                                                 apply_regional_cross_attention, restore_attention)
    apply_neighborhood_attention(pipe.unet, kernel_size=7)    # self-attention in a 7x7 token window
    apply_regional_cross_attention(pipe.unet, cond_mask)       # token m only where cond_mask[:, m] is true
    restore_attention(pipe.unet)                               # the original processors again

- ``NeighborhoodAttnProcessor(kernel_size)``: self-attention over a 2-D window of the layer's token grid,
  on ``fastcomp.local_conditional_attention`` (one softmax, differentiable). A layer whose grid the
  window covers entirely runs its original processor: full attention, exactly the original.
- ``RegionalCrossAttnProcessor(cond_mask)``: cross-attention in which each pixel attends only the encoder
  tokens whose region covers it (``cond_mask [B, M, H, W]`` bool, at any resolution, resized to each
  layer's grid): the local-conditional-score intervention of Bradley (arXiv 2509.16447) applied to a
  pretrained pipeline. A pixel no region covers gets no cross-attention (the attention output is zero
  there; the output projection's bias remains). Where the mask is true everywhere the layer runs its
  original processor.

Every layer learns its token grid from the model: the apply functions hook each module that turns a
[B, C, H, W] input into tokens (a Transformer2DModel sees an H x W grid, or H/p x W/p with patches; a
PixArt or DiT transformer H/p x W/p), and layers that get [B, C, H, W] themselves (UNet2DModel's
attention blocks) read it from their input. No grid is passed by the user.

diffusers is imported by the caller, never here: these work on any model built of diffusers' ``Attention``.
"""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import local_conditional_attention

KernelSize = Union[int, tuple[int, int]]

# Processors these replace: diffusers' plain attention (SDPA, or the explicit softmax when scale_qk is off).
_PLAIN_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
_ORIGINAL = "_fastcomp_original_processor"  # attribute of a patched Attention layer
_GRID = "_fastcomp_grid"  # (rows, cols) of the layer's tokens, set by its grid owner's hook
_HOOK = "_fastcomp_grid_hook"  # attribute of a grid owner: its forward pre-hook's handle


# --- which layer sees which grid ---------------------------------------------------------------------

def _is_attention(module: nn.Module) -> bool:
    """diffusers' Attention (and its look-alikes): a processor and the projections the processors use."""
    return all(hasattr(module, a) for a in ("set_processor", "get_processor", "to_q", "to_k", "to_v",
                                            "to_out", "heads", "is_cross_attention"))


def _grid_patch(module: nn.Module) -> Optional[int]:
    """The patch size p if ``module`` turns a [B, C, H, W] input into the (H / p) x (W / p) tokens its
    attention layers see, else None."""
    if hasattr(module, "is_input_continuous"):  # Transformer2DModel
        if module.is_input_continuous:
            return 1
        if getattr(module, "is_input_patches", False):
            return int(module.patch_size)
        return None  # vectorized (discrete) inputs: a token sequence, no image grid
    config = getattr(module, "config", None)
    patch = getattr(config, "patch_size", None) if config is not None else None
    if isinstance(patch, int) and hasattr(module, "pos_embed"):  # PixArt, DiT
        return patch
    return None


def _grid_owners(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    return {name: (m, p) for name, m in model.named_modules() if (p := _grid_patch(m)) is not None}


def _owner_of(name: str, owners: dict) -> Optional[str]:
    """The innermost grid owner above the module called ``name``."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in owners:
            return prefix
    return None


def _install_grid_hook(owner: nn.Module, patch: int, layers: list[nn.Module]) -> None:
    """Before each forward of ``owner``, tell its attention layers their grid (from the input's H, W)."""
    old = getattr(owner, _HOOK, None)
    if old is not None:
        old.remove()

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            grid = (x.shape[-2] // patch, x.shape[-1] // patch)
            for layer in layers:
                setattr(layer, _GRID, grid)

    setattr(owner, _HOOK, owner.register_forward_pre_hook(hook, with_kwargs=True))


def _patch(model: nn.Module, processor, cross: bool) -> int:
    """Set ``processor`` on the matching attention layers of ``model``; returns how many."""
    owners = _grid_owners(model)
    count, skipped = 0, []
    for name, layer in model.named_modules():
        if not _is_attention(layer) or bool(layer.is_cross_attention) != cross:
            continue
        # Outside any grid owner only UNet2DModel-style blocks (residual, [B, C, H, W] in) have a grid.
        if _owner_of(name, owners) is None and (cross or not getattr(layer, "residual_connection", False)):
            continue
        current = getattr(layer, _ORIGINAL, None) or layer.get_processor()
        if type(current).__name__ not in _PLAIN_PROCESSORS:
            skipped.append(f"{name} ({type(current).__name__})")
            continue
        setattr(layer, _ORIGINAL, current)
        layer.set_processor(processor)
        count += 1
    # One hook per owner serves both processors: (re)installed with every patched layer it owns.
    owned: dict[str, list[nn.Module]] = {}
    for name, layer in model.named_modules():
        owner = _owner_of(name, owners) if hasattr(layer, _ORIGINAL) else None
        if owner is not None:
            owned.setdefault(owner, []).append(layer)
    for owner, layers in owned.items():
        _install_grid_hook(*owners[owner], layers)
    if skipped:
        warnings.warn(f"fastcomp: left {len(skipped)} attention layer(s) with processors other than diffusers' "
                      f"plain ones alone: {', '.join(skipped)}", UserWarning, stacklevel=3)
    return count


def apply_neighborhood_attention(model: nn.Module, kernel_size: KernelSize, *,
                                 backend: Optional[str] = None) -> int:
    """Set a ``NeighborhoodAttnProcessor(kernel_size)`` on every self-attention layer of a diffusers UNet
    or 2-D transformer that sees a token grid; returns how many layers it set."""
    return _patch(model, NeighborhoodAttnProcessor(kernel_size, backend=backend), cross=False)


def apply_regional_cross_attention(model: nn.Module, cond_mask: torch.Tensor) -> int:
    """Set a ``RegionalCrossAttnProcessor(cond_mask)`` on every cross-attention layer of a diffusers UNet
    or 2-D transformer that sees a token grid; returns how many layers it set."""
    return _patch(model, RegionalCrossAttnProcessor(cond_mask), cross=True)


def restore_attention(model: nn.Module) -> int:
    """Undo both apply functions: every patched layer gets its original processor back and the grid hooks
    go; returns how many layers it restored."""
    count = 0
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            module.set_processor(getattr(module, _ORIGINAL))
            delattr(module, _ORIGINAL)
            if hasattr(module, _GRID):
                delattr(module, _GRID)
            count += 1
        handle = getattr(module, _HOOK, None)
        if handle is not None:
            handle.remove()
            delattr(module, _HOOK)
    return count


# --- the processors ----------------------------------------------------------------------------------

def _layer_name(attn: nn.Module) -> str:
    return f"{type(attn).__name__}(heads={attn.heads})"


def _tokens(attn, hidden_states, temb):
    """diffusers' input handling: (normalized tokens [B, N, C], grid from a 4-D input or None, the input
    shape to restore, the residual)."""
    residual = hidden_states
    if getattr(attn, "spatial_norm", None) is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape, grid = hidden_states.shape, None
    if hidden_states.dim() == 4:
        B, C, H, W = shape
        hidden_states = hidden_states.view(B, C, H * W).transpose(1, 2)
        grid = (H, W)
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, grid, shape, residual


def _finish(attn, out, shape, residual):
    """diffusers' output handling: projection, dropout, back to [B, C, H, W], residual, rescale."""
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if len(shape) == 4:
        out = out.transpose(-1, -2).reshape(shape)
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / attn.rescale_output_factor


def _heads(attn, x: torch.Tensor, norm) -> torch.Tensor:
    """[B, N, heads * D] -> [B, N, heads, D], with the layer's q/k norm over D."""
    x = x.unflatten(-1, (attn.heads, x.shape[-1] // attn.heads))
    return x if norm is None else norm(x)


def _grid_of(attn, grid, n_tokens: int, who: str) -> tuple[int, int]:
    grid = grid or getattr(attn, _GRID, None)
    if grid is None:
        raise RuntimeError(f"{who}: this {_layer_name(attn)} layer does not know its token grid; set the "
                           f"processor with fastcomp.integrations.diffusers.apply_neighborhood_attention / "
                           f"apply_regional_cross_attention (they learn each layer's grid from the model), "
                           f"not with set_attn_processor")
    if grid[0] * grid[1] != n_tokens:
        raise RuntimeError(f"{who}: the layer sees {n_tokens} tokens, not the {grid[0]} x {grid[1]} grid of its "
                           f"model's input; it mixes image tokens with others (e.g. text), which a 2-D window "
                           f"or region cannot place")
    return grid


def _original(attn):
    original = getattr(attn, _ORIGINAL, None)
    if original is None:
        from diffusers.models.attention_processor import AttnProcessor2_0  # optional peer: only its models get here

        original = AttnProcessor2_0()
    return original


class NeighborhoodAttnProcessor:
    """Self-attention over a kh x kw window of the layer's token grid (NATTEN's window rule: centred,
    shifted inwards at the borders), with fastcomp's fused kernel.

    kernel_size: odd int or (kh, kw). On a grid smaller than the window along an axis, the window spans
    that axis (it must then be odd there); a layer whose grid the window covers entirely runs its original
    processor (full attention, exactly). backend: fastcomp backend name (None: the fastest that can run).
    Set it with ``apply_neighborhood_attention``, which tells each layer its grid.
    """

    def __init__(self, kernel_size: KernelSize, *, backend: Optional[str] = None):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 or k % 2 == 0 for k in (kh, kw)):
            raise ValueError(f"NeighborhoodAttnProcessor: kernel_size must be an odd int >= 1 or a pair of "
                             f"them, got {kernel_size!r}")
        self.kernel_size, self.backend = (kh, kw), backend

    def __repr__(self) -> str:
        return f"NeighborhoodAttnProcessor(kernel_size={self.kernel_size})"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None:  # a cross-attention call: not ours to change
            return _original(attn)(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                   attention_mask=attention_mask, temb=temb)
        shape = hidden_states.shape
        n_tokens = shape[-2] * shape[-1] if hidden_states.dim() == 4 else shape[1]
        grid = _grid_of(attn, tuple(shape[-2:]) if hidden_states.dim() == 4 else None, n_tokens, repr(self))
        (kh, kw), (gh, gw) = self.kernel_size, grid
        if kh >= gh and kw >= gw:  # the window is the whole grid: the original, exactly
            return _original(attn)(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                   attention_mask=attention_mask, temb=temb)
        if attention_mask is not None:
            raise NotImplementedError(f"{self!r}: this self-attention layer got an attention_mask; a windowed "
                                      f"layer cannot combine it with its window (restore_attention(model) "
                                      f"or drop the mask)")
        window = (min(kh, gh), min(kw, gw))
        if window[0] % 2 == 0 or window[1] % 2 == 0:
            raise ValueError(f"{self!r}: on this layer's {gh} x {gw} token grid the window would span an even "
                             f"side ({window[0]} x {window[1]}), but fastcomp's windows are odd; pick a "
                             f"kernel_size at most {gh - 1 if gh % 2 == 0 else gh} x "
                             f"{gw - 1 if gw % 2 == 0 else gw} or covering the whole grid")

        x, _, shape, residual = _tokens(attn, hidden_states, temb)
        B = x.shape[0]
        q = _heads(attn, attn.to_q(x), getattr(attn, "norm_q", None))
        k = _heads(attn, attn.to_k(x), getattr(attn, "norm_k", None))
        v = _heads(attn, attn.to_v(x), None)
        heads, D = q.shape[-2:]
        out = local_conditional_attention(q.reshape(B, gh, gw, heads, D), k.reshape(B, gh, gw, heads, D),
                                          v.reshape(B, gh, gw, heads, D), window, scale=attn.scale,
                                          backend=self.backend)
        return _finish(attn, out.reshape(B, gh * gw, heads * D).to(q.dtype), shape, residual)


class RegionalCrossAttnProcessor:
    """Cross-attention in which pixel (i, j) attends encoder token m only where cond_mask[b, m, i, j].

    cond_mask: [B, M, H, W] bool at any resolution (the image's, the latent's); each layer sees it resized
    to its grid (a token cell is inside a region if any mask pixel in it is). M must match the encoder's
    tokens; a batch that is a multiple of B (classifier-free guidance doubles it) reuses the mask for
    each part. Set ``processor.cond_mask`` to change it between calls.
    """

    def __init__(self, cond_mask: torch.Tensor):
        self.cond_mask = cond_mask

    @property
    def cond_mask(self) -> torch.Tensor:
        return self._cond_mask

    @cond_mask.setter
    def cond_mask(self, cond_mask: torch.Tensor) -> None:
        if not isinstance(cond_mask, torch.Tensor) or cond_mask.dim() != 4 or cond_mask.dtype != torch.bool:
            raise TypeError(f"RegionalCrossAttnProcessor: cond_mask must be a bool tensor [B, M, H, W], got "
                            f"{type(cond_mask).__name__}"
                            + (f" {cond_mask.dtype} {list(cond_mask.shape)}" if isinstance(cond_mask, torch.Tensor)
                               else ""))
        self._cond_mask = cond_mask
        self._resized: dict = {}  # (grid, device) -> (allowed [B, N, M], everywhere true?)

    def __repr__(self) -> str:
        return f"RegionalCrossAttnProcessor(cond_mask={list(self._cond_mask.shape)})"

    def allowed(self, grid: tuple[int, int], device) -> tuple[torch.Tensor, bool]:
        """(allowed [B, gh * gw, M] bool: may token cell n attend encoder token m, all true?), cached."""
        key = (grid, str(device))
        if key not in self._resized:
            mask = F.adaptive_max_pool2d(self._cond_mask.to(device=device, dtype=torch.float32), grid) > 0
            allowed = mask.flatten(2).transpose(1, 2).contiguous()  # [B, N, M]
            self._resized[key] = (allowed, bool(allowed.all()))  # one host sync per grid, not per call
        return self._resized[key]

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None:  # a self-attention call: not ours to change
            return _original(attn)(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                   attention_mask=attention_mask, temb=temb)
        shape = hidden_states.shape
        n_tokens = shape[-2] * shape[-1] if hidden_states.dim() == 4 else shape[1]
        grid = _grid_of(attn, tuple(shape[-2:]) if hidden_states.dim() == 4 else None, n_tokens, repr(self))
        allowed, everywhere = self.allowed(grid, hidden_states.device)
        B, M = shape[0], encoder_hidden_states.shape[1]
        if allowed.shape[2] != M:
            raise ValueError(f"{self!r}: cond_mask has M = {allowed.shape[2]} regions but the layer gets M = {M} "
                             f"encoder tokens; give one region per encoder token")
        if B % allowed.shape[0]:
            raise ValueError(f"{self!r}: the layer's batch of {B} is not a multiple of cond_mask's {allowed.shape[0]}")
        if everywhere:  # every pixel sees every token: the original, exactly
            return _original(attn)(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                   attention_mask=attention_mask, temb=temb)
        allowed = allowed.repeat(B // allowed.shape[0], 1, 1)  # [B, N, M]

        x, _, shape, residual = _tokens(attn, hidden_states, temb)
        if getattr(attn, "norm_cross", None):
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        q = _heads(attn, attn.to_q(x), getattr(attn, "norm_q", None)).transpose(1, 2)  # [B, heads, N, D]
        k = _heads(attn, attn.to_k(encoder_hidden_states), getattr(attn, "norm_k", None)).transpose(1, 2)
        v = _heads(attn, attn.to_v(encoder_hidden_states), None).transpose(1, 2)
        # A pixel no region covers attends every token (so its softmax is finite, also in the backward)
        # and its output is zeroed afterwards: it gets no cross-attention at all.
        empty = ~allowed.any(dim=-1, keepdim=True)  # [B, N, 1]
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~(allowed | empty),
                                                                                        float("-inf"))
        bias = bias[:, None]  # [B, 1, N, M]
        if attention_mask is not None:  # diffusers' additive mask over encoder tokens
            attention_mask = attn.prepare_attention_mask(attention_mask, M, B)
            bias = bias + attention_mask.view(B, attn.heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)  # [B, heads, N, D]
        out = out.masked_fill(empty[:, None], 0.0).transpose(1, 2).flatten(2).to(q.dtype)
        return _finish(attn, out, shape, residual)


__all__ = ["NeighborhoodAttnProcessor", "RegionalCrossAttnProcessor", "apply_neighborhood_attention",
           "apply_regional_cross_attention", "restore_attention"]
