"""disk_mask's cpu backend: the C++ kernel of csrc/disk_mask/disk_mask_cpu.cpp."""

from __future__ import annotations

from .library import extension_args


def compute(points, radius, H, W):
    from ... import _build

    points, out = extension_args(points, H, W)
    _build.load("disk_mask").disk_mask_cpu(points, radius, out)
    return out
