"""2-D Gaussian bumps (Liang et al., arXiv 2402.03305): one bump at a requested (row, col) on a small canvas,
with held-out (row-bin, col-bin) combinations for compositional generalization, and the accuracy metric."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._common import SceneBatch, check_choice, check_generator, check_int, check_positive, seeded_generator
from .detect import _components

# The default held-out cells on the 4 x 4 grid of (row-bin, col-bin): a shifted diagonal, one cell per row
# bin and one per column bin, so every row value and every column value is still seen in training (in 3 of
# its 4 cells) and only these 4 pairings are new at test time.
_DEFAULT_BINS = 4
_DEFAULT_HELD_OUT = ((0, 2), (1, 3), (2, 0), (3, 1))


class GaussianBumps:
    """One Gaussian bump per image: image = 2 * exp(-|p - centre|^2 / (2 width^2)) - 1, in [-1, 1], C = 1.

    Locations are CONTINUOUS (uniform within their cell), not on a pixel grid: the model must place the bump
    from the real-valued conditioner rather than look up one of a few hundred memorized positions, and the
    sub-pixel centres make the bump-accuracy tolerance meaningful. Centres stay `margin` = ceil(2 width)
    pixels from the border so the bump is not cut off.

    Compositional split: the centre range is cut into `bins` x `bins` cells of (row-bin, col-bin). `held_out`
    names the cells never drawn in the train split and the only ones drawn in the test split:
    "default" (a shifted diagonal of 4 cells on a 4 x 4 grid: every row bin and every column bin still
    appears in training, only those combinations do not), "none" (no held-out cells; test = train
    distribution), or a sequence of (row_bin, col_bin) pairs on a `bins` x `bins` grid.

    sample(n, split=...) -> SceneBatch(images [n, 1, S, S], points [n, 1, 2], valid [n, 1])
    requests(n, split=...) -> (points [n, 1, 2], valid [n, 1])  locations to ask a model for
    is_held_out(points [..., 2]) -> bool [...]
    """

    def __init__(self, size: int = 32, width: float = 1.5, held_out: Union[str, Sequence[Tuple[int, int]]] = "default",
                 seed: int = 0, *, bins: int = _DEFAULT_BINS):
        op = "GaussianBumps"
        self.size = check_int("size", size, low=8, op=op)
        self.width = check_positive("width", width, op=op)
        self.bins = check_int("bins", bins, low=1, op=op)
        self.seed = check_int("seed", seed, low=0, op=op)
        self.margin = float(math.ceil(2 * self.width))
        self.low, self.high = self.margin, self.size - 1 - self.margin
        if self.high - self.low < self.bins:
            raise ValueError(f"{op}: size {size} leaves no room for {bins} bins of centres with width {width} "
                             f"(margin {self.margin:g} px each side): use a larger size or a smaller width/bins")
        if isinstance(held_out, str):
            check_choice("held_out", held_out, ("default", "none"), op=op)
            if held_out == "default":
                if self.bins != _DEFAULT_BINS:
                    raise ValueError(f"{op}: held_out='default' is defined on a {_DEFAULT_BINS}x{_DEFAULT_BINS} "
                                     f"grid, got bins={bins}: pass held_out as a list of (row_bin, col_bin)")
                cells = list(_DEFAULT_HELD_OUT)
            else:
                cells = []
        else:
            try:
                cells = [(int(r), int(c)) for r, c in held_out]
            except (TypeError, ValueError):
                raise ValueError(f"{op}: held_out must be 'default', 'none' or a list of (row_bin, col_bin) "
                                 f"pairs, got {held_out!r}") from None
            for r, c in cells:
                if not (0 <= r < self.bins and 0 <= c < self.bins):
                    raise ValueError(f"{op}: held-out cell ({r}, {c}) is outside the {bins}x{bins} grid")
        mask = torch.zeros(self.bins, self.bins, dtype=torch.bool)
        for r, c in cells:
            mask[r, c] = True
        if bool(mask.all()):
            raise ValueError(f"{op}: held_out covers every cell: leave at least one for training")
        self.held_out_cells = mask                                       # [bins, bins] bool
        self._generator = seeded_generator(self.seed)

    def __repr__(self) -> str:
        cells = [tuple(c) for c in self.held_out_cells.nonzero().tolist()]
        return (f"GaussianBumps(size={self.size}, width={self.width:g}, bins={self.bins}, held_out={cells}, "
                f"seed={self.seed})")

    # --- locations ---------------------------------------------------------------------------------------

    def _bin(self, coord: Tensor) -> Tensor:
        cell = (self.high - self.low) / self.bins
        return ((coord - self.low) / cell).floor().clamp(0, self.bins - 1).long()

    def is_held_out(self, points: Tensor) -> Tensor:
        """points [..., 2] (row, col) -> bool [...]: is the (row-bin, col-bin) combination held out?"""
        if not isinstance(points, Tensor) or points.dim() < 1 or points.shape[-1] != 2:
            raise ValueError(f"GaussianBumps.is_held_out: points must be a tensor [..., 2] of (row, col), got "
                             f"{tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__}")
        rb, cb = self._bin(points[..., 0].float().cpu()), self._bin(points[..., 1].float().cpu())
        return self.held_out_cells[rb, cb].to(points.device)

    def _locations(self, n: int, split: str, generator: Optional[torch.Generator], op: str) -> Tensor:
        check_int("n", n, low=0, op=op)
        check_choice("split", split, ("train", "test"), op=op)
        check_generator(generator, op=op)
        g = self._generator if generator is None else generator
        held = self.held_out_cells.flatten()
        if split == "train":
            allowed = (~held).nonzero().flatten()
        else:
            # No held-out cells: the test split is the training distribution.
            allowed = held.nonzero().flatten() if bool(held.any()) else torch.arange(held.numel())
        cell = allowed[torch.randint(len(allowed), (n,), generator=g)]      # [n] flat cell index
        offset = torch.rand(n, 2, generator=g)                               # [n, 2] position inside cell
        width = (self.high - self.low) / self.bins
        rc = torch.stack([cell // self.bins, cell % self.bins], -1).float()  # [n, 2] (row_bin, col_bin)
        return self.low + (rc + offset) * width                              # [n, 2]

    def requests(self, n: int, *, split: str = "test", generator: Optional[torch.Generator] = None,
                 device=None) -> Tuple[Tensor, Tensor]:
        """Locations to ask a model for: points [n, 1, 2] float32 (row, col), valid [n, 1] bool (all True)."""
        pts = self._locations(n, split, generator, "GaussianBumps.requests")
        return pts[:, None, :].to(device), torch.ones(n, 1, dtype=torch.bool, device=device)

    def render(self, points: Tensor) -> Tensor:
        """points [n, 2] or [n, 1, 2] (row, col) -> images [n, 1, S, S] float32 in [-1, 1]."""
        pts = points.reshape(-1, 2).float()
        ax = torch.arange(self.size, dtype=torch.float32, device=pts.device)
        d2 = (ax[None, :, None] - pts[:, 0, None, None]).square() + (ax[None, None, :] - pts[:, 1, None, None]).square()
        return (2.0 * torch.exp(-d2 / (2 * self.width ** 2)) - 1.0)[:, None]

    def sample(self, n: int, *, split: str = "train", generator: Optional[torch.Generator] = None,
               device=None) -> SceneBatch:
        """n images with one bump each, centres drawn from the split's cells: SceneBatch(images [n, 1, S, S],
        points [n, 1, 2], valid [n, 1]). generator=None draws from the dataset's own seeded stream."""
        pts = self._locations(n, split, generator, "GaussianBumps.sample")
        images = self.render(pts)
        return SceneBatch(images.to(device), pts[:, None, :].to(device),
                          torch.ones(n, 1, dtype=torch.bool, device=device))


