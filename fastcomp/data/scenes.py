"""Shape scenes ("mini-CLEVR", after Bradley arXiv 2509.16447): 1..N coloured discs and squares on a plain
background, conditioned on the objects' centres, and well-separated request locations for evaluation."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._common import (SceneBatch, capacity, check_choice, check_generator, check_int, check_positive,
                      place_objects, seeded_generator)

BACKGROUND = -1.0
# Saturated colours in [-1, 1] RGB: each differs from the black background by 2 in at least one channel and
# from every other colour by 2 in at least one channel, so shapes are unambiguous even after blur.
COLORS = torch.tensor([
    [1.0, -1.0, -1.0],   # red
    [-1.0, 1.0, -1.0],   # green
    [-1.0, -1.0, 1.0],   # blue
    [1.0, 1.0, -1.0],    # yellow
    [1.0, -1.0, 1.0],    # magenta
    [-1.0, 1.0, 1.0],    # cyan
])
SHAPES = ("disc", "square")


def _centre_range(size: int, radius: float) -> Tuple[float, float]:
    # Anti-aliased coverage reaches 0 at radius + 0.5 from the centre: a centre radius - 0.5 from the edge
    # puts that zero on the pixel just outside the canvas, so no object is clipped.
    return radius - 0.5, size - 0.5 - radius


def default_separation(radius: float) -> float:
    """Minimum centre distance: two radius-r objects' half-coverage outlines (a square's corner reaches
    ~1.15 r) stay >= 1.5 px apart in every direction, so no pixel of one is 4-adjacent to a pixel of the
    other and connected components never merge; 10 objects still fit a 32x32 canvas at radius 3."""
    return 2.0 * radius + 2.0


def render_shapes(points: Tensor, valid: Tensor, color: Tensor, shape: Tensor, *, size: int,
                  radius: float) -> Tensor:
    """Draw objects: points [n, M, 2] (row, col), valid [n, M] bool, color [n, M] (index into COLORS),
    shape [n, M] (0 disc, 1 square) -> images [n, 3, size, size] float32 in [-1, 1].

    Edges are anti-aliased (coverage falls from 1 to 0 over one pixel) so a shape's weighted centroid is
    its sub-pixel centre. A square has the disc's area (half side radius * sqrt(pi) / 2).
    """
    n, M = valid.shape
    points = points.float()
    ax = torch.arange(size, dtype=torch.float32, device=points.device)
    dr = (ax.view(1, 1, size, 1) - points[..., 0, None, None]).abs()      # [n, M, S, 1]
    dc = (ax.view(1, 1, 1, size) - points[..., 1, None, None]).abs()      # [n, M, 1, S]
    disc = (radius + 0.5 - torch.sqrt(dr * dr + dc * dc)).clamp(0, 1)      # [n, M, S, S]
    half = radius * math.sqrt(math.pi) / 2
    square = (half + 0.5 - dr).clamp(0, 1) * (half + 0.5 - dc).clamp(0, 1)  # [n, M, S, S]
    cover = torch.where(shape[..., None, None] == 1, square, disc) * valid[..., None, None]
    tint = COLORS.to(points.device)[color] - BACKGROUND                                      # [n, M, 3]
    img = BACKGROUND + torch.einsum("nmhw,nmc->nchw", cover, tint)
    return img.clamp(-1.0, 1.0)


class ShapeScenes:
    """1..N coloured discs/squares (radius ~`radius` px) on a black background, C = 3, non-overlapping
    (centres at least 2 radius + 2 px apart, so detection is unambiguous).

    labelling="all": every object's centre is in points (Bradley's experiment 1);
    labelling="one": one object chosen uniformly at random is labelled, the rest are padding (experiment 2).
    sample(n) -> SceneBatch(images [n, 3, S, S], points [n, max_objects, 2], valid [n, max_objects]); the
    object count is uniform in [min_objects, max_objects], colours and shapes uniform. Vectorized over the
    batch; deterministic given the generator (None = the dataset's own stream seeded by `seed`).
    """

    def __init__(self, size: int = 32, min_objects: int = 1, max_objects: int = 3, labelling: str = "all",
                 radius: float = 3, seed: int = 0):
        op = "ShapeScenes"
        self.size = check_int("size", size, low=4, op=op)
        self.min_objects = check_int("min_objects", min_objects, low=0, op=op)
        self.max_objects = check_int("max_objects", max_objects, low=1, op=op)
        if min_objects > max_objects:
            raise ValueError(f"{op}: min_objects ({min_objects}) must be <= max_objects ({max_objects})")
        self.labelling = check_choice("labelling", labelling, ("all", "one"), op=op)
        if labelling == "one" and min_objects == 0:
            raise ValueError(f"{op}: labelling='one' labels one object per scene, so min_objects must be >= 1")
        self.radius = check_positive("radius", radius, op=op)
        self.seed = check_int("seed", seed, low=0, op=op)
        self.separation = default_separation(self.radius)
        self.low, self.high = _centre_range(self.size, self.radius)
        _check_room(self.max_objects, self.size, self.radius, self.separation, op)
        self._generator = seeded_generator(self.seed)

    def __repr__(self) -> str:
        return (f"ShapeScenes(size={self.size}, min_objects={self.min_objects}, max_objects={self.max_objects}, "
                f"labelling={self.labelling!r}, radius={self.radius:g}, seed={self.seed})")

    def sample(self, n: int, *, generator: Optional[torch.Generator] = None, device=None) -> SceneBatch:
        op = "ShapeScenes.sample"
        check_int("n", n, low=0, op=op)
        check_generator(generator, op=op)
        g = self._generator if generator is None else generator
        M = self.max_objects
        counts = torch.randint(self.min_objects, M + 1, (n,), generator=g)               # [n]
        pts = place_objects(n, counts, M, low=self.low, high=self.high, separation=self.separation,
                            generator=g, op=op)                                           # [n, M, 2]
        present = torch.arange(M)[None, :] < counts[:, None]                               # [n, M]
        color = torch.randint(len(COLORS), (n, M), generator=g)
        shape = torch.randint(len(SHAPES), (n, M), generator=g)
        images = render_shapes(pts, present, color, shape, size=self.size, radius=self.radius)
        if self.labelling == "all":
            points, valid = pts, present
        else:
            pick = (torch.rand(n, generator=g) * counts).long().clamp_max(M - 1)          # [n] labelled object
            points = torch.zeros_like(pts)
            points[:, 0] = pts[torch.arange(n), pick]
            valid = torch.zeros(n, M, dtype=torch.bool)
            valid[:, 0] = True
        return SceneBatch(images.to(device), points.to(device), valid.to(device))


def _check_room(num: int, size: int, radius: float, separation: float, op: str) -> None:
    low, high = _centre_range(size, radius)
    if high < low:
        raise ValueError(f"{op}: size {size} is too small for objects of radius {radius:g}: use size >= "
                         f"{math.ceil(2 * radius)}")
    cap = capacity(high - low, separation)
    if num > cap:
        raise ValueError(f"{op}: size {size} is too small for {num} objects of radius {radius:g} (centres "
                         f"{separation:g} px apart fit at most {cap}): use a larger size or fewer objects")


def request_locations(n: int, num_objects: int, *, size: int = 32, max_objects: Optional[int] = None,
                      radius: float = 3, generator: Optional[torch.Generator] = None,
                      device=None) -> Tuple[Tensor, Tensor]:
    """Well-separated random locations to ask a model for `num_objects` objects (0..~10 at 32x32).

    Returns points [n, max(max_objects, num_objects), 2] float32 (row, col) and valid [n, same] bool with
    the first num_objects rows valid and the rest zero padding (so requests batch with a dataset's M rows).
    Locations follow the ShapeScenes rules (centres inside the canvas, >= 2 radius + 2 px apart), so a
    correct generation is detectable object by object. Placement is rejection sampling with restarts:
    ~10 objects at 32x32 (near the jamming limit) take a few ms per scene. generator=None uses torch's global RNG.
    """
    op = "request_locations"
    check_int("n", n, low=0, op=op)
    check_int("num_objects", num_objects, low=0, op=op)
    check_int("size", size, low=4, op=op)
    if max_objects is not None:
        check_int("max_objects", max_objects, low=0, op=op)
    check_positive("radius", radius, op=op)
    check_generator(generator, op=op)
    M = max(max_objects or 0, num_objects)
    sep = default_separation(radius)
    low, high = _centre_range(size, radius)
    _check_room(num_objects, size, radius, sep, op)
    if generator is None:
        generator = seeded_generator(int(torch.randint(2 ** 62, (1,)).item()))
    pts = torch.zeros(n, M, 2)
    if num_objects:
        pts[:, :num_objects] = place_objects(n, torch.full((n,), num_objects), num_objects, low=low, high=high,
                                             separation=sep, generator=generator, op=op, candidates=128,
                                             restarts=200)
    valid = (torch.arange(M)[None, :] < num_objects).expand(n, M).clone()
    return pts.to(device), valid.to(device)
