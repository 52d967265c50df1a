"""fastcomp.disk_mask's C++ ("cpu"), Triton and CUDA ("cuda") backends equal the float64 reference exactly.

Exactly, boundary included: a pixel at distance == radius is inside, and the backends must round
(i - row)^2 + (j - col)^2 the way the reference does (no FMA) to agree on points lying on a boundary.
The cpu backend compiles the extension on first use into the user's cache (~30 s, once per machine).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastcomp
from fastcomp import _build
from fastcomp import backends as _b
from fastcomp.reference import disk_mask_reference

needs_compiler = pytest.mark.skipif(_build.compiler_problem() is not None,
                                    reason=f"cannot compile C++ here: {_build.compiler_problem()}")


def _check(points, radius, H, W, backend):
    out = fastcomp.disk_mask(points, radius, H, W, backend=backend)
    ref = disk_mask_reference(points.cpu(), radius, H, W)
    assert out.dtype == torch.bool and out.device == points.device
    assert out.shape == ref.shape, (out.shape, ref.shape)
    diff = out.cpu() != ref
    assert not bool(diff.any()), (f"{backend}: {int(diff.sum())} pixel(s) differ from the reference, first at "
                                  f"{tuple(torch.nonzero(diff)[0].tolist())}")
    return out


def _near_boundary_points(B, M, H, W, radius, generator):
    """Points placed so that some pixel lies at distance radius up to rounding: the exactness stress."""
    i0 = torch.randint(0, H, (B, M), generator=generator).double()
    j0 = torch.randint(0, W, (B, M), generator=generator).double()
    angle = torch.rand(B, M, generator=generator, dtype=torch.float64) * 2 * math.pi
    return torch.stack([i0 - radius * torch.cos(angle), j0 - radius * torch.sin(angle)], dim=-1)


def _cases(device):
    g = torch.Generator().manual_seed(1)
    yield "random float64", (torch.rand(2, 5, 2, generator=g, dtype=torch.float64) * 24 - 4), 4.7, 13, 17
    yield "random float32", (torch.rand(3, 4, 2, generator=g) * 20).float(), 3.25, 13, 17
    yield "integer boundary 3-4-5", torch.tensor([[[3.0, 4.0], [0.0, 0.0], [12.0, 16.0]]]), 5.0, 13, 17
    yield "half-pixel boundary", torch.tensor([[[0.5, 0.5], [6.5, 2.0]]]), 0.5, 13, 17
    yield "radius 0", torch.tensor([[[2.0, 3.0], [2.5, 3.0], [12.0, 16.0]]]), 0.0, 13, 17
    yield "near boundary", _near_boundary_points(4, 64, 13, 17, 5.3, g), 5.3, 13, 17
    yield "near boundary, big radius", _near_boundary_points(2, 64, 31, 29, 11.1, g), 11.1, 31, 29
    yield "M = 0", torch.zeros(2, 0, 2, dtype=torch.float64), 3.0, 13, 17
    yield "1 x 1 image", torch.tensor([[[0.2, -0.4]]]), 0.5, 1, 1
    yield "parallel path", torch.rand(2, 8, 2, generator=g, dtype=torch.float64) * 64, 9.0, 64, 65
    yield "non-contiguous points", (torch.rand(2, 3, 4, generator=g) * 13)[..., ::2], 2.5, 13, 17


CASES = list(_cases("cpu"))


@needs_compiler
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cpu_backend_equals_reference(case):
    _, points, radius, H, W = case
    _check(points, radius, H, W, "cpu")


@needs_compiler
def test_boundary_pixels_are_inside():
    out = fastcomp.disk_mask(torch.tensor([[[3.0, 4.0]]]), 5.0, 13, 17, backend="cpu")
    for i, j in ((0, 0), (6, 0), (8, 4), (7, 7), (3, 9), (0, 8)):  # distance exactly 5
        assert bool(out[0, 0, i, j]), (i, j)
    assert not bool(out[0, 0, 9, 4]) and not bool(out[0, 0, 8, 8])
    single = fastcomp.disk_mask(torch.tensor([[[2.0, 3.0]]]), 0.0, 13, 17, backend="cpu")
    assert int(single.sum()) == 1 and bool(single[0, 0, 2, 3])


@needs_compiler
def test_cpu_is_the_default_for_cpu_tensors():
    assert _b.select("disk_mask", None, torch.zeros(1, 1, 2)).name == "cpu"


@needs_compiler
def test_cpu_backend_refuses_cuda_style_misuse():
    ext = _build.load("disk_mask")
    out = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="points must be float64"):
        ext.disk_mask_cpu(torch.zeros(1, 1, 2), 1.0, out)
    with pytest.raises(ValueError, match="out must be"):
        ext.disk_mask_cpu(torch.zeros(2, 1, 2, dtype=torch.float64), 1.0, out)


@pytest.mark.triton
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_backend_equals_reference(case, triton_device):
    _, points, radius, H, W = case
    _check(points.to(triton_device), radius, H, W, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_backend_equals_reference(case):
    problem = _b.cuda_problem()
    if problem:
        pytest.skip(f"cuda backend unavailable: {problem}")
    _, points, radius, H, W = case
    _check(points.cuda(), radius, H, W, "cuda")


@pytest.mark.gpu
def test_cuda_backend_on_a_side_stream_and_many_rows():
    problem = _b.cuda_problem()
    if problem:
        pytest.skip(f"cuda backend unavailable: {problem}")
    points = torch.rand(3, 40_000, 2, device="cuda", dtype=torch.float64) * 8  # B*M*H > 65535 grid rows
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = fastcomp.disk_mask(points, 2.5, 8, 5, backend="cuda")
    stream.synchronize()
    assert torch.equal(out.cpu(), disk_mask_reference(points.cpu(), 2.5, 8, 5))
    assert _b.select("disk_mask", None, points).name == "cuda"
