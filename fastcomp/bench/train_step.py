"""One training step (EDM loss forward + backward + AdamW) of the local ConditionalDenoiser on a synthetic
batch, as a closure: what `fastcomp bench --op train_step` times per attention backend, and what
benchmarks/train_step_bench.py times in interleaved rounds."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from fastcomp.models import ConditionalDenoiser, LogNormalSigma, edm_loss

MODEL = dict(img_channels=3, image_size=32, channels=64, depth=4, num_heads=4, kernel_size=7, locality="local",
             cond_radius=6.0)


def make_batch(batch: int, max_objects: int, image_size: int, channels: int, device, seed: int = 0):
    """A synthetic SceneBatch-like batch: images in [-1, 1], 1..max_objects valid points per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, image_size, image_size, generator=g) * 2 - 1
    points = torch.rand(batch, max_objects, 2, generator=g) * (image_size - 1)
    count = torch.randint(1, max_objects + 1, (batch, 1), generator=g)
    valid = torch.arange(max_objects)[None, :] < count
    return SimpleNamespace(images=images.to(device), points=points.to(device), valid=valid.to(device))


def build_step(backend: Optional[str], *, batch: int = 16, device="cpu", precision: str = "fp32",
               max_objects: int = 3, seed: int = 0, model_kwargs: Optional[dict] = None) -> Callable[[], float]:
    """A closure running one training step of a fresh (seeded, so identical across backends) model; returns
    the loss. precision: "fp32" or "bf16" (autocast; float32 master weights)."""
    device = torch.device(device)
    kwargs = {**MODEL, **(model_kwargs or {}), "backend": backend}
    torch.manual_seed(seed)
    model = ConditionalDenoiser(**kwargs).to(device)
    with torch.no_grad():  # leave the zero-initialized output layer's starting point: every layer gets gradient
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = make_batch(batch, max_objects, kwargs["image_size"], kwargs["img_channels"], device, seed)
    sigma_dist = LogNormalSigma()
    if precision == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    elif precision == "fp32":
        autocast = contextlib.nullcontext
    else:
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")

    def step() -> float:
        g = torch.Generator(device="cpu").manual_seed(seed)  # same sigmas and noise every step and backend
        with autocast():
            loss = edm_loss(model, data, sigma_dist, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step
