"""The test machinery itself: the interpreter switch, NaN poisoning, the reference comparison, and the
Triton path run end to end through one real kernel (disk_mask)."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA
from helpers import assert_close, assert_low_precision_close

import fastcomp
from fastcomp import backends
from fastcomp.reference import disk_mask_reference


def test_triton_runs_interpreted_without_a_gpu():
    if HAS_CUDA:
        pytest.skip("a GPU is present: Triton kernels run compiled")
    assert backends.triton_interpreted()


@pytest.mark.triton
def test_triton_kernels_were_built_for_the_interpreter():
    """If a kernel module had been imported before conftest set TRITON_INTERPRET, its kernels would be
    compiled-mode JITFunctions and every Triton test on CPU would fail for a confusing reason."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastcomp.kernels import disk_mask as kernels

    assert isinstance(kernels._disk_mask_kernel, InterpretedFunction) != HAS_CUDA


def test_torch_empty_is_poisoned():
    assert bool(torch.empty(4).isnan().all())
    assert bool(torch.empty_like(torch.zeros(3, dtype=torch.float64)).isnan().all())
    assert bool(torch.zeros(2).new_empty(5).isnan().all())
    assert bool((torch.empty(3, dtype=torch.int64) != 0).all())


def test_assert_close_catches_unwritten_elements_and_names_the_worst():
    ref = torch.ones(3, 4, dtype=torch.float64)
    out = ref.clone()
    out[1, 2] = float("nan")
    with pytest.raises(AssertionError, match=r"non-finite element.*\(1, 2\)"):
        assert_close(out, ref)
    out[1, 2] = 1.5
    with pytest.raises(AssertionError, match=r"worst element at \(1, 2\): got 1.5, reference 1"):
        assert_close(out, ref)
    assert_close(ref.float(), ref)


def test_low_precision_rule():
    ref = torch.randn(1000, dtype=torch.float64)
    torch_half = ref.half()
    assert_low_precision_close(torch_half, ref, torch_half)
    with pytest.raises(AssertionError, match="exceeds 2.0x plain PyTorch"):
        assert_low_precision_close(ref.bfloat16(), ref, torch_half)


def test_auto_selection_never_picks_the_interpreter_for_cpu_tensors():
    assert backends.select("disk_mask", None, torch.zeros(1, 1, 2)).name != "triton"


@pytest.mark.triton
@pytest.mark.parametrize("B, M, H, W, radius", [(2, 3, 13, 17, 3.5), (1, 0, 5, 4, 1.0), (1, 2, 1, 70, 5.0)])
def test_disk_mask_triton_matches_reference(triton_device, B, M, H, W, radius):
    points = torch.rand(B, M, 2, device=triton_device) * torch.tensor([H, W], device=triton_device)
    if M:
        points[0, 0] = torch.tensor([3.0, 4.0])  # integer offsets: (0, 0) lies exactly on a radius-5 circle
    out = fastcomp.disk_mask(points, radius, H, W, backend="triton")
    assert torch.equal(out.cpu(), disk_mask_reference(points.cpu(), radius, H, W))
    if M:
        on_circle = fastcomp.disk_mask(points, 5.0, H, W, backend="triton")
        assert bool(on_circle[0, 0, 0, 0])
