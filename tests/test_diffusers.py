"""fastcomp.integrations.diffusers on tiny random diffusers models (the installed diffusers; no download):
UNet2DConditionModel (continuous Transformer2DModel blocks at two resolutions) and PixArtTransformer2DModel
(patched tokens). A window covering every grid and an all-true mask give the original model; a small
window gives fastcomp's reference; regional cross-attention is checked against a hand-written masked
softmax; gradients flow; restore_attention undoes it all."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcomp.integrations.diffusers import (NeighborhoodAttnProcessor, RegionalCrossAttnProcessor,
                                             apply_neighborhood_attention, apply_regional_cross_attention,
                                             restore_attention)
from helpers import assert_close

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: `pip install diffusers`")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8).eval()


def tiny_pixart():
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=32, caption_channels=32, norm_num_groups=8,
        use_additional_conditions=False).eval()


def run_unet(unet, x, enc):
    return unet(x, 10, encoder_hidden_states=enc).sample


def run_pixart(model, x, enc):
    return model(x, encoder_hidden_states=enc, timestep=torch.full((x.shape[0],), 10)).sample


def test_unet_whole_grid_window_and_all_true_mask_are_the_original():
    unet = tiny_unet()
    x, enc = torch.randn(2, 4, 13, 17), torch.randn(2, 5, 32)  # token grids 13x17 and 7x9
    with torch.no_grad():
        original = run_unet(unet, x, enc)
        assert apply_neighborhood_attention(unet, (13, 17)) == 4
        assert apply_regional_cross_attention(unet, torch.ones(2, 5, 26, 34, dtype=torch.bool)) == 4
        assert_close(run_unet(unet, x, enc), original, ratio=1e-6, name="whole-grid window, all-true mask")
        assert apply_neighborhood_attention(unet, 5) == 4  # re-applying replaces, and still restores
        assert restore_attention(unet) == 8
        assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())
        assert_close(run_unet(unet, x, enc), original, ratio=1e-7, name="restored")
        # the grids the layers learned from the model (the hooks are gone, the last grids were cleared)
        assert not any(hasattr(m, "_fastcomp_grid") or hasattr(m, "_fastcomp_grid_hook") for m in unet.modules())


def test_unet_small_window_equals_fastcomp_reference_and_gradients_flow():
    unet = tiny_unet().double()
    x = torch.randn(2, 4, 13, 17, dtype=torch.float64, requires_grad=True)
    enc = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        original = run_unet(unet, x, enc)
    outs, grads = {}, {}
    for backend in ("reference", "cpu"):  # "cpu" named: the fused kernel runs, or this raises
        apply_neighborhood_attention(unet, (5, 3), backend=backend)
        out = run_unet(unet, x, enc)
        (gx,) = torch.autograd.grad(out.square().sum(), x)
        outs[backend], grads[backend] = out.detach(), gx
        restore_attention(unet)
    assert_close(outs["cpu"], outs["reference"], name="window 5x3, cpu vs reference")
    assert_close(grads["cpu"], grads["reference"], name="d/dx")
    assert (outs["cpu"] - original).abs().max() > 1e-3  # the window changed the model
    apply_neighborhood_attention(unet, 5)
    run_unet(unet, x, enc).sum().backward()
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert layer.to_q.weight.grad is not None and torch.isfinite(layer.to_q.weight.grad).all()


def test_pixart_window_and_mask():
    model = tiny_pixart()
    x, enc = torch.randn(2, 4, 10, 14), torch.randn(2, 5, 32)  # patch 2: a 5x7 token grid
    with torch.no_grad():
        original = run_pixart(model, x, enc)
        assert apply_neighborhood_attention(model, 7) == 2
        assert apply_regional_cross_attention(model, torch.ones(2, 5, 10, 14, dtype=torch.bool)) == 2
        assert_close(run_pixart(model, x, enc), original, ratio=1e-6, name="PixArt whole-grid window")
        restore_attention(model)
        apply_neighborhood_attention(model, 3, backend="reference")
        ref = run_pixart(model, x, enc)
        restore_attention(model)
        apply_neighborhood_attention(model, 3, backend="cpu")
        assert_close(run_pixart(model, x, enc), ref, name="PixArt window 3, cpu vs reference")
        assert (ref - original).abs().max() > 1e-3
        apply_neighborhood_attention(model, 5)
        with pytest.raises(ValueError, match="even side"):  # a 4x6 grid: a window of 5 would span 4 rows
            run_pixart(model, torch.randn(1, 4, 8, 12), enc[:1])


def test_regional_cross_attention_is_masked_softmax_and_local_in_conditioners():
    model = tiny_pixart().double()
    layer = model.transformer_blocks[0].attn2
    B, M, grid = 2, 4, (5, 7)
    mask = torch.rand(B, M, 10, 14) < 0.25  # image resolution: 2x the token grid
    mask[:, :, :2, :2] = False  # pixel cell (0, 0): no region covers it
    apply_regional_cross_attention(model, mask)
    layer._fastcomp_grid = grid  # what the model's hook sets before a forward
    x = torch.randn(B, 35, 32, dtype=torch.float64)
    enc = torch.randn(B, M, 32, dtype=torch.float64, requires_grad=True)
    out = layer(x, encoder_hidden_states=enc)

    # by hand: softmax over the allowed tokens of each cell; a cell with none gets zero attention output
    allowed = F.max_pool2d(mask.double(), 2).flatten(2).transpose(1, 2) > 0  # [B, N, M]
    q = layer.to_q(x).view(B, 35, 2, 16).transpose(1, 2)
    k, v = (proj(enc).view(B, M, 2, 16).transpose(1, 2) for proj in (layer.to_k, layer.to_v))
    logits = (q @ k.transpose(-1, -2) * layer.scale).masked_fill(~allowed[:, None], float("-inf"))
    attn = torch.nan_to_num(logits.softmax(-1), nan=0.0)
    expected = layer.to_out[0]((attn @ v).transpose(1, 2).reshape(B, 35, 32))
    assert_close(out, expected, name="regional cross-attention vs masked softmax")

    # local in conditioners: a cell's output does not depend on the tokens whose region misses it
    cell = 0
    (g,) = torch.autograd.grad(out[:, cell].sum(), enc, retain_graph=True)
    assert g.abs().sum() == 0  # cell 0: no region covers it, no token reaches it
    cell = int(allowed[0].any(-1).nonzero()[0])
    (g,) = torch.autograd.grad(out[0, cell].sum(), enc)
    assert torch.all(g[0][~allowed[0, cell]] == 0) and g[0][allowed[0, cell]].abs().sum() > 0

    # classifier-free guidance doubles the batch: the mask serves each half
    doubled = layer(x.repeat(2, 1, 1), encoder_hidden_states=enc.detach().repeat(2, 1, 1))
    assert_close(doubled, out.detach().repeat(2, 1, 1), name="batch 2B")


def test_errors_name_the_fix():
    model = tiny_pixart()
    x, enc = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    model.set_attn_processor(NeighborhoodAttnProcessor(3))  # no grid learned: the user must use apply_*
    with pytest.raises(RuntimeError, match="apply_neighborhood_attention"):
        run_pixart(model, x, enc)
    restore_attention(model)
    model.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    apply_regional_cross_attention(model, torch.rand(1, 3, 8, 8) < 0.5)
    with pytest.raises(ValueError, match="M = 3 regions"):
        run_pixart(model, x, enc)
    with pytest.raises(TypeError, match="bool"):
        RegionalCrossAttnProcessor(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="odd"):
        NeighborhoodAttnProcessor(4)