class BumpAccuracy(NamedTuple):
    """accuracy: fraction correct; correct [n] bool (exactly one bump, within tolerance); num_bumps [n] int64;
    error [n] float32: distance (px) from the request to the nearest bump (inf when there is none)."""

    accuracy: float
    correct: Tensor
    num_bumps: Tensor
    error: Tensor


def bump_accuracy(images: Tensor, points: Tensor, *, tolerance: float = 2.0, threshold: float = 0.0,
                  min_area: int = 2) -> BumpAccuracy:
    """Liang et al.'s metric: a sample is correct when it holds exactly one bump and that bump lies within
    `tolerance` pixels of the requested place.

    images: [n, 1, S, S] (or [n, S, S]) in [-1, 1]; points: [n, 2] or [n, 1, 2] (row, col) requested.
    Bumps are connected components (4-connectivity) of pixels above `threshold` (0 = halfway between the
    background -1 and a bump's peak 1) with at least `min_area` pixels (drops specks of sampling noise);
    a bump's position is its intensity-weighted centroid. Counting components rather than local maxima keeps
    one noisy bump from counting as several.
    """
    op = "bump_accuracy"
    if not isinstance(images, Tensor) or images.dim() not in (3, 4) or (images.dim() == 4 and images.shape[1] != 1):
        raise ValueError(f"{op}: images must be [n, 1, S, S] or [n, S, S], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    imgs = images if images.dim() == 3 else images[:, 0]
    n = imgs.shape[0]
    if not isinstance(points, Tensor) or points.shape not in ((n, 2), (n, 1, 2)):
        raise ValueError(f"{op}: points must be [n, 2] or [n, 1, 2] with n = {n} (one request per image), got "
                         f"{tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__}")
    check_positive("tolerance", tolerance, op=op)
    check_int("min_area", min_area, low=1, op=op)
    imgs = imgs.detach().float()
    # Weight: height above the threshold, so the centroid follows the bump's peak.
    weight = imgs - threshold                                              # [n, S, S]
    cents, owner = _components(weight > 0, weight.clamp_min(0), min_area)   # [K, 2], [K]
    req = points.reshape(n, 2).detach().float().to(imgs.device)
    num = torch.bincount(owner, minlength=n)                                 # [n]
    error = torch.full((n,), float("inf"), device=imgs.device)
    if len(owner):
        d = (cents - req[owner]).norm(dim=-1)                               # [K]
        error = error.scatter_reduce(0, owner, d, reduce="amin")
    correct = (num == 1) & (error <= tolerance)
    acc = float(correct.float().mean()) if n else float("nan")
    return BumpAccuracy(acc, correct.cpu(), num.cpu(), error.cpu())
