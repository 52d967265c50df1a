"""fastcomp.nn.LocalConditionalAttention and NeighborhoodAttention2D: shapes, equivalence with the
functional op, gradients to every parameter, NATTEN-compatible construction and its refused options."""

from __future__ import annotations

import pytest
import torch

import fastcomp
from fastcomp.nn import LocalConditionalAttention, NeighborhoodAttention2D
from helpers import assert_close


def test_local_conditional_attention_layer_equals_functional_op():
    torch.manual_seed(0)
    layer = LocalConditionalAttention(12, 3, (5, 3), cond_dim=7).double()
    x = torch.randn(2, 9, 10, 12, dtype=torch.float64)
    cond = torch.randn(2, 4, 7, dtype=torch.float64)
    cm = torch.rand(2, 4, 9, 10) < 0.3
    out = layer(x, cond, cm)
    assert out.shape == x.shape
    q, k, v = layer.qkv(x).reshape(2, 9, 10, 3, 3, 4).unbind(3)
    ck, cv = layer.cond_kv(cond).reshape(2, 4, 2, 3, 4).unbind(2)
    ref = fastcomp.local_conditional_attention(q, k, v, (5, 3), cond_k=ck, cond_v=cv, cond_mask=cm,
                                               backend="reference")
    assert_close(out, layer.proj(ref.reshape(2, 9, 10, 12)), name="layer vs op")
    # every backend through the layer's backend= gives the same
    assert_close(layer(x, cond, cm, backend="reference"), out, name="backend=reference")


def test_local_conditional_attention_layer_without_cond_and_grads_flow():
    layer = LocalConditionalAttention(8, 2, 3)
    x = torch.randn(1, 6, 7, 8, requires_grad=True)
    cond = torch.randn(1, 2, 8)
    layer(x, cond).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert layer(x).shape == x.shape  # no conditioners: plain neighborhood attention


def test_local_conditional_attention_layer_errors():
    with pytest.raises(ValueError, match="divisible"):
        LocalConditionalAttention(10, 3, 3)
    layer = LocalConditionalAttention(8, 2, 3, cond_dim=5)
    with pytest.raises(ValueError, match="cond must be"):
        layer(torch.randn(1, 6, 6, 8), torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(1, 6, 6, 7))


def test_neighborhood_attention_matches_op_and_natten_layout():
    torch.manual_seed(0)
    layer = NeighborhoodAttention2D(embed_dim=12, num_heads=2, kernel_size=5, qk_scale=0.3).double()
    x = torch.randn(2, 8, 9, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    # NATTEN's qkv layout: reshape(B, H, W, 3, heads, head_dim)
    q, k, v = layer.qkv(x).reshape(2, 8, 9, 3, 2, 6).unbind(3)
    ref = fastcomp.local_conditional_attention(q, k, v, 5, scale=0.3, backend="reference")
    assert_close(out, layer.proj(ref.reshape(2, 8, 9, 12)), name="NA2D vs op")
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and layer.qkv.weight.grad is not None
    assert set(dict(layer.named_parameters())) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(dilation=2), "dilation"),
    (dict(is_causal=True), "is_causal"),
    (dict(rel_pos_bias=True), "rel_pos_bias"),
    (dict(attn_drop=0.1), "attn_drop"),
])
def test_neighborhood_attention_unsupported_options_raise(kwargs, match):
    with pytest.raises(NotImplementedError, match=match):
        NeighborhoodAttention2D(8, 2, 3, **kwargs)


def test_neighborhood_attention_input_errors():
    layer = NeighborhoodAttention2D(8, 2, 7)
    with pytest.raises(ValueError, match="embed_dim"):
        layer(torch.randn(1, 8, 8, 6))
    with pytest.raises(ValueError, match="kernel_size"):  # image smaller than the window
        layer(torch.randn(1, 5, 8, 8))
