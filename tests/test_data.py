"""fastcomp.data: generated datasets, the object detector and the metrics (all fast, CPU)."""

from __future__ import annotations

import pytest
import torch

from fastcomp.data import (GaussianBumps, SceneBatch, ShapeScenes, bump_accuracy, detect_objects,
                           length_generalization, plot_grid, render_shapes, request_locations)
from fastcomp.data.detect import _label


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pairwise_min(points: torch.Tensor, valid: torch.Tensor) -> float:
    """Smallest distance between two valid points of the same scene (inf if none)."""
    d = torch.cdist(points, points)
    pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(points.shape[1], dtype=torch.bool)
    return float(d[pair].min()) if bool(pair.any()) else float("inf")


# --- Gaussian bumps -------------------------------------------------------------------------------------

def test_bumps_batch_shapes_and_range():
    ds = GaussianBumps()
    b = ds.sample(37, generator=gen())
    assert isinstance(b, SceneBatch)
    assert b.images.shape == (37, 1, 32, 32) and b.images.dtype == torch.float32
    assert b.points.shape == (37, 1, 2) and b.points.dtype == torch.float32
    assert b.valid.shape == (37, 1) and b.valid.dtype == torch.bool and bool(b.valid.all())
    assert -1.0 <= float(b.images.min()) and float(b.images.max()) <= 1.0
    assert float(b.images.max()) > 0.7                       # a visible bump in every batch
    # the brightest pixel of each image is the pixel nearest its centre
    flat = b.images.flatten(1).argmax(1)
    peak = torch.stack([flat // 32, flat % 32], -1).float()
    assert float((peak - b.points[:, 0]).abs().max()) <= 0.5 + 1e-5
    pts, valid = ds.requests(5, generator=gen())
    assert pts.shape == (5, 1, 2) and valid.shape == (5, 1) and bool(valid.all())


def test_bumps_deterministic():
    a = GaussianBumps().sample(16, generator=gen(3))
    b = GaussianBumps().sample(16, generator=gen(3))
    assert torch.equal(a.images, b.images) and torch.equal(a.points, b.points)
    # generator=None: the dataset's own stream, seeded by `seed`
    c, d = GaussianBumps(seed=5).sample(16), GaussianBumps(seed=5).sample(16)
    assert torch.equal(c.points, d.points)
    assert not torch.equal(GaussianBumps(seed=6).sample(16).points, c.points)


def test_bumps_held_out_combinations():
    ds = GaussianBumps()
    train = ds.sample(2000, split="train", generator=gen(1)).points[:, 0]
    test = ds.sample(500, split="test", generator=gen(2)).points[:, 0]
    assert not bool(ds.is_held_out(train).any())
    assert bool(ds.is_held_out(test).all())
    req, _ = ds.requests(200, generator=gen(4))
    assert bool(ds.is_held_out(req).all())
    # every row bin and every column bin appears in training; only some (row, col) pairs do not
    rb, cb = ds._bin(train[:, 0]), ds._bin(train[:, 1])
    assert set(rb.tolist()) == set(range(ds.bins)) and set(cb.tolist()) == set(range(ds.bins))
    seen = {(r, c) for r, c in zip(rb.tolist(), cb.tolist())}
    held = {tuple(x) for x in ds.held_out_cells.nonzero().tolist()}
    assert held and seen == {(r, c) for r in range(ds.bins) for c in range(ds.bins)} - held
    # the held-out test bumps use rows and columns each seen in training
    assert set(ds._bin(test[:, 0]).tolist()) <= set(rb.tolist())
    # no held-out cells: the test split is the training distribution
    none = GaussianBumps(held_out="none")
    assert not bool(none.is_held_out(none.sample(50, split="test", generator=gen()).points).any())
    custom = GaussianBumps(held_out=[(0, 0)], bins=2)
    assert bool(custom.is_held_out(custom.sample(50, split="test", generator=gen()).points[:, 0]).all())


def test_bump_accuracy():
    ds = GaussianBumps()
    b = ds.sample(64, generator=gen())
    acc = bump_accuracy(b.images, b.points)
    assert acc.accuracy == 1.0 and bool(acc.correct.all())
    assert acc.num_bumps.dtype == torch.int64 and bool((acc.num_bumps == 1).all())
    assert float(acc.error.max()) < 0.5
    noisy = b.images + 0.1 * torch.randn(b.images.shape, generator=gen(9))
    assert bump_accuracy(noisy, b.points[:, 0]).accuracy == 1.0            # points [n, 2] accepted too
    # wrong place, two bumps, no bump
    far = b.points.clone()
    far[:, 0, 0] = (far[:, 0, 0] + 10) % 26 + 3
    assert bump_accuracy(b.images, far).accuracy == 0.0
    two = torch.maximum(b.images, ds.render(torch.tensor([[3.0, 3.0]])).expand_as(b.images))
    two_acc = bump_accuracy(two[:4], torch.tensor([[28.0, 28.0]] * 4))
    assert two_acc.accuracy == 0.0
    blank = -torch.ones(2, 1, 32, 32)
    res = bump_accuracy(blank, torch.full((2, 2), 16.0))
    assert res.accuracy == 0.0 and res.num_bumps.tolist() == [0, 0] and bool(torch.isinf(res.error).all())


def test_bumps_two_bumps_counted():
    ds = GaussianBumps()
    pts = torch.tensor([[5.0, 5.0], [20.0, 24.0]])
    img = torch.maximum(ds.render(pts[:1]), ds.render(pts[1:]))
    res = bump_accuracy(img, pts[:1])
    assert res.num_bumps.tolist() == [2] and not bool(res.correct[0])


# --- shape scenes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("labelling", ["all", "one"])
def test_scenes_shapes_and_labelling(labelling):
    ds = ShapeScenes(labelling=labelling, max_objects=3)
    b = ds.sample(57, generator=gen())
    assert b.images.shape == (57, 3, 32, 32) and b.images.dtype == torch.float32
    assert b.points.shape == (57, 3, 2) and b.points.dtype == torch.float32
    assert b.valid.shape == (57, 3) and b.valid.dtype == torch.bool
    assert float(b.images.min()) >= -1.0 and float(b.images.max()) <= 1.0
    assert bool((b.points[~b.valid] == 0).all())                              # padding rows are 0
    inside = b.points[b.valid]
    assert float(inside.min()) >= 2.5 - 1e-5 and float(inside.max()) <= 28.5 + 1e-5
    # the number of objects actually drawn
    objects = torch.tensor([len(d) for d in detect_objects(b.images)])
    assert int(objects.min()) >= 1 and int(objects.max()) <= 3 and len(set(objects.tolist())) == 3
    if labelling == "all":
        assert torch.equal(b.valid.sum(1), objects)
    else:
        assert bool((b.valid.sum(1) == 1).all()) and bool(b.valid[:, 0].all())
    # plain background: most pixels are exactly the background colour
    assert float((b.images == -1).all(1).float().mean()) > 0.6


def test_scenes_one_labels_a_drawn_object():
    # same generator -> same scenes; "one" labels one of the objects "all" lists
    full = ShapeScenes(labelling="all").sample(40, generator=gen(7))
    one = ShapeScenes(labelling="one").sample(40, generator=gen(7))
    assert torch.equal(full.images, one.images)
    d = (full.points - one.points[:, :1]).norm(dim=-1).masked_fill(~full.valid, 1e9)
    assert float(d.min(1).values.max()) < 1e-6
    picked = d.argmin(1)
    assert len(set(picked.tolist())) > 1                                      # not always the first object


def test_scenes_deterministic_and_separated():
    a = ShapeScenes(max_objects=4, seed=1).sample(64)
    b = ShapeScenes(max_objects=4, seed=1).sample(64)
    assert torch.equal(a.images, b.images) and torch.equal(a.points, b.points)
    c = ShapeScenes(max_objects=4).sample(64, generator=gen(2))
    assert not torch.equal(a.images, c.images)
    assert _pairwise_min(a.points, a.valid) >= 2 * 3 + 2 - 1e-5


def test_detector_recovers_centres():
    b = ShapeScenes(max_objects=4, min_objects=0).sample(96, generator=gen(3))
    for images, tol in ((b.images, 0.5), (b.images + 0.1 * torch.randn(b.images.shape, generator=gen(4)), 0.6)):
        found = detect_objects(images)
        assert len(found) == 96
        for i in range(96):
            truth = b.points[i][b.valid[i]]
            assert found[i].shape == (len(truth), 2), f"scene {i}: {len(found[i])} detected, {len(truth)} drawn"
            if len(truth):
                assert float(torch.cdist(truth, found[i]).min(1).values.max()) < tol
    # the known background colour can be given instead of estimated
    assert [len(f) for f in detect_objects(b.images, background=-1.0)] == b.valid.sum(1).tolist()


def test_label_matches_flood_fill():
    mask = torch.rand(6, 11, 13, generator=gen(5)) > 0.55
    lab = _label(mask)
    for b in range(6):
        # reference: breadth-first flood fill, 4-connectivity
        ref = torch.full((11, 13), -1, dtype=torch.long)
        for start in range(11 * 13):
            r0, c0 = divmod(start, 13)
            if not mask[b, r0, c0] or ref[r0, c0] >= 0:
                continue
            stack = [(r0, c0)]
            ref[r0, c0] = start
            while stack:
                r, c = stack.pop()
                for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    if 0 <= rr < 11 and 0 <= cc < 13 and mask[b, rr, cc] and ref[rr, cc] < 0:
                        ref[rr, cc] = start
                        stack.append((rr, cc))
        assert torch.equal(torch.where(mask[b], lab[b], -1), ref)


@pytest.mark.parametrize("k", [0, 1, 4, 6, 10])
def test_request_locations(k):
    pts, valid = request_locations(24, k, max_objects=3, generator=gen(k))
    M = max(3, k)
    assert pts.shape == (24, M, 2) and valid.shape == (24, M) and valid.dtype == torch.bool
    assert bool((valid.sum(1) == k).all()) and bool(valid[:, :k].all())
    assert bool((pts[~valid] == 0).all())
    assert _pairwise_min(pts, valid) >= 8.0 - 1e-5
    if k:
        assert float(pts[valid].min()) >= 2.5 - 1e-5 and float(pts[valid].max()) <= 28.5 + 1e-5
    p2, _ = request_locations(24, k, max_objects=3, generator=gen(k))
    assert torch.equal(pts, p2)
    # ground-truth renders of the requests are matched exactly
    images = render_shapes(pts, valid, torch.randint(6, valid.shape, generator=gen()),
                           torch.randint(2, valid.shape, generator=gen(1)), size=32, radius=3)
    match = length_generalization(images, pts, valid)
    assert match.score == 1.0 and match.num_detected.tolist() == [k] * 24


def test_length_generalization():
    b = ShapeScenes(max_objects=3).sample(48, generator=gen(11))
    m = length_generalization(b.images, b.points, b.valid)
    assert m.score == 1.0 and bool(m.matched.all()) and m.matched.dtype == torch.bool
    assert m.num_detected.dtype == torch.int64 and torch.equal(m.num_detected, b.valid.sum(1))
    # valid=None: every row requested (scenes with padding then mismatch)
    assert length_generalization(b.images, b.points[:, :1]).score == 1.0 - float((b.valid.sum(1) > 1).float().mean())
    # one requested object removed from the labels -> the image has an unrequested object
    fewer = b.valid.clone()
    fewer[:, 0] = False
    assert length_generalization(b.images, b.points, fewer).score == 0.0
    # an extra request where nothing was drawn
    more_pts = torch.cat([b.points, torch.zeros(48, 1, 2)], 1)
    more_valid = torch.cat([b.valid, torch.ones(48, 1, dtype=torch.bool)], 1)
    more_pts[:, -1] = torch.tensor([0.5, 0.5])
    assert length_generalization(b.images, more_pts, more_valid).score == 0.0
    # right count, wrong places
    shifted = b.points + torch.tensor([5.0, 0.0])
    assert length_generalization(b.images, shifted, b.valid, tolerance=2.0).score == 0.0
    # an empty image matches an empty request only
    blank = -torch.ones(2, 3, 32, 32)
    assert length_generalization(blank, torch.zeros(2, 3, 2), torch.zeros(2, 3, dtype=torch.bool)).score == 1.0


def test_matching_is_one_to_one():
    # two requests near one object and one far: counts match (2 vs 2) only if the matching is one-to-one
    pts = torch.tensor([[[10.0, 10.0], [22.0, 22.0]]])
    img = render_shapes(pts, torch.ones(1, 2, dtype=torch.bool), torch.tensor([[0, 1]]),
                        torch.tensor([[0, 0]]), size=32, radius=3)
    both_on_one = torch.tensor([[[10.0, 10.0], [11.0, 11.0]]])
    assert length_generalization(img, both_on_one, tolerance=3.0).score == 0.0
    assert length_generalization(img, pts.flip(1), tolerance=3.0).score == 1.0


# --- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: ShapeScenes(size=12, max_objects=5), "too small for 5 objects"),
    (lambda: ShapeScenes(labelling="none"), "labelling must be one of"),
    (lambda: ShapeScenes(min_objects=4, max_objects=3), "min_objects"),
    (lambda: ShapeScenes(labelling="one", min_objects=0), "min_objects must be >= 1"),
    (lambda: ShapeScenes(radius=0), "radius"),
    (lambda: ShapeScenes().sample(4, generator=0), "torch.Generator"),
    (lambda: ShapeScenes().sample(-1), "n must be"),
    (lambda: request_locations(4, 17), "too small for 17 objects"),
    (lambda: request_locations(4, -1), "num_objects"),
    (lambda: GaussianBumps(held_out="diagonal"), "held_out must be one of"),
    (lambda: GaussianBumps(held_out=[(0, 9)]), "outside the 4x4 grid"),
    (lambda: GaussianBumps(held_out=[(0, 0)], bins=1), "every cell"),
    (lambda: GaussianBumps(size=4), "size"),
    (lambda: GaussianBumps().sample(4, split="val"), "split must be one of"),
    (lambda: GaussianBumps().is_held_out(torch.zeros(3)), r"\[\.\.\., 2\]"),
    (lambda: bump_accuracy(torch.zeros(2, 3, 8, 8), torch.zeros(2, 2)), r"\[n, 1, S, S\]"),
    (lambda: bump_accuracy(torch.zeros(2, 1, 8, 8), torch.zeros(3, 2)), "one request per image"),
    (lambda: detect_objects(torch.zeros(3, 8, 8)), r"\[n, C, S, S\]"),
    (lambda: detect_objects(torch.zeros(1, 3, 8, 8), threshold=-1), "threshold"),
    (lambda: length_generalization(torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 2), torch.ones(2, 2, dtype=torch.bool)),
     "valid must be"),
    (lambda: length_generalization(torch.zeros(2, 3, 8, 8), torch.zeros(3, 1, 2)), "points must be"),
])
def test_bad_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_plot_grid(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    b = ShapeScenes().sample(10, generator=gen())
    path = tmp_path / "grid.png"
    fig = plot_grid(b.images, b.points, b.valid, path=path, ncol=4)
    assert path.stat().st_size > 1000 and len(fig.axes) == 12
    bumps = GaussianBumps().sample(3, generator=gen())
    plot_grid(bumps.images, bumps.points, path=tmp_path / "bumps.png")
    with pytest.raises(ValueError, match="ncol"):
        plot_grid(b.images, ncol=0)


@pytest.mark.gpu
def test_metrics_on_cuda_match_cpu():
    b = ShapeScenes(max_objects=4).sample(32, generator=gen(12), device="cuda")
    assert b.images.is_cuda and b.points.is_cuda and b.valid.is_cuda
    found = detect_objects(b.images)
    ref = detect_objects(b.images.cpu())
    assert all(torch.allclose(f.cpu(), r, atol=1e-4) for f, r in zip(found, ref))
    assert length_generalization(b.images, b.points, b.valid).score == 1.0
    again = render_shapes(b.points, b.valid, torch.zeros_like(b.valid, dtype=torch.long),
                          torch.zeros_like(b.valid, dtype=torch.long), size=32, radius=3)
    assert again.is_cuda
    bumps = GaussianBumps().sample(16, generator=gen(), device="cuda")
    assert bump_accuracy(bumps.images, bumps.points).accuracy == 1.0
