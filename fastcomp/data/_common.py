"""Pieces shared by the datasets: the batch type, argument checks, generators and object placement."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from ..ops._checks import is_int, is_real


class SceneBatch(NamedTuple):
    """A batch of images with the locations of their labelled objects.

    images: [n, C, S, S] float32 in [-1, 1] (plain background near -1; C = 1 bumps, C = 3 scenes)
    points: [n, M, 2] float32 (row, col) in pixels of the labelled objects; padding rows are 0
    valid:  [n, M] bool, False for padding rows (M = the dataset's max_objects; bumps: M = 1)
    """

    images: Tensor
    points: Tensor
    valid: Tensor


def check_int(name: str, value, *, low: int, op: str, hint: str = "") -> int:
    if not is_int(value) or value < low:
        raise ValueError(f"{op}: {name} must be an int >= {low}, got {value!r}{hint}")
    return int(value)


def check_positive(name: str, value, *, op: str) -> float:
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{op}: {name} must be a positive number, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices, *, op: str) -> str:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_generator(generator, *, op: str) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"{op}: generator must be a CPU torch.Generator (data is drawn on the CPU, then moved "
                         f"with device=...), got one on {generator.device}")


def seeded_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def capacity(span: float, separation: float) -> int:
    """Objects a square of side `span` (centre range) holds on a square lattice of pitch `separation`: an
    upper-ish bound used to refuse impossible requests up front with a clear error."""
    per_side = int(math.floor(span / separation + 1e-9)) + 1
    return per_side * per_side


def place_objects(n: int, counts: Tensor, max_count: int, *, low: float, high: float, separation: float,
                  generator: torch.Generator, op: str, candidates: int = 64, restarts: int = 50) -> Tensor:
    """Random centres, pairwise at least `separation` apart, uniform in [low, high]^2.

    counts: [n] int64 objects per scene (<= max_count). Returns [n, max_count, 2] float32 (row, col); rows
    >= counts[i] are 0. Objects are placed one at a time for the whole batch at once: each scene draws
    `candidates` positions and takes the first that keeps the separation (sequential rejection sampling,
    vectorized over the batch). A scene whose next object finds no room starts over; after `restarts`
    tries the request is called impossible.
    """
    out = torch.zeros(n, max_count, 2)
    todo = torch.arange(n)
    if n == 0 or max_count == 0:
        return out
    for _ in range(restarts):
        m = len(todo)
        pts = torch.zeros(m, max_count, 2)
        ok = torch.ones(m, dtype=torch.bool)
        need = counts[todo]
        for j in range(max_count):
            cand = low + (high - low) * torch.rand(m, candidates, 2, generator=generator)     # [m, T, 2]
            if j > 0:
                d2 = (cand[:, :, None, :] - pts[:, None, :j, :]).square().sum(-1)         # [m, T, j]
                free = (d2 >= separation * separation).all(-1)                             # [m, T]
            else:
                free = torch.ones(m, candidates, dtype=torch.bool)
            pick = free.to(torch.int8).argmax(1)                                           # [m] first free
            active = need > j
            ok &= free.any(1) | ~active
            pts[:, j] = torch.where(active[:, None], cand[torch.arange(m), pick], torch.zeros(()))
        out[todo[ok]] = pts[ok]
        todo = todo[~ok]
        if len(todo) == 0:
            return out
    raise ValueError(f"{op}: could not place {int(counts[todo].max())} objects {separation:g} px apart with "
                     f"centres in [{low:g}, {high:g}] in {restarts} tries: use fewer objects, a larger size, or "
                     f"a smaller radius")
