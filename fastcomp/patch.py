"""Swap other libraries' layers for fastcomp's in a model you already have, in place, keeping the weights
(as Liger-Kernel's ``apply_liger_kernel_to_*`` does for LLMs).

    import fastcomp.patch
    n = fastcomp.patch.replace_natten(model)    # every natten.NeighborhoodAttention2D fastcomp can run

diffusers pipelines have their own helpers in ``fastcomp.integrations.diffusers``.
"""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from .nn.attention import NeighborhoodAttention2D

NATTEN_INSTALL = "pip install --no-build-isolation natten==0.21.7"


def _import_natten():
    try:
        import natten
    except ImportError as e:
        raise ImportError(f"fastcomp.patch.replace_natten needs NATTEN ({e}); install it after torch with "
                          f"`{NATTEN_INSTALL}` (an isolated build would pull a CUDA torch)") from e
    return natten


def replace_natten(model: nn.Module, *, backend: Optional[str] = None) -> int:
    """Replace every ``natten.NeighborhoodAttention2D`` in ``model`` by ``fastcomp.nn.NeighborhoodAttention2D``
    in place (same weights, device, dtype, train/eval mode); returns how many it replaced.

    Layers fastcomp cannot run are left alone and reported in one warning, each with the reason: NATTEN
    2-D layers with stride, dilation, causal or even windows, and every ``NeighborhoodAttention1D`` /
    ``NeighborhoodAttention3D``. A layer registered at several places is replaced by one fastcomp layer
    at all of them (weights stay shared). backend: passed to the new layers (None: the fastest that can run).
    """
    natten = _import_natten()
    if isinstance(model, natten.NeighborhoodAttention2D):
        raise ValueError("fastcomp.patch.replace_natten: the model is itself a natten.NeighborhoodAttention2D, "
                         "which cannot be replaced in place; use "
                         "fastcomp.nn.NeighborhoodAttention2D.from_natten(layer)")
    others = tuple(getattr(natten, n) for n in ("NeighborhoodAttention1D", "NeighborhoodAttention3D")
                   if hasattr(natten, n))
    replaced: dict[int, nn.Module] = {}
    left_alone: dict[str, str] = {}
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, natten.NeighborhoodAttention2D):
                if id(child) not in replaced:
                    try:
                        replaced[id(child)] = NeighborhoodAttention2D.from_natten(child, backend=backend)
                    except NotImplementedError as e:
                        left_alone[path] = str(e).removeprefix("fastcomp.nn.NeighborhoodAttention2D: ")
                        continue
                setattr(parent, child_name, replaced[id(child)])
            elif others and isinstance(child, others):
                left_alone[path] = (f"{type(child).__name__}: fastcomp implements 2-D neighborhood attention "
                                    f"only")
    if left_alone:
        lines = "\n".join(f"  {path}: {why}" for path, why in left_alone.items())
        warnings.warn(f"fastcomp.patch.replace_natten: left {len(left_alone)} NATTEN layer(s) alone, which "
                      f"keep running on NATTEN:\n{lines}", UserWarning, stacklevel=2)
    return len(replaced)


__all__ = ["replace_natten"]
