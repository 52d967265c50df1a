"""fastcomp.models.variants: the length-generalization study's conditioning designs and their interventions.

The intervention (local_conditioners=True) must be the same network with only the conditioner path made
local: same parameters; the as-is output again when every disk covers everything; the unconditioned output
when no disk covers anything (token models); each attention exactly the masked softmax of the reference.
Tiny float64 models (8 px, patch 2, channels 8), so the file runs in seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

from fastcomp.models import VARIANTS, ConditionalDenoiser, UNetDenoiser, VectorDenoiser, build_denoiser
from fastcomp.models.diffusion import GlobalConditionalAttention
from fastcomp.models.variants import CrossAttention
from fastcomp.reference import local_conditional_attention_reference

from helpers import assert_close

TINY = dict(image_size=8, channels=8, depth=1, num_heads=2, patch_size=2, cond_radius=3.0)
WITH_INTERVENTION = [v for v, (_, has) in VARIANTS.items() if has]


def make(variant, local_conditioners=False, **overrides):
    """A tiny float64 model with every parameter perturbed (the zero-initialized output and modulation layers
    too, so each path carries signal)."""
    torch.manual_seed(3)
    model = build_denoiser(variant, local_conditioners=local_conditioners, **{**TINY, **overrides}).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def inputs(B=2, M=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64)
    points = torch.rand(B, M, 2, generator=g, dtype=torch.float64) * 7
    valid = torch.ones(B, M, dtype=torch.bool)
    valid[1, 2] = False
    return x, points, valid


def test_the_study_sizes_have_the_same_parameter_budget_within_20_percent():
    counts = {v: sum(p.numel() for p in build_denoiser(v).parameters()) for v in VARIANTS}
    base = counts["tokens-rope"]
    assert all(abs(n - base) <= 0.2 * base for n in counts.values()), counts


@pytest.mark.parametrize("variant", WITH_INTERVENTION)
def test_intervention_is_the_same_network_and_equals_it_when_every_disk_covers_the_image(variant):
    plain = make(variant, cond_radius=100.0)
    local = make(variant, True, cond_radius=100.0)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in local.state_dict().items()}
    local.load_state_dict(plain.state_dict())
    assert local.config["local_conditioners"] is True and json.loads(json.dumps(local.config)) == local.config
    twin = type(local)(**local.config).double().eval()
    twin.load_state_dict(local.state_dict())
    x, points, valid = inputs()
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    out = plain(x, sigma, points, valid)
    assert torch.isfinite(out).all()
    assert_close(local(x, sigma, points, valid), out)
    assert_close(twin(x, sigma, points, valid), out)


def test_token_intervention_ignores_conditioners_whose_disk_covers_no_token():
    """cond_radius 0 and points on integer pixels: no token centre (2 i + 0.5) lies on a point."""
    plain, local = make("tokens-rope", cond_radius=0.0), make("tokens-rope", True, cond_radius=0.0)
    x, _, _ = inputs()
    points = torch.tensor([[[4.0, 6.0], [0.0, 2.0]], [[2.0, 2.0], [6.0, 0.0]]], dtype=torch.float64)
    valid, none = torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)
    assert_close(local(x, 0.5, points, valid), local(x, 0.5, points, none))
    assert not torch.allclose(plain(x, 0.5, points, valid), plain(x, 0.5, points, none))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("local_conditioners", [False, True])
def test_conditioners_are_a_set_and_padding_never_enters(variant, local_conditioners):
    """Permuting the conditioner rows changes nothing (a softmax over a set of keys; a sum). The sibling
    models zero the padding rows before use, so NaN there changes nothing either, and M = 0 is the
    unconditioned model; the same for the token models (ConditionalDenoiser zeroes padding points, and
    the global attention zeroes the tokens its per-pixel mask shows no pixel)."""
    if local_conditioners and not VARIANTS[variant][1]:
        pytest.skip("the local model has no intervention")
    model = make(variant, local_conditioners)
    x, points, valid = inputs()
    out = model(x, 0.8, points, valid)
    perm = torch.tensor([2, 0, 1])
    assert_close(model(x, 0.8, points[:, perm], valid[:, perm]), out)
    poisoned = points.clone()
    poisoned[~valid] = float("nan")
    assert_close(model(x, 0.8, poisoned, valid), out)
    assert_close(model(x, 0.8, points[:, :0], valid[:, :0]), model(x, 0.8, points, torch.zeros_like(valid)))


def test_global_attention_with_a_per_pixel_mask_is_the_reference_with_a_whole_image_window():
    """A 5 x 7 grid with a (5, 7) window: the reference's window is the whole image, so its masked softmax over
    pixels + allowed conditioners is what the global attention with a [B, M, H, W] mask must compute."""
    torch.manual_seed(0)
    B, H, W, C, heads, M = 2, 5, 7, 8, 2, 3
    attn = GlobalConditionalAttention(C, heads, 1).double()
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    cond = torch.randn(B, M, C, dtype=torch.float64)
    mask = torch.rand(B, M, H, W) < 0.5
    q, k, v = attn.qkv(x).unflatten(-1, (3 * heads, C // heads)).chunk(3, dim=-2)
    ck, cv = attn.cond_kv(cond).unflatten(-1, (2 * heads, C // heads)).chunk(2, dim=-2)
    ref = local_conditional_attention_reference(q, k, v, (H, W), cond_k=ck, cond_v=cv, cond_mask=mask)
    assert_close(attn(x, cond, mask), attn.proj(ref.flatten(-2)))


def test_cross_attention_is_a_masked_softmax_over_the_null_token_and_the_allowed_conditioners():
    torch.manual_seed(0)
    B, H, W, C, heads, M, E = 2, 3, 4, 8, 2, 3, 6
    attn = CrossAttention(C, heads, cond_dim=E).double()
    with torch.no_grad():
        attn.null_kv.normal_()
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    cond = torch.randn(B, M, E, dtype=torch.float64)
    mask = torch.rand(B, M, H, W) < 0.5
    D = C // heads
    q = attn.q(x).view(B, H, W, heads, D)
    kv = torch.cat([attn.null_kv.expand(B, 1, -1), attn.cond_kv(cond)], 1).view(B, 1 + M, 2, heads, D)
    keep = torch.cat([torch.ones(B, 1, H, W, dtype=torch.bool), mask], 1)  # [B, 1 + M, H, W]
    logits = torch.einsum("bhwnd,bmnd->bhwnm", q, kv[:, :, 0]) * D ** -0.5
    logits = logits.masked_fill(~keep.permute(0, 2, 3, 1)[:, :, :, None, :], float("-inf"))
    ref = torch.einsum("bhwnm,bmnd->bhwnd", logits.softmax(-1), kv[:, :, 1])
    assert_close(attn(x, cond, mask), attn.proj(ref.flatten(-2)))
    # a key-padding mask [B, M] is the per-position mask broadcast over the positions
    pad = torch.tensor([[True, False, True], [False, False, False]])
    assert_close(attn(x, cond, pad), attn(x, cond, pad[:, :, None, None].expand(B, M, H, W)))


def test_unet_intervention_masks_reach_every_conditioner_at_every_resolution():
    model = make("unet", True, cond_radius=1.0, image_size=16)
    points = torch.rand(4, 5, 2, dtype=torch.float64) * 15
    valid = torch.ones(4, 5, dtype=torch.bool)
    for stride in (2, 4, 8):
        mask = model._cond_mask(points, valid, stride)
        assert mask.shape == (4, 5, 16 // stride, 16 // stride)
        assert mask.flatten(2).any(-1).all(), f"stride {stride}: a conditioner reaches no cell"


def test_build_denoiser_and_the_new_options_refuse_bad_input():
    with pytest.raises(ValueError, match="variant must be one of"):
        build_denoiser("transformer")
    with pytest.raises(ValueError, match="already local"):
        build_denoiser("local", local_conditioners=True)
    with pytest.raises(ValueError, match="local_conditioners=True"):
        ConditionalDenoiser(locality="local", local_conditioners=True)
    with pytest.raises(TypeError, match="local_conditioners must be True or False"):
        VectorDenoiser(local_conditioners="yes")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        UNetDenoiser(image_size=20, patch_size=2)
