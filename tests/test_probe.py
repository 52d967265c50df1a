"""Jacobian locality probes: probe_demux backends vs the reference, exact / coloured / auto pixel_locality
against the one-backward-per-element reference, forward-mode conditioner attribution, noise sweeps, CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastcomp
from fastcomp.backends import BackendUnavailable
from fastcomp.probe import LeakageWarning, conditioner_locality, locality_vs_noise, pixel_locality, probe_demux
from fastcomp.reference import conditioner_locality_reference, pixel_locality_reference, probe_demux_reference

from helpers import assert_close

f64 = torch.float64


# --- the fused demultiplexing kernels --------------------------------------------------------------

DEMUX_CASES = [
    # N, B, K, H, W, radius, stride, transpose
    (5, 2, 3, 7, 9, 2, 5, False),   # coloured, VJP
    (4, 1, 2, 6, 5, 1, 3, True),    # coloured, JVP
    (3, 3, 1, 5, 7, 2, 12, False),  # exact rows: stride beyond the image
    (3, 1, 2, 5, 7, 2, 12, True),
    (2, 1, 1, 3, 2, 3, 7, False),   # image smaller than the probe square
]


def demux_inputs(N, B, K, H, W, radius, stride, dtype=f64):
    g = torch.randn(N, B, K, H, W, dtype=dtype)
    origins = torch.stack([torch.randint(0, min(stride, H), (N,)), torch.randint(0, min(stride, W), (N,))], 1)
    return g, origins


def reference_demux(g, origins, stride, radius, transpose):
    N, s = g.shape[0], 2 * radius + 1
    sums, counts, outside = (torch.empty(N, s * s, dtype=f64), torch.empty(N, s * s, dtype=f64),
                             torch.empty(N, dtype=f64))
    probe_demux_reference(g, origins, stride, radius, transpose, sums, counts, outside)
    return sums, counts, outside


def test_demux_reference_keeps_all_mass_and_matches_a_hand_count():
    g, origins = demux_inputs(4, 2, 2, 7, 6, 1, 3)
    sums, counts, outside = reference_demux(g, origins, 3, 1, False)
    assert_close(sums.sum(1) + outside, g.abs().sum(dim=(1, 2, 3, 4)))
    # Probe 0: count by brute force over every (probe pixel p, input q) pair with |q - p| <= 1.
    H, W = 7, 6
    r0, c0 = origins[0].tolist()
    expect = torch.zeros(3, 3, dtype=f64)
    mass = g[0].abs().sum(dim=(0, 1))
    for pi in range(r0, H, 3):
        for pj in range(c0, W, 3):
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= pi + di < H and 0 <= pj + dj < W:
                        expect[di + 1, dj + 1] += mass[pi + di, pj + dj]
    assert_close(sums[0].view(3, 3), expect)


@pytest.mark.parametrize("case", DEMUX_CASES)
def test_demux_cpu_matches_reference_float64(case):
    N, B, K, H, W, R, S, tr = case
    g, origins = demux_inputs(N, B, K, H, W, R, S)
    ref = probe_demux(g, origins, stride=S, radius=R, transpose=tr, backend="reference")
    out = probe_demux(g, origins, stride=S, radius=R, transpose=tr, backend="cpu")
    for name, a, b in zip(("sums", "counts", "outside"), out, ref):
        assert_close(a, b, name=name)


def test_demux_cpu_float32_input():
    g, origins = demux_inputs(6, 2, 3, 9, 11, 2, 5, dtype=torch.float32)
    ref = probe_demux(g.to(f64), origins, stride=5, radius=2, backend="reference")
    out = probe_demux(g, origins, stride=5, radius=2, backend="cpu")
    for a, b in zip(out, ref):
        assert_close(a, b, dtype=f64)  # float32 inputs, float64 accumulation: exact up to summation order


@pytest.mark.triton
@pytest.mark.parametrize("case", DEMUX_CASES[:4])
def test_demux_triton_matches_reference(case, triton_device):
    N, B, K, H, W, R, S, tr = case
    g, origins = demux_inputs(N, B, K, H, W, R, S)
    ref = probe_demux(g, origins, stride=S, radius=R, transpose=tr, backend="reference")
    out = probe_demux(g.to(triton_device), origins, stride=S, radius=R, transpose=tr, backend="triton")
    for name, a, b in zip(("sums", "counts", "outside"), out, ref):
        assert_close(a, b, name=name)


def test_demux_is_listed_and_refuses_bad_backends():
    names = [b.name for b in fastcomp.backends.backends("probe_demux")]
    assert {"reference", "cpu", "triton"} <= set(names)
    g, origins = demux_inputs(1, 1, 1, 3, 3, 1, 3)
    with pytest.raises((ValueError, BackendUnavailable), match="cuda"):
        probe_demux(g, origins, stride=3, radius=1, backend="cuda")
    with pytest.raises(ValueError, match="stride"):
        probe_demux(g, origins, stride=2, radius=1)


# --- pixel locality on stacks of convolutions ------------------------------------------------------

def conv_stack(c_in, c_out, kernels, dtype=f64):
    """tanh(conv) layers; receptive radius sum(k // 2); channel count c_in -> c_out."""
    chans = [c_in] + [c_out] * len(kernels)
    weights = [torch.randn(chans[i + 1], chans[i], k, k, dtype=dtype) / k for i, k in enumerate(kernels)]

    def fn(x):
        for w in weights:
            x = torch.tanh(F.conv2d(x, w, padding=w.shape[-1] // 2))
        return x

    return fn


@pytest.mark.parametrize("B, C, C_out, H, W, kernels, R", [
    (1, 2, 3, 7, 9, (3, 3), 3),      # radius beyond the receptive field, more output channels
    (3, 3, 2, 9, 7, (5, 3), 3),      # receptive field exactly R, fewer output channels
    (3, 1, 1, 5, 6, (3,), 2),        # image barely larger than the probe square
    (1, 2, 2, 4, 3, (3,), 2),        # image smaller than the probe square
])
def test_colored_and_exact_equal_the_reference_on_conv_stacks(B, C, C_out, H, W, kernels, R):
    fn = conv_stack(C, C_out, kernels)
    x = torch.randn(B, C, H, W, dtype=f64)
    ref = pixel_locality_reference(fn, x, R)
    rf = min(sum(k // 2 for k in kernels), R)
    assert ref.leakage == 0.0 and ref.mass_radius(1.0) == rf
    for mode in ("forward", "reverse"):
        exact = pixel_locality(fn, x, radius=R, method="exact", mode=mode, chunk_size=64)
        colored = pixel_locality(fn, x, radius=R, method="colored", mode=mode, chunk_size=40)  # several chunks
        auto = pixel_locality(fn, x, radius=R, mode=mode)
        for res in (exact, colored, auto):
            assert (res.profile - ref.profile).abs().max() <= 1e-10 * ref.profile.abs().max(), (mode, res.method)
            assert res.mass_radius(1.0) == rf
        assert exact.leakage == 0.0
        assert auto.leakage == 0.0 and auto.method == "colored" and not auto.check["fell_back"]
        assert colored.leakage != colored.leakage  # NaN: the coloured probe cannot see beyond R


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_exact_measures_leakage_like_the_reference(mode):
    fn = conv_stack(2, 2, (5, 3))  # radius 3 probed at radius 1
    x = torch.randn(3, 2, 7, 8, dtype=f64)
    ref = pixel_locality_reference(fn, x, 1)
    out = pixel_locality(fn, x, radius=1, method="exact", mode=mode, chunk_size=50)
    assert_close(out.profile, ref.profile)
    assert out.leakage == pytest.approx(ref.leakage, rel=1e-12) and ref.leakage > 0.1


def test_float32_colored_matches_reference_and_fn_ignoring_x():
    fn = conv_stack(2, 2, (3, 3), dtype=torch.float32)
    x = torch.randn(2, 2, 7, 6)
    ref = pixel_locality_reference(lambda t: fn(t.float()).double(), x.double(), 2)
    out = pixel_locality(fn, x, radius=2, method="colored")
    assert_close(out.profile, ref.profile, ratio=1e-5)
    zero = pixel_locality(lambda t: torch.zeros_like(t) + 1.0, x, radius=1, method="exact", mode="reverse")
    assert float(zero.profile.abs().max()) == 0.0 and zero.mass_radius(0.5) == 0


def test_unsupported_forward_mode_falls_back_to_reverse():
    class NoForward(torch.autograd.Function):  # a custom op without a forward-mode derivative
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    fn = conv_stack(2, 2, (3,))
    x = torch.randn(1, 2, 7, 6, dtype=f64)
    with pytest.warns(RuntimeWarning, match="reverse mode"):
        out = pixel_locality(lambda t: NoForward.apply(fn(t)), x, radius=2, method="colored")
    ref = pixel_locality_reference(lambda t: 2 * fn(t), x, 2)
    assert_close(out.profile, ref.profile)


# --- a global model: the coloured probe must not silently alias ------------------------------------

def global_attention(C=2, dim=8):
    """1-layer self-attention over all pixels (plus a 3x3 conv): every output depends on every input."""
    g = torch.Generator().manual_seed(1)
    wq, wk, wv = (torch.randn(dim, C, generator=g, dtype=f64) for _ in range(3))
    conv = torch.randn(C, C, 3, 3, generator=g, dtype=f64) / 3

    def fn(x):
        B = x.shape[0]
        t = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        att = torch.softmax((t @ wq.T) @ (t @ wk.T).transpose(1, 2) / dim ** 0.5, dim=-1)
        mixed = (att @ (t @ wv.T))[..., :C].transpose(1, 2).reshape(B, C, *x.shape[2:])
        return F.conv2d(x, conv, padding=1) + mixed

    return fn


def test_auto_detects_a_global_model_and_falls_back_to_exact():
    fn, x = global_attention(), torch.randn(2, 2, 5, 7, dtype=f64)
    ref = pixel_locality_reference(fn, x, 2)
    colored = pixel_locality(fn, x, radius=2, method="colored")
    assert (colored.profile - ref.profile).abs().max() > 1e-3 * ref.profile.abs().max()  # aliased: wrong
    with pytest.warns(LeakageWarning, match="not radius-local"):
        auto = pixel_locality(fn, x, radius=2)
    assert auto.method == "exact" and auto.check["fell_back"] and auto.check["sampled_leakage"] > 1e-3
    assert_close(auto.profile, ref.profile)
    assert auto.leakage == pytest.approx(ref.leakage, rel=1e-10) and ref.leakage > 0.1
    with pytest.warns(LeakageWarning, match="on_leakage='report'"):
        rep = pixel_locality(fn, x, radius=2, on_leakage="report", mode="reverse")
    assert rep.method == "colored" and rep.leakage > 1e-3
    with pytest.raises(ValueError, match="not radius-local"):
        pixel_locality(fn, x, radius=2, on_leakage="raise")


# --- conditioner attribution ---------------------------------------------------------------------

class _StandInLocalConditionalAttention(torch.nn.Module):
    """fastcomp.nn.LocalConditionalAttention's contract on the reference op, until that layer lands."""

    def __init__(self, dim, num_heads, kernel_size, cond_dim=None, qkv_bias=True):
        super().__init__()
        self.heads, self.kernel_size = num_heads, kernel_size
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.cond_kv = torch.nn.Linear(cond_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, cond=None, cond_mask=None):
        B, H, W, dim = x.shape
        q, k, v = self.qkv(x).view(B, H, W, 3, self.heads, dim // self.heads).unbind(3)
        ck, cv = self.cond_kv(cond).view(B, cond.shape[1], 2, self.heads, dim // self.heads).unbind(2)
        out = fastcomp.local_conditional_attention(q, k, v, self.kernel_size, cond_k=ck, cond_v=cv,
                                                   cond_mask=cond_mask, backend="reference")
        return self.proj(out.reshape(B, H, W, dim))


def lca_layer(*args, **kwargs):
    cls = getattr(fastcomp.nn, "LocalConditionalAttention", _StandInLocalConditionalAttention)
    return cls(*args, **kwargs)


@pytest.mark.parametrize("B, H, W", [(1, 7, 9), (3, 9, 8)])
def test_local_conditional_attention_attribution_is_zero_outside_each_disk(B, H, W):
    M, dim, cond_dim, C = 3, 32, 5, 2
    layer = lca_layer(dim, 2, 3, cond_dim=cond_dim).to(f64).eval()
    embed = torch.nn.Linear(C, dim).to(f64)
    points = torch.rand(B, M, 2, dtype=f64) * torch.tensor([H, W], dtype=f64)
    cmask = fastcomp.disk_mask(points, 2.5, H, W)
    cmask[0, M - 1] = False  # padding: a conditioner no pixel may attend

    def fn(x, cond):  # [B, C, H, W] -> [B, C, H, W] through the layer
        out = layer(embed(x.permute(0, 2, 3, 1)), cond, cmask)
        return out[..., :C].permute(0, 3, 1, 2)

    x, cond = torch.randn(B, C, H, W, dtype=f64), torch.randn(B, M, cond_dim, dtype=f64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fused layer may lack forward-mode AD: reverse
        res = conditioner_locality(fn, x, cond, cmask)
    assert res.attribution.shape == (B, M, H, W)
    assert float(res.attribution[~cmask].abs().max()) == 0.0
    real = cmask.flatten(2).any(-1)
    assert bool((res.attribution.sum(dim=(2, 3))[real] > 0).all())
    assert torch.equal(res.inside_fraction[real], torch.ones_like(res.inside_fraction[real]))
    assert bool(torch.isnan(res.inside_fraction[0, M - 1]))
    if B == 1:
        ref = conditioner_locality_reference(fn, x, cond, cmask)
        assert_close(res.attribution, ref.attribution)


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_conditioner_attribution_equals_reference_when_global(method):
    B, M, Dc, H, W = 3, 2, 4, 5, 7
    w = torch.randn(Dc, 3, dtype=f64)
    spatial = torch.randn(M, H, W, dtype=f64)

    def fn(x, cond):  # every conditioner reaches every pixel, nonlinearly, and changes the channel count
        e = torch.tanh(cond @ w)  # [B, M, 3]
        return torch.sin(x.sum(1, keepdim=True) + torch.einsum("bmc,mhw->bchw", e, spatial))

    cmask = fastcomp.disk_mask(torch.rand(B, M, 2) * torch.tensor([H, W]), 1.5, H, W)
    x, cond = torch.randn(B, 2, H, W, dtype=f64), torch.randn(B, M, Dc, dtype=f64)
    ref = conditioner_locality_reference(fn, x, cond, cmask)
    res = conditioner_locality(fn, x, cond, cmask, method=method, chunk_size=3)
    assert_close(res.attribution, ref.attribution)
    assert_close(res.inside_fraction, ref.inside_fraction)
    assert bool((res.inside_fraction < 1).all())


# --- noise sweeps, plots, CLI --------------------------------------------------------------------

def sigma_dependent_denoiser():
    """3x3 receptive field below sigma 1, 7x7 from sigma 1: the mass radius must follow."""
    small, large = torch.randn(1, 1, 3, 3, dtype=f64).abs() + 0.1, torch.ones(1, 1, 7, 7, dtype=f64)

    def denoiser(x, sigma):
        w = small if sigma < 1 else large
        return F.conv2d(x, w, padding=w.shape[-1] // 2) / (1 + sigma)

    return denoiser


def test_locality_vs_noise_reports_radius_per_level():
    res = locality_vs_noise(sigma_dependent_denoiser(), torch.randn(2, 1, 9, 10, dtype=f64), [0.1, 0.5, 2.0],
                            radius=4, n_noise=2)
    assert res.radii[0.95][:2] == (1, 1) and res.radii[0.95][2] == 3
    assert res.radii[0.5][2] <= res.radii[0.75][2] <= res.radii[0.95][2]
    rows = res.rows()
    assert [r["sigma"] for r in rows] == [0.1, 0.5, 2.0] and rows[2]["side_95"] == 7
    assert all(r["leakage"] == 0.0 for r in rows)
    assert res.profiles.shape == (3, 9, 9)


def test_plots_render(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.randn(1, 1, 6, 7, dtype=f64)
    pixel_locality(conv_stack(1, 1, (3,)), x, radius=2).plot().figure.savefig(tmp_path / "p.png")
    locality_vs_noise(sigma_dependent_denoiser(), x, [0.1, 2.0], radius=3).plot().figure.savefig(tmp_path / "n.png")
    cmask = fastcomp.disk_mask(torch.tensor([[[2.0, 3.0], [4.0, 1.0]]]), 1.5, 6, 7)
    res = conditioner_locality(lambda a, c: a * c.sum(-1)[:, :, None, None].mul(cmask).sum(1, keepdim=True),
                               x, torch.randn(1, 2, 3, dtype=f64), cmask)
    res.plot(cond_mask=cmask)[0].figure.savefig(tmp_path / "c.png")
    plt.close("all")
    assert all((tmp_path / n).stat().st_size > 0 for n in ("p.png", "n.png", "c.png"))


class _TinyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x, sigma: float):
        return self.conv(x) / (1.0 + sigma)


@pytest.mark.parametrize("fmt", ["pickle", "torchscript"])
def test_cli_probe_end_to_end(tmp_path, capsys, fmt):
    from fastcomp.cli import main

    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 3, 3, padding=1))
    path = tmp_path / "net.pt"
    if fmt == "pickle":
        torch.save(net, path)
    else:
        torch.jit.save(torch.jit.script(net), path)
    out = tmp_path / "res" / "probe"
    trust = ["--trust-pickle"] if fmt == "pickle" else []  # unpickling runs code: only on request
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["probe", str(path), "--radius", "3", "--size", "9x7", "--channels", "2", "--batch", "1",
                     "--out", str(out)] + trust) == 0
    assert any("--trust-pickle" in str(w.message) for w in caught) == (fmt == "pickle")
    summary = json.loads(out.with_name("probe.json").read_text())
    assert summary["mass_radius"]["100"] == 2 and summary["leakage"] == 0.0
    assert len(summary["profile"]) == 7
    assert out.with_name("probe.png").stat().st_size > 0
    assert "mass radius" in capsys.readouterr().out


def test_cli_probe_denoiser_sigmas(tmp_path, capsys):
    from fastcomp.cli import main

    path = tmp_path / "den.pt"
    torch.save(_TinyDenoiser(), path)
    out = tmp_path / "noise"
    with pytest.warns(UserWarning, match="--trust-pickle: unpickling"):
        assert main(["probe", str(path), "--radius", "2", "--size", "7", "--channels", "2", "--sigmas",
                     "0.1,1,10", "--method", "colored", "--out", str(out), "--trust-pickle"]) == 0
    levels = json.loads(out.with_name("noise.json").read_text())["levels"]
    assert [lv["sigma"] for lv in levels] == [0.1, 1.0, 10.0] and all(lv["radius_95"] == 1 for lv in levels)
    capsys.readouterr()
    torch.save(_TinyDenoiser().state_dict(), tmp_path / "sd.pt")
    assert main(["probe", str(tmp_path / "sd.pt")]) == 2
    assert "holds a state_dict" in capsys.readouterr().err


def test_probe_argument_errors():
    x = torch.randn(1, 1, 5, 5)
    with pytest.raises(ValueError, match="chunk_size"):
        pixel_locality(lambda t: t, x, radius=1, chunk_size=0)
    with pytest.raises(ValueError, match="on_leakage"):
        pixel_locality(lambda t: t, x, radius=1, on_leakage="ignore")
    with pytest.raises(ValueError, match="mode"):
        pixel_locality(lambda t: t, x, radius=1, mode="sideways")
    with pytest.raises(ValueError, match="method"):
        conditioner_locality(lambda a, c: a, x, torch.randn(1, 2, 3), torch.ones(1, 2, 5, 5, dtype=torch.bool),
                             method="colored")
    with pytest.raises(ValueError, match="sigmas"):
        locality_vs_noise(lambda a, s: a, x, [], radius=1)


@pytest.mark.gpu
def test_pixel_locality_on_cuda_matches_cpu():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv2d(3, 3, 3, padding=1)).eval()
    x = torch.randn(2, 3, 17, 15)
    cpu = pixel_locality(net, x, radius=2, method="colored")
    gpu = pixel_locality(net.cuda(), x.cuda(), radius=2, method="colored")  # demux on the triton backend
    assert_close(gpu.profile.cpu(), cpu.profile, ratio=1e-5)
    exact = pixel_locality(net, x.cuda(), radius=2, method="exact", chunk_size=100)
    assert exact.leakage == 0.0 and exact.mass_radius(1.0) == 2
