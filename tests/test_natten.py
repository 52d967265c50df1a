"""NATTEN 0.21 compatibility, against the installed NATTEN (its Flex backend on CPU: forward only, float32):
fastcomp.natten.na2d with and without additional tokens, the NATTEN 0.21 signature of
fastcomp.nn.NeighborhoodAttention2D, and fastcomp.patch.replace_natten on a model (outputs, state_dict
round trips, the layers it must leave alone)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastcomp
from fastcomp.natten import na2d
from fastcomp.patch import replace_natten
from fastcomp.nn import NeighborhoodAttention2D
from helpers import assert_close

natten = pytest.importorskip(
    "natten", reason="NATTEN is not installed: `pip install --no-build-isolation natten==0.21.7` after torch")


@pytest.fixture(autouse=True)
def _quiet_flex():
    # NATTEN's CPU path is flex_attention without torch.compile, which warns on every call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")
        yield


def _natten_na2d(*args, **kwargs):
    with torch.no_grad():  # NATTEN's Flex path has no backward on CPU
        return natten.na2d(*args, **kwargs)


def test_na2d_matches_natten_with_and_without_additional_tokens_and_gqa():
    torch.manual_seed(0)
    B, X, Y, heads, D = 2, 13, 17, 4, 16
    q = torch.randn(B, X, Y, heads, D)
    k, v = torch.randn(B, X, Y, 2, D), torch.randn(B, X, Y, 2, D)  # GQA: 2 key/value heads
    ak, av = torch.randn(B, 5, 2, D), torch.randn(B, 5, 2, D)
    out = na2d(q, k, v, (5, 3), scale=0.3, backend="cpu")  # "cpu" named: the fast path, or an error
    assert_close(out, _natten_na2d(q, k, v, (5, 3), scale=0.3), name="na2d vs natten")
    out = na2d(q, k, v, 7, additional_keys=ak, additional_values=av, backend="cpu")
    ref = _natten_na2d(q, k, v, 7, additional_keys=ak, additional_values=av)
    assert_close(out, ref, name="na2d + additional tokens vs natten")
    # differentiable (NATTEN on CPU is not), and the same as the float64 reference
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    na2d(q64, k64, v64, 5).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q64, k64, v64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dilation=2), "dilation"),
    (dict(stride=(1, 2)), "stride"),
    (dict(is_causal=(True, False)), "is_causal"),
    (dict(kernel_size=4), "even"),
])
def test_na2d_unsupported_options_name_the_option(kwargs, match):
    q = torch.randn(1, 9, 9, 2, 16)
    kwargs = {"kernel_size": 3, **kwargs}
    with pytest.raises(NotImplementedError, match=match):
        na2d(q, q, q, **kwargs)


def test_layer_takes_natten_021_signature():
    # positional stride (NATTEN 0.21's fourth argument) and every 0.21 keyword
    layer = NeighborhoodAttention2D(16, 2, 5, 1, 1, False, False, 0.25, 0.0)
    assert layer.qkv.bias is None and layer.scale == 0.25
    assert (layer.stride, layer.dilation, layer.is_causal) == ((1, 1), (1, 1), (False, False))
    NeighborhoodAttention2D(embed_dim=16, num_heads=2, kernel_size=(5, 3), stride=(1, 1), dilation=1,
                            is_causal=(False, False), qkv_bias=True, qk_scale=None, proj_drop=0.1)
    NeighborhoodAttention2D(16, 2, 5, rel_pos_bias=False, attn_drop=0.0)  # older keywords, by name
    with pytest.raises(NotImplementedError, match="stride"):
        NeighborhoodAttention2D(16, 2, 5, 2)
    with pytest.raises(NotImplementedError, match="even"):
        NeighborhoodAttention2D(16, 2, (5, 4))
    with pytest.raises(TypeError):  # 0.21 has no such keyword either
        NeighborhoodAttention2D(16, 2, 5, attn_dropout=0.1)


class _Block(nn.Module):
    def __init__(self, dim, **na_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = natten.NeighborhoodAttention2D(dim, 2, **na_kwargs)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class _Model(nn.Module):
    """Two plain 2-D blocks fastcomp can run, one dilated (it cannot), a 1-D layer, and a shared layer."""

    def __init__(self, dim=32):
        super().__init__()
        self.blocks = nn.Sequential(_Block(dim, kernel_size=5), _Block(dim, kernel_size=(3, 5), qk_scale=0.2))
        self.dilated = natten.NeighborhoodAttention2D(dim, 2, kernel_size=3, dilation=2)
        self.seq = natten.NeighborhoodAttention1D(dim, 2, kernel_size=3)
        self.shared = self.blocks[0].attn

    def forward(self, x):
        return self.dilated(self.blocks(x))


def test_replace_natten_swaps_what_fastcomp_runs_and_keeps_outputs_and_state_dict():
    torch.manual_seed(0)
    model = _Model().eval()
    x = torch.randn(2, 11, 13, 32)
    with torch.no_grad():
        before = model(x)
    keys = list(model.state_dict())
    with pytest.warns(UserWarning, match="left 2 NATTEN layer") as record:
        assert replace_natten(model, backend="cpu") == 2
    message = str(record[0].message)
    assert "dilated: dilation=(2, 2)" in message and "seq: NeighborhoodAttention1D" in message
    assert isinstance(model.blocks[0].attn, NeighborhoodAttention2D)
    assert isinstance(model.blocks[1].attn, NeighborhoodAttention2D)
    assert model.shared is model.blocks[0].attn  # a shared layer stays shared
    assert isinstance(model.dilated, natten.NeighborhoodAttention2D)
    assert not model.blocks[0].attn.training and model.blocks[1].attn.scale == 0.2
    with torch.no_grad():
        after = model(x)
    assert_close(after, before, name="swapped model vs NATTEN model")

    # state_dict round trips: the swapped model's weights load into a NATTEN model and back, unchanged
    assert list(model.state_dict()) == keys
    fresh = _Model()
    fresh.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    again = _Model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        replace_natten(again)
    again.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        assert_close(again.eval()(x), before, name="NATTEN state_dict into a swapped model")


def test_replace_natten_refuses_a_bare_layer_and_trains():
    layer = natten.NeighborhoodAttention2D(16, 2, kernel_size=3)
    with pytest.raises(ValueError, match="from_natten"):
        replace_natten(layer)
    swapped = NeighborhoodAttention2D.from_natten(layer.double(), backend="cpu")
    assert swapped.qkv.weight.dtype == torch.float64 and swapped.training
    x = torch.randn(1, 7, 9, 16, dtype=torch.float64, requires_grad=True)
    swapped(x).square().sum().backward()
    assert x.grad is not None and swapped.qkv.weight.grad is not None


def test_bench_peer_computes_neighborhood_attention():
    """The `fastcomp bench` natten provider must do the op's work (M0 case), or the ratio compares
    different things; with conditioners it declines with the reason."""
    from fastcomp.bench import cases

    for M, skip in ((0, False), (3, True)):
        size = cases.AttnSize(1, 9, 11, 2, 16, 5, M)
        inp = cases._attention_inputs(size, "fwd", torch.device("cpu"), torch.float32)
        (prov,) = [p for p in cases._attention_providers(inp, cases.Options(compile_peers=False))
                   if p.name == "natten"]
        if skip:
            assert prov.skip and "mask" in prov.skip
            continue
        ref = fastcomp.local_conditional_attention(inp["q"], inp["k"], inp["v"], 5, backend="reference")
        assert_close(prov.build()(), ref, name="natten peer")
