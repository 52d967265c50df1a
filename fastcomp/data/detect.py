"""Object detection for generated scenes (background subtraction + connected components) and the
length-generalization metric (detected objects match the requested locations one-to-one)."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_int, check_positive

DEFAULT_THRESHOLD = 1.0   # half the contrast between a saturated colour channel (+1) and the background (-1)
DEFAULT_MIN_AREA = 3      # pixels; a radius-3 object covers ~28, a width-1.5 bump ~10 above half height
DEFAULT_TOLERANCE = 3.0   # pixels = the default object radius: the detected centre lies on the requested object


def _label(mask: Tensor) -> Tensor:
    """Connected components (4-connectivity) of mask [n, H, W] bool -> labels [n, H, W] int64: each
    foreground pixel gets the smallest flat index (0..H*W-1) of its component, background gets H*W.

    Iterative: every pass takes the minimum label over the 4 neighbours (propagation), then jumps each
    label to the label of the pixel it points at (pointer jumping), so a component of diameter d settles
    in O(log d)-ish passes rather than d. Vectorized over the batch; no scipy.
    """
    n, H, W = mask.shape
    big = H * W
    idx = torch.arange(big, device=mask.device).view(1, H, W).expand(n, H, W)
    lab = torch.where(mask, idx, torch.full_like(idx, big))              # [n, H, W]
    while True:
        p = F.pad(lab, (1, 1, 1, 1), value=big)                            # [n, H+2, W+2]
        nb = torch.minimum(torch.minimum(p[:, :-2, 1:-1], p[:, 2:, 1:-1]),
                           torch.minimum(p[:, 1:-1, :-2], p[:, 1:-1, 2:]))  # [n, H, W] neighbours' min
        new = torch.where(mask, torch.minimum(lab, nb), lab)
        flat = new.reshape(n, big)
        # pointer jumping: a label is a pixel index of the same component; take that pixel's label
        jumped = flat.gather(1, flat.clamp_max(big - 1)).view(n, H, W)
        new = torch.where(mask, torch.minimum(new, jumped), new)
        if torch.equal(new, lab):
            return lab
        lab = new


def _components(mask: Tensor, weight: Tensor, min_area: int) -> Tuple[Tensor, Tensor]:
    """Components of mask [n, H, W] with at least min_area pixels -> (centroids [K, 2] (row, col) weighted
    by weight [n, H, W], owner [K] int64 image index), sorted by image, then by each component's first
    pixel in raster order."""
    n, H, W = mask.shape
    lab = _label(mask)
    b, r, c = mask.nonzero(as_tuple=True)                                  # foreground pixels
    key = b * (H * W) + lab[b, r, c]                                       # [P] component key per pixel
    keys, inv = torch.unique(key, return_inverse=True)                     # sorted
    K = len(keys)
    w = weight[b, r, c].float().clamp_min(1e-12)                           # [P]
    area = torch.zeros(K, device=mask.device).index_add_(0, inv, torch.ones_like(w))
    wsum = torch.zeros(K, device=mask.device).index_add_(0, inv, w)
    pos = torch.stack([r, c], -1).float()                                  # [P, 2]
    cen = torch.zeros(K, 2, device=mask.device).index_add_(0, inv, pos * w[:, None]) / wsum[:, None]
    keep = area >= min_area
    return cen[keep], (keys[keep] // (H * W))


def _check_images(images, op: str) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{op}: images must be a float tensor [n, C, S, S], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
                         f"{'' if not isinstance(images, Tensor) or images.is_floating_point() else ' ' + str(images.dtype)}")
    return images.detach().float()


def _foreground(images: Tensor, background) -> Tensor:
    """Distance from the background colour: max over channels of |x - bg| -> [n, S, S]. background None =
    each image's per-channel median (objects cover well under half the canvas, so the median is the plain
    background even when a generated image shifts its shade)."""
    n, C = images.shape[:2]
    if background is None:
        bg = images.reshape(n, C, -1).median(-1).values[:, :, None, None]   # [n, C, 1, 1]
    else:
        bg = torch.as_tensor(background, dtype=torch.float32, device=images.device).reshape(-1)
        if bg.numel() not in (1, C):
            raise ValueError(f"detect_objects: background must be a number or {C} channel values, got "
                             f"{bg.numel()} values")
        bg = bg.view(1, -1, 1, 1)
    return (images - bg).abs().amax(1)


def detect_objects(images: Tensor, *, threshold: Optional[float] = None, min_area: Optional[int] = None,
                   background=None) -> List[Tensor]:
    """Centroids of the objects in each image.

    images: [n, C, S, S] in [-1, 1] on a plain background. A pixel is foreground when some channel is more
    than `threshold` (default 1.0, half the colour contrast) from the background colour (default: each
    image's per-channel median; or pass the known colour, a number or [C] values). Foreground pixels form
    objects by 4-connected components; components smaller than `min_area` pixels (default 3) are dropped as
    specks of sampling noise. Returns a list of n tensors [k_i, 2] float32 (row, col) centroids, each
    weighted by the pixel's distance from the background (so blurred edges pull symmetrically).
    """
    op = "detect_objects"
    imgs = _check_images(images, op)
    threshold = DEFAULT_THRESHOLD if threshold is None else check_positive("threshold", threshold, op=op)
    min_area = DEFAULT_MIN_AREA if min_area is None else check_int("min_area", min_area, low=1, op=op)
    dist = _foreground(imgs, background)                                   # [n, S, S]
    cents, owner = _components(dist > threshold, dist, min_area)
    counts = torch.bincount(owner, minlength=imgs.shape[0]).tolist()
    return list(torch.split(cents, counts))


def _max_matching(ok: List[List[bool]]) -> int:
    """Size of a maximum matching of rows to distinct columns (ok: rows x columns booleans). Kuhn's
    augmenting paths: exact, O(k^3) for the k <= ~10 objects of a scene (greedy nearest-first can miss a
    matching that exists when tolerance discs overlap)."""
    cols = len(ok[0]) if ok else 0
    match_col = [-1] * cols

    def augment(i: int, seen: List[bool]) -> bool:
        for j in range(cols):
            if ok[i][j] and not seen[j]:
                seen[j] = True
                if match_col[j] < 0 or augment(match_col[j], seen):
                    match_col[j] = i
                    return True
        return False

    return sum(augment(i, [False] * cols) for i in range(len(ok)))


def _check_requests(op: str, points, valid, n: int) -> Tensor:
    """Check points [n, M, 2] and valid [n, M] bool (None = all valid) -> valid."""
    if not isinstance(points, Tensor) or points.dim() != 3 or points.shape[0] != n or points.shape[2] != 2:
        raise ValueError(f"{op}: points must be [n, M, 2] (row, col) with n = {n}, got "
                         f"{tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__}")
    if valid is None:
        valid = torch.ones(points.shape[:2], dtype=torch.bool)
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != tuple(points.shape[:2]):
        raise ValueError(f"{op}: valid must be a bool tensor [n, M] = {list(points.shape[:2])}, got "
                         f"{(tuple(valid.shape), valid.dtype) if isinstance(valid, Tensor) else type(valid).__name__}")
    return valid


def _detect_for_requests(op: str, images, points, valid, tolerance, threshold, min_area, background):
    """The checked requests and the detections of a metric: (points [n, M, 2] and valid [n, M] on the CPU,
    the detected centroids per image, the tolerance in pixels)."""
    imgs = _check_images(images, op)
    valid = _check_requests(op, points, valid, imgs.shape[0])
    tol = DEFAULT_TOLERANCE if tolerance is None else check_positive("tolerance", tolerance, op=op)
    found = detect_objects(imgs, threshold=threshold, min_area=min_area, background=background)
    return points.detach().float().cpu(), valid.cpu(), found, tol


def _perfect_matching(ok: List[List[bool]]) -> bool:
    """Is there a matching that pairs every row with a distinct column (square boolean matrix)?"""
    return _max_matching(ok) == len(ok)


class Match(NamedTuple):
    """score: fraction of samples matched; matched [n] bool; num_detected [n] int64."""

    score: float
    matched: Tensor
    num_detected: Tensor


def length_generalization(images: Tensor, points: Tensor, valid: Optional[Tensor] = None, *,
                          tolerance: Optional[float] = None, threshold: Optional[float] = None,
                          min_area: Optional[int] = None, background=None) -> Match:
    """Fraction of samples whose detected objects match the requested locations one-to-one within
    `tolerance` pixels (default 3.0): same count, and a pairing of every request with a distinct detection
    at most `tolerance` apart (exact bipartite matching). Zero requests match only an empty image.

    images [n, C, S, S]; points [n, M, 2] (row, col) requested; valid [n, M] bool (None = all valid).
    threshold/min_area/background go to detect_objects.
    """
    pts, val, found, tol = _detect_for_requests("length_generalization", images, points, valid, tolerance,
                                                threshold, min_area, background)
    n = len(found)
    matched = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        req = pts[i][val[i]]                                               # [k, 2]
        det = found[i].cpu()                                               # [k', 2]
        if len(req) != len(det):
            continue
        ok = (torch.cdist(req, det) <= tol).tolist() if len(req) else []
        matched[i] = _perfect_matching(ok)
    num = torch.tensor([len(f) for f in found], dtype=torch.int64)
    return Match(float(matched.float().mean()) if n else float("nan"), matched, num)


class RequestRecall(NamedTuple):
    """Per sample: found [n] int64 = requests matched to distinct detections within the tolerance (a maximum
    matching), requested [n] int64, num_detected [n] int64, extras [n] = num_detected - found (objects
    nobody asked for, or asked for elsewhere)."""

    found: Tensor
    requested: Tensor
    num_detected: Tensor
    extras: Tensor

    @property
    def recall(self) -> float:
        """Fraction of all requests found at their place (NaN without requests)."""
        total = int(self.requested.sum())
        return float(self.found.sum()) / total if total else float("nan")


def request_recall(images: Tensor, points: Tensor, valid: Optional[Tensor] = None, *,
                   tolerance: Optional[float] = None, threshold: Optional[float] = None,
                   min_area: Optional[int] = None, background=None) -> RequestRecall:
    """How many requested objects were drawn at their place, and how many objects nobody asked for.

    The one-to-one score (length_generalization) is 0 for an image with one object too many; this splits
    that verdict: found = the size of a maximum matching of requests to distinct detections at most
    `tolerance` px apart, extras = detections left over. Same arguments as length_generalization.
    """
    pts, val, found_at, tol = _detect_for_requests("request_recall", images, points, valid, tolerance, threshold,
                                                   min_area, background)
    n = len(found_at)
    found = torch.zeros(n, dtype=torch.int64)
    for i in range(n):
        req, det = pts[i][val[i]], found_at[i].cpu()
        if len(req) and len(det):
            found[i] = _max_matching((torch.cdist(req, det) <= tol).tolist())
    num = torch.tensor([len(f) for f in found_at], dtype=torch.int64)
    return RequestRecall(found=found, requested=val.sum(dim=1).to(torch.int64), num_detected=num, extras=num - found)
