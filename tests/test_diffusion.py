"""fastcomp.models' conditional diffusion denoiser, EDM training pieces and samplers.

Every model here is tiny (channels 16, depth 1-2, 8..16 px) and float64 where outputs are compared, so
the file runs in seconds on 2 cores.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import fastcomp
from fastcomp.models import (ConditionalDenoiser, LaplaceLogSNR, LogNormalSigma, composed_sample, edm_loss,
                             edm_sigmas, sample)

from helpers import assert_close

TINY = dict(img_channels=3, image_size=11, channels=16, depth=2, num_heads=1, kernel_size=3, cond_radius=3.0)


def make_model(locality: str = "local", dtype=torch.float64, randomize: bool = True, **overrides):
    """A tiny denoiser; randomize=True also perturbs the zero-initialized layers (output conv, adaLN
    modulation) so F is not identically zero and every path carries gradient."""
    torch.manual_seed(1)
    model = ConditionalDenoiser(**{**TINY, "locality": locality, **overrides}).to(dtype)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def inputs(B=3, M=2, S=11, C=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, S, S, generator=g, dtype=dtype)
    sigma = torch.rand(B, generator=g, dtype=dtype) * 2 + 0.1
    points = torch.rand(B, M, 2, generator=g, dtype=dtype) * (S - 1)
    return x, sigma, points


# --- shapes, config, padding ------------------------------------------------------------------------

@pytest.mark.parametrize("locality", ["local", "global"])
def test_shapes_config_and_rebuild(locality):
    model = make_model(locality)
    x, sigma, points = inputs()
    out = model(x, sigma, points)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert json.loads(json.dumps(model.config)) == model.config
    twin = ConditionalDenoiser(**model.config).to(torch.float64).eval()
    twin.load_state_dict(model.state_dict())
    assert_close(twin(x, sigma, points), out)
    assert model(x, 0.7, points).shape == x.shape  # a float sigma broadcasts over the batch


def test_local_and_global_have_the_same_parameters():
    local, glob = make_model("local", randomize=False), make_model("global", randomize=False)
    assert [(n, p.shape) for n, p in local.named_parameters()] == [(n, p.shape) for n, p in glob.named_parameters()]


# --- the global model's rotary position embedding ----------------------------------------------------

@pytest.mark.parametrize("head_dim", [16, 13, 4, 3])
def test_rope_logits_depend_only_on_offsets(head_dim):
    """<rope(q, p), rope(k, p')> is unchanged when p and p' move together (so a logit sees p - p'), a
    rotation keeps each vector's norm, and channels past the last multiple of 4 pass through."""
    from fastcomp.models.diffusion import apply_rope, rope_angles, rope_wavelengths

    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 5, 3, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    pq, pk = (torch.rand(2, 5, 2, generator=g, dtype=torch.float64) * 17 for _ in range(2))
    shift = torch.tensor([4.25, -7.5], dtype=torch.float64)
    wl = rope_wavelengths(head_dim, 17, dtype=torch.float64)

    def logits(a, b):
        qr, kr = apply_rope(q, *rope_angles(a, wl)), apply_rope(k, *rope_angles(b, wl))
        return torch.einsum("bnhd,bmhd->bhnm", qr, kr), qr

    base, rotated = logits(pq, pk)
    moved, _ = logits(pq + shift, pk + shift)
    assert_close(moved, base)
    assert_close(rotated.norm(dim=-1), q.norm(dim=-1))
    n = 4 * (head_dim // 4)
    assert torch.equal(rotated[..., n:], q[..., n:])
    if n:
        assert not torch.allclose(rotated[..., :n], q[..., :n])


def test_rope_wavelengths_span_the_image_without_aliasing():
    from fastcomp.models.diffusion import rope_wavelengths

    assert rope_wavelengths(3, 32).numel() == 0
    assert rope_wavelengths(16, 32).tolist() == [64.0, 32.0, 16.0, 8.0]
    wl = rope_wavelengths(64, 32)
    assert wl.numel() == 16 and wl[0] == 64 and wl.min() >= 4 - 1e-9 and (wl[1:] < wl[:-1]).all()


def test_rope_switch_changes_only_the_global_model():
    """rope adds no parameters (checkpoints load either way); it changes the global model's output and
    leaves the local model's unchanged."""
    x, sigma, points = inputs()
    for locality in ("local", "global"):
        with_rope, without = make_model(locality), make_model(locality, rope=False)
        assert with_rope.state_dict().keys() == without.state_dict().keys()
        without.load_state_dict(with_rope.state_dict())
        same = torch.allclose(with_rope(x, sigma, points), without(x, sigma, points))
        assert same == (locality == "local")
    with pytest.raises(TypeError, match="rope must be True or False"):
        ConditionalDenoiser(**TINY, locality="global", rope="yes")


@pytest.mark.parametrize("locality, patch_size", [("local", 1), ("global", 1), ("local", 2)])
def test_no_conditioners_and_padding_rows(locality, patch_size):
    """M = 0, all-invalid rows and extra padding rows (random points, valid False) give the same output."""
    S = 11 if patch_size == 1 else 12
    model = make_model(locality, patch_size=patch_size, image_size=S)
    x, sigma, points = inputs(M=2, S=S)
    none = model(x, sigma, points[:, :0])
    assert none.shape == x.shape
    assert_close(model(x, sigma, points, torch.zeros(3, 2, dtype=torch.bool)), none, name="all invalid")

    junk = torch.rand(3, 3, 2, dtype=torch.float64) * 10
    padded = torch.cat([points, junk], dim=1)  # [B, 5, 2]
    valid = torch.tensor([[True, True, False, False, False]] * 3)
    assert_close(model(x, sigma, padded, valid), model(x, sigma, points), name="padding rows")
    # the conditioners matter at all (else the padding test proves nothing)
    assert (model(x, sigma, points) - none).abs().max() > 1e-3


def test_backend_passes_through_to_the_attention_op():
    """backend="reference" and backend="cpu" agree in float64, output and parameter gradients."""
    reason = fastcomp.backends.cpp_problem("attention")()
    if reason:
        pytest.skip(f"cpu backend unavailable: {reason}")
    ref = make_model("local", backend="reference")
    fast = make_model("local", backend="cpu")
    x, sigma, points = inputs()
    valid = torch.tensor([[True, False]] * 3)
    outs = []
    for model in (ref, fast):
        model.zero_grad()
        out = model(x, sigma, points, valid)
        out.square().sum().backward()
        outs.append((out, [p.grad.clone() for p in model.parameters()]))
    assert_close(outs[1][0], outs[0][0], name="output")
    for (name, _), g_fast, g_ref in zip(ref.named_parameters(), outs[1][1], outs[0][1]):
        assert_close(g_fast, g_ref, name=f"grad {name}")


def test_gradcheck_tiny():
    model = make_model("local", image_size=5, depth=1, img_channels=1)
    x, sigma, points = inputs(B=1, M=1, S=5, C=1)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: model(t, sigma, points), (x,), eps=1e-6, atol=1e-6,
                                     fast_mode=True)


# --- EDM preconditioning ----------------------------------------------------------------------------

def test_edm_preconditioning_identities():
    model = make_model("local", randomize=False, sigma_data=0.5)
    sigma = torch.tensor([0.002, 0.1, 0.5, 2.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = model.preconditioning(sigma)
    sd = 0.5
    # the network's input c_in * (y + sigma n) has unit variance
    assert torch.allclose(c_in ** 2 * (sd ** 2 + sigma ** 2), torch.ones_like(sigma))
    # the effective training target (y - c_skip (y + sigma n)) / c_out has unit variance
    assert torch.allclose((1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * sigma ** 2, c_out ** 2)
    assert torch.allclose(c_noise, sigma.log() / 4)
    # a fresh model (zero output layer) is exactly D = c_skip * x
    x, s, points = inputs()
    assert_close(model(x, s, points), model.preconditioning(s)[0][:, None, None, None] * x)


# --- locality ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch_size", [1, 2])
def test_pixel_locality_local_vs_global(patch_size):
    """The local model's Jacobian has no mass beyond its receptive radius; the global one's does."""
    S = 12 if patch_size == 1 else 16
    local = make_model("local", image_size=S, depth=1, backend="reference", patch_size=patch_size)  # vmap-able
    glob = make_model("global", image_size=S, depth=1, patch_size=patch_size)
    R = local.receptive_radius
    assert R == {1: 2 + 1 * 3, 2: 2 * 3 + 1}[patch_size]
    x, sigma, points = inputs(B=1, M=2, S=S)
    res = fastcomp.probe.pixel_locality(lambda t: local(t, sigma, points), x, radius=R, method="exact",
                                        progress=False)
    assert res.leakage < 1e-12
    res_g = fastcomp.probe.pixel_locality(lambda t: glob(t, sigma, points), x, radius=R, method="exact",
                                          progress=False)
    assert res_g.leakage > 1e-3


@pytest.mark.parametrize("patch_size", [1, 2])
def test_conditioner_locality_local_vs_global(patch_size):
    """Conditioner m only reaches pixels within cond_radius + the receptive field (a Chebyshev square of
    radius R, so a disk of radius cond_radius + R sqrt 2); the global model spreads it everywhere."""
    S = 16
    local = make_model("local", image_size=S, depth=1, cond_radius=2.0, backend="reference", patch_size=patch_size)
    glob = make_model("global", image_size=S, depth=1, cond_radius=2.0, patch_size=patch_size)
    x, sigma, _ = inputs(B=1, M=2, S=S)
    points = torch.tensor([[[2.0, 3.0], [13.0, 12.5]]], dtype=torch.float64)
    grown = fastcomp.disk_mask(points, 2.0 + local.receptive_radius * math.sqrt(2), S, S)
    assert not grown.all(dim=(2, 3)).any()  # the mask leaves pixels out, so the test can fail
    fractions = []
    for model in (local, glob):
        res = fastcomp.probe.conditioner_locality(lambda t, c, m=model: m(t, sigma, c), x, points, grown,
                                                  method="forward", progress=False)
        fractions.append(res.inside_fraction)
    assert torch.all(fractions[0] > 1 - 1e-12), fractions[0]
    assert torch.all(fractions[1] < 0.999), fractions[1]


# --- noise-level distributions and the loss ---------------------------------------------------------

def test_sigma_distributions():
    for dist in (LogNormalSigma(), LaplaceLogSNR(), LaplaceLogSNR(mu=1.0, scale=0.3)):
        a = dist.sample(20000, generator=torch.Generator().manual_seed(3))
        b = dist.sample(20000, generator=torch.Generator().manual_seed(3))
        assert a.shape == (20000,) and a.dtype == torch.float32 and torch.equal(a, b)
        assert (a > 0).all() and torch.isfinite(a).all()
    log_sigma = LogNormalSigma(-1.2, 1.2).sample(20000, generator=torch.Generator().manual_seed(0)).log()
    assert abs(log_sigma.mean() + 1.2) < 0.05 and abs(log_sigma.std() - 1.2) < 0.05
    lap = LaplaceLogSNR(mu=1.0, scale=0.3)
    log_snr = -2 * lap.sample(20000, generator=torch.Generator().manual_seed(0)).double().log()
    assert abs(log_snr.median() - 1.0) < 0.02
    assert abs((log_snr - 1.0).abs().mean() - 0.3) < 0.02  # a Laplace's mean absolute deviation is its scale
    with pytest.raises(ValueError, match="scale"):
        LaplaceLogSNR(scale=0.0)


def test_edm_loss_matches_the_formula():
    model = make_model("global", randomize=False)  # D = c_skip * x: the loss is computable by hand
    x, _, points = inputs(B=4)
    batch = SimpleNamespace(images=x, points=points, valid=torch.ones(4, 2, dtype=torch.bool))
    loss = edm_loss(model, batch, LogNormalSigma(), generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    sigma = LogNormalSigma().sample(4, generator=g).double()
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    denoised = c_skip[:, None, None, None] * (x + sigma[:, None, None, None] * noise)
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    expected = (weight * (denoised - x).square().flatten(1).mean(1)).mean()
    assert loss.dim() == 0
    assert_close(loss, expected)

    trained = make_model("local")
    trained.train()
    loss = edm_loss(trained, batch, LaplaceLogSNR(), generator=torch.Generator().manual_seed(0), cond_dropout=0.5)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained.parameters())


# --- samplers ---------------------------------------------------------------------------------------

def test_edm_sigmas():
    s = edm_sigmas(5, 0.002, 80.0, 7.0)
    assert s.shape == (6,) and s[-1] == 0
    assert math.isclose(s[0].item(), 80.0) and math.isclose(s[-2].item(), 0.002)
    assert torch.all(s[:-1] > s[1:])


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_sampler_is_deterministic_given_a_generator(solver):
    model = make_model("local", image_size=8, depth=1)
    points = torch.tensor([[[2.0, 3.0]], [[5.0, 5.0]]], dtype=torch.float64)
    a = sample(model, points, steps=3, solver=solver, generator=torch.Generator().manual_seed(0), progress=False)
    b = sample(model, points, steps=3, solver=solver, generator=torch.Generator().manual_seed(0), progress=False)
    c = sample(model, points, steps=3, solver=solver, generator=torch.Generator().manual_seed(1), progress=False)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("locality", ["local", "global"])
def test_composed_sample_with_one_conditioner_equals_sample(locality):
    model = make_model(locality, image_size=8, depth=1)
    points = torch.tensor([[[2.0, 3.0], [0.0, 0.0]], [[6.0, 1.0], [5.0, 5.0]]], dtype=torch.float64)
    valid = torch.tensor([[True, False], [False, True]])  # k = 1 each, one padding row
    kw = dict(steps=3, progress=False)
    a = sample(model, points, valid, generator=torch.Generator().manual_seed(0), **kw)
    b = composed_sample(model, points, valid, generator=torch.Generator().manual_seed(0), **kw)
    assert_close(b, a, ratio=1e-9)
    # k = 0: the unconditional model
    none = torch.zeros(2, 2, dtype=torch.bool)
    assert_close(composed_sample(model, points, none, generator=torch.Generator().manual_seed(0), **kw),
                 sample(model, points[:, :0], generator=torch.Generator().manual_seed(0), **kw), ratio=1e-9)


def test_composed_sample_is_the_projective_combination():
    """One Euler step from sigma_max to 0 returns the composed denoiser itself: sum_i D_i - (k-1) D_0."""
    model = make_model("local", image_size=8, depth=1)
    points = torch.tensor([[[2.0, 3.0], [5.0, 6.0]]], dtype=torch.float64)
    kw = dict(steps=1, solver="euler", sigma_max=2.0, sigma_min=2.0, progress=False)
    out = composed_sample(model, points, generator=torch.Generator().manual_seed(0), **kw)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.0
    with torch.no_grad():
        d1, d2 = model(x, 2.0, points[:, :1]), model(x, 2.0, points[:, 1:])
        d0 = model(x, 2.0, points[:, :0])
    assert_close(out, d1 + d2 - d0, ratio=1e-9)


# --- errors -----------------------------------------------------------------------------------------

def test_bad_inputs_raise_helpful_errors():
    model = make_model("local", randomize=False)
    x, sigma, points = inputs()
    with pytest.raises(ValueError, match="x"):
        model(x[:, :1], sigma, points)
    with pytest.raises(ValueError, match="image_size"):
        model(x[..., :9, :9], sigma, points)
    with pytest.raises(ValueError, match="points"):
        model(x, sigma, points[..., :1])
    with pytest.raises(TypeError, match="valid"):
        model(x, sigma, points, torch.ones(3, 2))
    with pytest.raises(ValueError, match="valid"):
        model(x, sigma, points, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="sigma"):
        model(x, sigma[:2], points)
    with pytest.raises(ValueError, match="locality"):
        ConditionalDenoiser(locality="nearby")
    with pytest.raises(ValueError, match="num_heads"):
        ConditionalDenoiser(channels=30, num_heads=4)
    with pytest.raises(ValueError, match="kernel_size"):
        ConditionalDenoiser(kernel_size=4)
    with pytest.raises(ValueError, match="patch_size"):
        ConditionalDenoiser(image_size=32, patch_size=3)
    with pytest.raises(ValueError, match="kernel_size"):
        ConditionalDenoiser(image_size=32, patch_size=4, kernel_size=9)
    with pytest.raises(ValueError, match="points"):
        sample(model, points[0])
    with pytest.raises(ValueError, match="solver"):
        sample(model, points, solver="rk4", steps=1)
    with pytest.raises(ValueError, match="steps"):
        composed_sample(model, points, steps=0)


def test_train_step_bench_runs_the_same_step_on_both_backends():
    """fastcomp/bench/train_step.py: fused and reference steps start from the same weights and batch."""
    from fastcomp.bench.train_step import build_step

    tiny = dict(channels=16, depth=1, num_heads=1, image_size=12, kernel_size=3)
    losses = [float(build_step(b, batch=2, model_kwargs=tiny)()) for b in (None, "reference")]
    assert math.isfinite(losses[0]) and math.isclose(losses[0], losses[1], rel_tol=1e-4)
