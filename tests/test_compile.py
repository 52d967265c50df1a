"""The same backend eagerly and under torch.compile, and compiled models with zero graph breaks.

The compile-time choice (backends.compile_time_choice, made while Dynamo traces) sees the real device,
dtype, head dim, kernel size and conditioner presence, and must equal eager dispatch: on CPU, and on a
simulated CUDA device (torch.cuda.is_available and the Triton machine check patched; fake CUDA tensors).
DiscreteDistributionLayer, the DDN model's forward and a local ConditionalDenoiser (forward and backward)
compile with fullgraph=True (a graph break raises) and run on the C++ backends (calls counted).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastcomp
from fastcomp import backends as _b
from helpers import assert_close, count_cpu_extension_calls

OP = "local_conditional_attention"


def _specs(device, dtype, D, kh, kw, cond, mask):
    image, c = (1, kh, kw, 1, D), (1, 1, 1, D)
    return ((device, dtype, image),) * 3 + (((device, dtype, c),) * 2 if cond else (None, None)) + \
        (((device, torch.bool, (1, 1, kh, kw)) if mask else None),)


def _eager_choice(device, dtype, D, kh, kw, cond, mask, requested=None, B=2, H=9, W=11, M=3):
    """What eager dispatch picks for real-sized (fake) tensors of this metadata."""
    with FakeTensorMode():
        q = torch.empty(B, H, W, 2, D, device=device, dtype=dtype)
        ck = torch.empty(B, M, 2, D, device=device, dtype=dtype) if cond else None
        cm = torch.empty(B, M, H, W, device=device, dtype=torch.bool) if mask else None
    return _b.choose(OP, requested, q, q, q, ck, ck, cm).name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_compile_time_choice_equals_eager_on_cpu(dtype):
    for D in (5, 16, 64):
        for cond, mask in ((False, False), (True, False), (True, True)):
            eager = _eager_choice("cpu", dtype, D, 3, 5, cond, mask)
            assert _b.compile_time_choice(OP, None, _specs("cpu", dtype, D, 3, 5, cond, mask)) == eager
            if _b.get(OP, "cpu").machine_reason is None:
                assert eager == "cpu", (dtype, D, cond, mask)  # half precision: float32 inside, not the reference
    assert _b.compile_time_choice(OP, "reference", _specs("cpu", dtype, 16, 3, 3, True, True)) == "reference"


@pytest.fixture
def simulated_cuda(monkeypatch):
    """torch.cuda.is_available() is True and the triton backend's machine check passes (no GPU needed:
    the choices are made on fake CUDA tensors)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for op in (OP, "disk_mask"):
        triton = _b.get(op, "triton")
        monkeypatch.setitem(_b._REGISTRY[op], "triton", dataclasses.replace(triton, machine_check=lambda: None))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [16, 32, 64, 128])
def test_compile_time_choice_equals_eager_on_simulated_cuda(simulated_cuda, dtype, D):
    """Today's choice probed with torch.empty(0): head dim 0, so Triton declined and a compiled model on
    CUDA ran the dense reference. Now the real head dim decides, as eagerly."""
    for cond, mask in ((False, False), (True, True)):
        eager = _eager_choice("cuda", dtype, D, 7, 7, cond, mask)
        assert eager == "triton", (dtype, D, cond, mask)
        assert _b.compile_time_choice(OP, None, _specs("cuda", dtype, D, 7, 7, cond, mask)) == eager
    # outside the Triton kernels' head dims (and float64) both fall back alike
    for dt, d in ((dtype, 8), (torch.float64, D)):
        assert _b.compile_time_choice(OP, None, _specs("cuda", dt, d, 7, 7, True, True)) == \
            _eager_choice("cuda", dt, d, 7, 7, True, True) == "reference"
    with pytest.raises(fastcomp.BackendUnavailable, match="cpu tensors|needs cpu"):
        _b.compile_time_choice(OP, "cpu", _specs("cuda", dtype, D, 7, 7, True, True))


@pytest.fixture
def cpp_calls(monkeypatch):
    """Counts of calls into the C++ extension, by function name."""
    problem = _b.cpp_problem("attention")() or _b.cpp_problem("ddn")()
    if problem is not None:
        pytest.skip(f"the C++ extensions cannot be built here: {problem}")
    return count_cpu_extension_calls(monkeypatch)


def _compiled(fn):
    torch._dynamo.reset()
    # aot_eager: AOTAutograd traces forward and backward as inductor would, without its (slow) codegen.
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_compiled_attention_runs_the_backend_eager_picks(cpp_calls):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 11, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    ck, cv = (torch.randn(2, 3, 2, 16, generator=g) for _ in range(2))
    cm = torch.rand(2, 3, 9, 11, generator=g) < 0.5

    def fn(q, k, v, backend=None):
        return fastcomp.local_conditional_attention(q, k, v, (5, 3), cond_k=ck, cond_v=cv, cond_mask=cm,
                                                    backend=backend).square().sum()

    out = _compiled(fn)(q, k, v)
    out.backward()
    assert cpp_calls.get("local_attention_forward_cpu") == 1 and cpp_calls.get("local_attention_backward_cpu") == 1
    assert_close(out, fn(q.detach(), k.detach(), v.detach(), "reference"), name="compiled output")
    cpp_calls.clear()
    _compiled(lambda q, k, v: fn(q, k, v, "reference"))(q, k, v)  # an explicit backend is honoured
    assert not any(name.startswith("local_attention") for name in cpp_calls), cpp_calls


def test_ddn_layer_and_model_compile_without_graph_breaks(cpp_calls):
    from fastcomp.models import DDN
    from fastcomp.nn import DiscreteDistributionLayer

    torch.manual_seed(0)
    ddl = DiscreteDistributionLayer(8, 3, 16)
    h, t = torch.randn(4, 8, 6, 6, requires_grad=True), torch.randn(4, 3, 6, 6)
    out = _compiled(lambda h, t: ddl(h, target=t).output.square().sum())(h, t)
    out.backward()
    assert_close(out, ddl(h.detach(), target=t).output.square().sum(), name="compiled select")
    assert cpp_calls.get("ddn_chosen_backward_cpu") == 1, cpp_calls
    assert any(name.startswith(("ddn_l2_select_cpu", "ddn_rerank_cpu")) for name in cpp_calls), cpp_calls
    index = torch.tensor([3, 0, 15, 3])
    eager = ddl(h, index=index).output
    cpp_calls.clear()
    out = _compiled(lambda h, i: ddl(h, index=i).output)(h, index)
    assert cpp_calls.get("ddn_chosen_forward_cpu") == 1, cpp_calls
    assert_close(out, eager, name="compiled gather")

    model = DDN(channels=1, image_size=8, k=8, layers_per_stage=1, width=8)
    x = torch.randn(2, 1, 8, 8)
    eager = model(x, train=False).loss
    cpp_calls.clear()
    loss = _compiled(lambda x: model(x, train=False).loss)(x)
    assert_close(loss, eager, name="compiled DDN loss")
    assert sum(c for n, c in cpp_calls.items() if n.startswith("ddn_")) >= \
        model.num_layers, cpp_calls


def test_local_denoiser_forward_and_backward_compile_without_graph_breaks(cpp_calls):
    from fastcomp.models import ConditionalDenoiser

    torch.manual_seed(0)
    model = ConditionalDenoiser(img_channels=1, image_size=8, channels=16, depth=1, kernel_size=3,
                                locality="local", cond_radius=3.0)
    x, points = torch.randn(2, 1, 8, 8), torch.rand(2, 3, 2) * 8
    valid = torch.tensor([[True, True, False], [True, True, True]])
    loss = _compiled(lambda x: model(x, 0.5, points, valid).square().mean())(x)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert cpp_calls.get("disk_mask_cpu") == 1 and cpp_calls.get("local_attention_forward_cpu") == 1
    assert cpp_calls.get("local_attention_backward_cpu") == 1, cpp_calls
    model.zero_grad()
    eager = model(x, 0.5, points, valid).square().mean()
    eager.backward()
    assert_close(loss, eager, name="compiled denoiser loss")
    for n, p in model.named_parameters():
        if n in grads:
            assert_close(grads[n], p.grad, ratio=1e-4, name=f"compiled d{n}")
