"""Named benchmark cases: per op, the shapes worth timing and every provider that can run them.

A :class:`Case` is (op, shape name, dtype, mode) plus a function building its inputs on a device and
one building its providers on those inputs. Providers of a case, in order:

- ``reference``: the plain-PyTorch spec, always included; every speedup is measured against it on the
  same inputs in the same run;
- every other backend registered for the op in ``fastcomp.backends`` (called through the public op with
  ``backend=name``), skipped with its ``why_not`` reason when it cannot run on the inputs;
- peers from other libraries where importable: torch's ``flex_attention`` and NATTEN's ``na2d`` (on CPU
  its Flex path; cases without conditioners only, as NATTEN has no per-pixel conditioner mask) for local
  conditional attention; the official DDN code's selection (sddn's ``DiscreteDistributionOutput`` in
  training mode) for ``ddn_select``.

Sizes come in three tiers: ``quick`` (seconds on a laptop CPU), ``cpu`` (the default on CPU, a couple of
minutes on 2 cores in all) and ``gpu`` (the default on CUDA, bf16, model-sized).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

import fastcomp
from fastcomp import backends as _backends
from fastcomp.ops._checks import dtype_name  # noqa: F401  (re-exported: the runner and suites name dtypes)

OPS = ("local_conditional_attention", "ddn_select", "ddn_gather", "pixel_locality", "disk_mask")
OPS = OPS + ("train_step",)  # one training step of the local ConditionalDenoiser (train_step_bench.py)
TIERS = ("quick", "cpu", "gpu")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Options:
    """What the run allows: compile_peers=False skips torch.compile peers (tens of seconds on CPU)."""

    compile_peers: bool = True


@dataclass
class Provider:
    """One way to run a case. ``build()`` does untimed setup (block masks, compilation handles) and returns
    the callable that is timed; ``skip`` says why the provider cannot run here instead."""

    name: str
    build: Optional[Callable[[], Callable[[], Any]]] = None
    skip: Optional[str] = None


@dataclass
class Case:
    op: str
    shape: str
    mode: str
    make_inputs: Callable[[torch.device, torch.dtype], dict]
    make_providers: Callable[[dict, Options], list[Provider]]
    provider_names: Callable[[], list[str]]
    fixed_dtype: Optional[torch.dtype] = None  # the case ignores --dtype (probes and masks run in float32)
    note: str = ""
    size: Any = None  # the case's size record (AttnSize, ...) for reports that need the dimensions

    def dtype(self, requested: torch.dtype) -> torch.dtype:
        return self.fixed_dtype or requested

    @property
    def name(self) -> str:
        return f"{self.op} [{self.shape}] {self.mode}"


# --- shared provider machinery ---------------------------------------------------------------------

def with_backward(forward: Callable[[], torch.Tensor], wrt: list[torch.Tensor]) -> Callable[[], Any]:
    """forward + backward with a fixed random cotangent; torch.autograd.grad so .grad never accumulates."""
    cotangent = {}

    def run():
        out = forward()
        if "g" not in cotangent:
            cotangent["g"] = torch.randn_like(out)
        return torch.autograd.grad(out, wrt, cotangent["g"], allow_unused=True)

    return run


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def backend_providers(op: str, check_args: tuple, call: Callable[[str], Callable[[], Any]]) -> list[Provider]:
    """reference first, then every other registered backend of ``op``, best first.

    check_args: what the op passes to ``why_not`` (as fastcomp.backends.select receives them);
    call(name): the callable that runs the case with ``backend=name``.
    """
    out = [Provider("reference", build=lambda: call("reference"))]
    for b in _backends.backends(op):
        if b.name == "reference":
            continue
        try:
            reason = _backends.not_for_auto(b, *check_args) or b.why_not(*check_args)
        except Exception as e:  # a broken check must not sink the run
            reason = f"why_not raised {_first_line(e)}"
        if reason is not None:
            out.append(Provider(b.name, skip=reason))
        else:
            out.append(Provider(b.name, build=functools.partial(call, b.name)))
    return out


def registered_names(op: str) -> list[str]:
    names = [b.name for b in _backends.backends(op)]
    return ["reference"] + [n for n in names if n != "reference"]


# --- local conditional attention -------------------------------------------------------------------

@dataclass(frozen=True)
class AttnSize:
    B: int
    H: int
    W: int
    heads: int
    D: int
    kernel: int
    M: int
    cond_fraction: float = 0.2  # each conditioner is allowed on about this fraction of the pixels

    @property
    def label(self) -> str:
        return f"B{self.B} {self.H}x{self.W} h{self.heads} d{self.D} k{self.kernel} M{self.M}"


def _attention_inputs(size: AttnSize, mode: str, device, dtype) -> dict:
    s = size
    grad = mode == "fwd+bwd"
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    q, k, v = (rand(s.B, s.H, s.W, s.heads, s.D) for _ in range(3))
    cond_k, cond_v = (rand(s.B, s.M, s.heads, s.D) for _ in range(2))
    # Disks of area cond_fraction * H * W with centres far enough from the border to stay whole.
    radius = math.sqrt(s.cond_fraction * s.H * s.W / math.pi)
    lo = torch.tensor([min(radius, s.H / 2), min(radius, s.W / 2)])
    span = torch.tensor([s.H, s.W]) - 2 * lo
    points = (lo + torch.rand(s.B, s.M, 2, generator=g) * span).to(device)
    cond_mask = fastcomp.disk_mask(points, radius, s.H, s.W, backend="reference")  # inputs, not timed
    return dict(q=q, k=k, v=v, cond_k=cond_k, cond_v=cond_v, cond_mask=cond_mask, size=s, mode=mode)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def plain_attention(q, k, v, cond_k, cond_v, cond_mask, kernel_size, scale):
    """Local conditional attention as plain PyTorch ops in the inputs' dtype: scores, masked softmax and
    P @ V each rounded to that dtype, the baseline of the low-precision rule (ours within ~2x its error
    against a float32/float64 reference). scaled_dot_product_attention is no such baseline: on CPU it keeps
    half-precision intermediates in float32, stricter than the kernels, which round P to half precision
    before P @ V as FlashAttention does. Dense: [B, heads, N, N + M] scores."""
    from fastcomp.reference import window_mask

    B, H, W, heads, D = q.shape
    N = H * W
    tok = (lambda x: x.reshape(B, N, heads, D).transpose(1, 2))  # [B, heads, N, D]
    keys, values = tok(k), tok(v)
    mask = window_mask(H, W, *kernel_size, q.device).expand(B, N, N)
    if cond_k is not None:
        M = cond_k.shape[1]
        keys = torch.cat([keys, cond_k.transpose(1, 2)], dim=2)
        values = torch.cat([values, cond_v.transpose(1, 2)], dim=2)
        allowed = (torch.ones(B, N, M, dtype=torch.bool, device=q.device) if cond_mask is None
                   else cond_mask.reshape(B, M, N).transpose(1, 2))
        mask = torch.cat([mask, allowed], dim=2)
    scores = (tok(q) @ keys.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), dim=-1)
    return (probs @ values).transpose(1, 2).reshape(B, H, W, heads, D)


def tile_major_order(H: int, W: int, tile: tuple[int, int], device=None) -> torch.Tensor:
    """[H*W] int64 token order in which each TH x TW pixel tile is contiguous (tiles row-major, pixels
    row-major inside a tile), as NATTEN flattens: token t holds pixel order[t] (a row-major index). With
    TH * TW = 128, every 128-token flex_attention block is one 2-D tile, so its key blocks are the tile's
    halo instead of whole image rows. H and W must be multiples of TH and TW."""
    TH, TW = tile
    if H % TH or W % TW:
        raise ValueError(f"tile {TH}x{TW} does not divide the image {H}x{W}")
    t = torch.arange(H * W, device=device)
    tile_index, within = t // (TH * TW), t % (TH * TW)
    rows = (tile_index // (W // TW)) * TH + within // TW
    cols = (tile_index % (W // TW)) * TW + within % TW
    return rows * W + cols


def flex_block_mask(cond_mask: torch.Tensor, H: int, W: int, kernel: int, device, *, order=None,
                    compile_mask=None):
    """flex_attention BlockMask for local conditional attention with a square kernel: image keys are the
    first H*W keys (window rule of the reference), conditioner keys follow, allowed by cond_mask [B, M, H, W].

    order: None (tokens in row-major pixel order) or [H*W] int64, token t holds pixel order[t] for queries
    and image keys alike (`tile_major_order`); flex_local_conditional_attention takes the same order.
    compile_mask (default: on CUDA, or wherever the dense intermediates would pass 1 GiB): build it with
    create_block_mask(_compile=True). Uncompiled, create_block_mask evaluates mask_mod densely, with int64
    intermediates of B * N * (N + M) elements (~8.6 GB each at B4 128x128); compiled, it fuses them away.
    On CPU at the benchmark sizes (~270 MB) the uncompiled build is faster than compiling it."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, M = cond_mask.shape[:2]
    N = H * W
    if compile_mask is None:
        compile_mask = torch.device(device).type == "cuda" or B * N * (N + M) * 8 > 2**30
    allowed = cond_mask.reshape(B, M, N).transpose(1, 2)  # [B, N(pixels), M]
    if order is not None:
        order = order.to(device)
        allowed = allowed[:, order]  # [B, N(tokens), M]
    allowed = allowed.contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        q_pix, k_pix = q_idx, kv_idx.clamp(0, N - 1)
        if order is not None:
            q_pix, k_pix = order[q_pix], order[k_pix]
        qi, qj = q_pix // W, q_pix % W
        r0 = (qi - kernel // 2).clamp(0, H - kernel)
        c0 = (qj - kernel // 2).clamp(0, W - kernel)
        ki, kj = k_pix // W, k_pix % W
        image = (kv_idx < N) & (ki >= r0) & (ki < r0 + kernel) & (kj >= c0) & (kj < c0 + kernel)
        if M == 0:
            return image
        cond = (kv_idx >= N) & allowed[b, q_idx, (kv_idx - N).clamp(0, M - 1)]
        return image | cond

    return create_block_mask(mask_mod, B, None, N, N + M, device=device, _compile=compile_mask)


def flex_local_conditional_attention(flex, q, k, v, cond_k, cond_v, block_mask, order=None):
    """Local conditional attention through ``flex`` (flex_attention, compiled or not); [B, H, W, heads, D].
    order: the token order the block mask was built with (None = row-major); the output is in pixels."""
    B, H, W, heads, D = q.shape
    N = H * W

    def tokens(x):  # [B, H, W, heads, D] -> [B, heads, N, D], tokens in `order`
        x = x.reshape(B, N, heads, D)
        return (x if order is None else x[:, order]).transpose(1, 2)

    keys = torch.cat([tokens(k), cond_k.transpose(1, 2)], dim=2)
    values = torch.cat([tokens(v), cond_v.transpose(1, 2)], dim=2)
    out = flex(tokens(q), keys, values, block_mask=block_mask, scale=D ** -0.5).transpose(1, 2)  # [B, N, heads, D]
    if order is not None:
        out = out[:, torch.argsort(order)]  # back to row-major pixels
    return out.reshape(B, H, W, heads, D)


def _flex_provider(inp: dict, options: Options) -> Provider:
    """torch's flex_attention with a block mask of the same window + conditioner rule, compiled."""
    name = "flex_attention"
    if not options.compile_peers:
        return Provider(name, skip="torch.compile peers are off (compiling takes ~10-30 s on CPU): "
                                   "`fastcomp bench` without --quick includes them (pytest: "
                                   "FASTCOMP_BENCH_COMPILE=1)")
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError as e:
        return Provider(name, skip=f"torch {torch.__version__} has no flex_attention ({_first_line(e)})")
    s: AttnSize = inp["size"]
    q, k, v, cond_k, cond_v = (inp[n] for n in ("q", "k", "v", "cond_k", "cond_v"))
    if inp["mode"] == "fwd+bwd" and q.device.type == "cpu":
        # Checked here so the run does not pay a compile to learn it.
        return Provider(name, skip=f"flex_attention has no backward on CPU (torch {torch.__version__})")

    def build():
        # Built once, outside the timing, as a model with fixed conditioner masks would.
        block_mask = flex_block_mask(inp["cond_mask"], s.H, s.W, s.kernel, device=q.device)
        flex = _compiled_flex()

        def forward():
            return flex_local_conditional_attention(flex, q, k, v, cond_k, cond_v, block_mask)

        if inp["mode"] == "fwd+bwd":
            return with_backward(forward, [q, k, v, cond_k, cond_v])
        return forward

    return Provider(name, build=build)


NATTEN_INSTALL = "pip install --no-build-isolation natten==0.21.7"


def _natten_provider(inp: dict, options: Options) -> Provider:
    """NATTEN's na2d (0.21: its Flex backend on CPU, unfused, as NATTEN runs it by default there)."""
    name = "natten"
    s: AttnSize = inp["size"]
    q, k, v = inp["q"], inp["k"], inp["v"]
    if s.M > 0:
        return Provider(name, skip="NATTEN's additional tokens are seen by every query: it has no per-pixel "
                                   "conditioner mask (the M0 case compares it)")
    try:
        import natten
    except ImportError as e:
        return Provider(name, skip=f"NATTEN is not installed ({_first_line(e)}): `{NATTEN_INSTALL}` after torch")
    if inp["mode"] == "fwd+bwd" and q.device.type == "cpu":
        return Provider(name, skip=f"NATTEN {natten.__version__} on CPU runs flex_attention, which has no "
                                   f"backward on CPU (torch {torch.__version__})")

    def build():
        import warnings

        def forward():
            with warnings.catch_warnings():  # unfused flex_attention warns on every call
                warnings.simplefilter("ignore")
                return natten.na2d(q, k, v, s.kernel)

        return with_backward(forward, [q, k, v]) if inp["mode"] == "fwd+bwd" else forward

    return Provider(name, build=build)


def _attention_providers(inp: dict, options: Options) -> list[Provider]:
    s: AttnSize = inp["size"]
    q, k, v, cond_k, cond_v, cond_mask = (inp[n] for n in ("q", "k", "v", "cond_k", "cond_v", "cond_mask"))
    if s.M == 0:  # no conditioners: plain neighborhood attention, as NATTEN is called
        cond_k = cond_v = cond_mask = None

    def call(backend):
        def forward():
            return fastcomp.local_conditional_attention(q, k, v, s.kernel, cond_k=cond_k, cond_v=cond_v,
                                                        cond_mask=cond_mask, backend=backend)

        wrt = [t for t in (q, k, v, cond_k, cond_v) if t is not None]
        return with_backward(forward, wrt) if inp["mode"] == "fwd+bwd" else forward

    provs = backend_providers("local_conditional_attention", (q, k, v, cond_k, cond_v, cond_mask), call)
    return provs + [_flex_provider(inp, options), _natten_provider(inp, options)]


def attention_cases(size: AttnSize) -> list[Case]:
    op = "local_conditional_attention"
    return [Case(op, size.label, mode,
                 make_inputs=functools.partial(_attention_inputs, size, mode),
                 make_providers=_attention_providers,
                 provider_names=lambda: registered_names(op) + ["flex_attention", "natten"], size=size)
            for mode in MODES]


# --- DDN selection / gather -------------------------------------------------------------------------

@dataclass(frozen=True)
class DDNSize:
    B: int
    Cin: int
    Cout: int
    K: int
    H: int
    W: int

    @property
    def label(self) -> str:
        return f"B{self.B} Cin{self.Cin} Cout{self.Cout} K{self.K} {self.H}x{self.W}"


def _ddn_inputs(size: DDNSize, op: str, device, dtype) -> dict:
    s = size
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    features = rand(s.B, s.Cin, s.H, s.W)
    weight = rand(s.K, s.Cout, s.Cin, scale=s.Cin ** -0.5)
    bias = rand(s.K, s.Cout, scale=0.1)
    residual = rand(s.B, s.Cout, s.H, s.W)
    target = rand(s.B, s.Cout, s.H, s.W, grad=False)
    index = torch.randint(0, s.K, (s.B,), generator=g).to(device)
    return dict(features=features, weight=weight, bias=bias, residual=residual, target=target, index=index,
                op=op)


def _sddn_provider(inp: dict) -> Provider:
    """The official DDN code's selection: sddn 0.0.2's DiscreteDistributionOutput in training mode (all K
    candidates materialized, the distance matrix to the host for its Split-and-Prune statistics), with
    the case's weight and bias as its 1x1 conv's (so its backward reaches them too)."""
    name = "sddn"
    try:
        from sddn import DiscreteDistributionOutput
    except ImportError as e:
        return Provider(name, skip=f"sddn is not installed ({_first_line(e)}): `pip install sddn==0.0.2 boxx`")
    f, w, b, r, t = (inp[n] for n in ("features", "weight", "bias", "residual", "target"))
    K, Cout, Cin = w.shape

    def build():
        module = DiscreteDistributionOutput(k=K, last_c=Cin, predict_c=Cout, leak_choice=False).to(f.device).train()
        DiscreteDistributionOutput.inits.remove(module)  # its class-level registry would keep every one alive
        return with_backward(lambda: sddn_select(module, f, w, t, b, r), [f, w, b, r])

    return Provider(name, build=build)


def sddn_select(module, features, weight, target, bias, residual) -> torch.Tensor:
    """ddn_select's output computed by an sddn DiscreteDistributionOutput (training mode) whose 1x1 conv
    takes weight [K, Cout, Cin] and bias [K, Cout]: the candidate nearest the target."""
    from torch.func import functional_call

    K, Cout, Cin = weight.shape
    params = {"multi_out_conv1x1.weight": weight.reshape(K * Cout, Cin, 1, 1),
              "multi_out_conv1x1.bias": bias.reshape(K * Cout)}
    d = functional_call(module, params, ({"feat_last": features, "predict": residual, "target": target},))
    return d["predict"]


def _ddn_providers(inp: dict, options: Options) -> list[Provider]:
    f, w, b, r, t, idx, op = (inp[n] for n in ("features", "weight", "bias", "residual", "target", "index", "op"))
    wrt = [f, w, b, r]
    if op == "ddn_select":
        check_args = (f, w, t, b, r)

        def call(backend):
            return with_backward(lambda: fastcomp.ddn_select(f, w, t, bias=b, residual=r, backend=backend).output,
                                 wrt)

        return backend_providers(op, check_args, call) + [_sddn_provider(inp)]
    check_args = (f, w, idx, b, r)

    def call(backend):
        return with_backward(lambda: fastcomp.ddn_gather(f, w, idx, bias=b, residual=r, backend=backend), wrt)

    return backend_providers(op, check_args, call)


def ddn_cases(op: str, size: DDNSize) -> list[Case]:
    peers = ["sddn"] if op == "ddn_select" else []
    return [Case(op, size.label, "fwd+bwd",
                 make_inputs=lambda device, dtype: _ddn_inputs(size, op, device, dtype),
                 make_providers=_ddn_providers,
                 provider_names=lambda: registered_names(op) + peers)]


# --- pixel locality probe ----------------------------------------------------------------------------

def locality_net(channels: int = 3, layers: int = 4) -> torch.nn.Module:
    """``layers`` 3x3 convs with tanh between them: receptive field 2 * layers + 1 (9x9 for 4)."""
    mods: list[torch.nn.Module] = []
    for i in range(layers):
        mods.append(torch.nn.Conv2d(channels, channels, 3, padding=1))
        if i < layers - 1:
            mods.append(torch.nn.Tanh())
    return torch.nn.Sequential(*mods).eval()


@dataclass(frozen=True)
class ProbeSize:
    B: int
    H: int
    W: int
    radius: int = 4

    @property
    def label(self) -> str:
        return f"B{self.B} C3 {self.H}x{self.W} conv3x3x4 R{self.radius}"


def _probe_inputs(size: ProbeSize, device, dtype) -> dict:
    torch.manual_seed(0)
    net = locality_net().to(device=device, dtype=dtype)
    x = torch.randn(size.B, 3, size.H, size.W, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return dict(net=net, x=x, size=size)


def _probe_methods() -> list[str]:
    """Public methods other than the dispatcher ("auto"): "exact" (batched; the reference provider is the
    one-backward-per-element baseline) and "colored"."""
    from fastcomp import probe

    return [m for m in getattr(probe, "METHODS", ("auto", "exact", "colored")) if m != "auto"]


def _probe_providers(inp: dict, options: Options) -> list[Provider]:
    from fastcomp.probe import pixel_locality
    from fastcomp.reference import pixel_locality_reference

    net, x, s = inp["net"], inp["x"], inp["size"]
    out = [Provider("reference", build=lambda: lambda: pixel_locality_reference(net, x, s.radius))]
    for method in _probe_methods():
        out.append(Provider(method, build=functools.partial(
            lambda m: lambda: pixel_locality(net, x, radius=s.radius, method=m), method)))
    return out


def probe_cases(size: ProbeSize) -> list[Case]:
    return [Case("pixel_locality", size.label, "fwd",
                 make_inputs=lambda device, dtype: _probe_inputs(size, device, dtype),
                 make_providers=_probe_providers,
                 provider_names=lambda: ["reference"] + _probe_methods(),
                 fixed_dtype=torch.float32,
                 note="exact Jacobian probe: one backward pass per output element in the reference")]


# --- disk masks -------------------------------------------------------------------------------------

def _disk_inputs(B, M, H, W, device, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    points = (torch.rand(B, M, 2, generator=g) * torch.tensor([H, W])).to(device=device, dtype=dtype)
    return dict(points=points, radius=min(H, W) / 8, H=H, W=W)


def _disk_providers(inp: dict, options: Options) -> list[Provider]:
    p, radius, H, W = inp["points"], inp["radius"], inp["H"], inp["W"]
    return backend_providers("disk_mask", (p,), lambda backend: (
        lambda: fastcomp.disk_mask(p, radius, H, W, backend=backend)))


def disk_cases(B=8, M=16, H=128, W=128) -> list[Case]:
    return [Case("disk_mask", f"B{B} M{M} {H}x{W}", "fwd",
                 make_inputs=lambda device, dtype: _disk_inputs(B, M, H, W, device, dtype),
                 make_providers=_disk_providers,
                 provider_names=lambda: registered_names("disk_mask"),
                 fixed_dtype=torch.float32)]


# --- one training step of the local ConditionalDenoiser ----------------------------------------------

TRAIN_STEP_SIZES = {"quick": dict(batch=4, channels=32, depth=2), "cpu": dict(batch=16, channels=64, depth=4),
                    "gpu": dict(batch=64, channels=64, depth=4)}


def _train_step_providers(inp: dict, options: Options) -> list[Provider]:
    from .train_step_bench import build_step

    probe = torch.empty(0, device=inp["device"], dtype=inp["dtype"])
    precision = "fp32" if inp["dtype"] in (torch.float32, torch.float64) else "bf16"
    size = inp["size"]
    return backend_providers("local_conditional_attention", (probe, probe, probe), lambda backend: build_step(
        backend, batch=size["batch"], device=inp["device"], precision=precision,
        model_kwargs=dict(channels=size["channels"], depth=size["depth"])))


def train_step_cases(tier: str) -> list[Case]:
    size = TRAIN_STEP_SIZES[tier]
    return [Case("train_step", f"B{size['batch']} 32x32 C{size['channels']} depth{size['depth']}", "fwd+bwd",
                 make_inputs=lambda device, dtype: dict(device=device, dtype=dtype, size=size),
                 make_providers=_train_step_providers,
                 provider_names=lambda: registered_names("local_conditional_attention"),
                 fixed_dtype=torch.float32 if tier != "gpu" else None,
                 note="EDM loss forward + backward + AdamW of the local model; bf16 = autocast",
                 size=size)]


# --- the tiers ----------------------------------------------------------------------------------------

def cases_for(tier: str) -> list[Case]:
    """Every case of a tier, ops in OPS order."""
    if tier == "quick":
        attn = [AttnSize(2, 24, 24, 4, 32, 7, 8)]
        ddn = [DDNSize(8, 32, 3, 128, 16, 16)]
        probe = ProbeSize(4, 16, 16)
    elif tier == "cpu":
        # M0: plain neighborhood attention, where NATTEN's na2d is a peer (issue 12's goal there: the cpu
        # backend >= 200x NATTEN's CPU path)
        attn = [AttnSize(2, 64, 64, 4, 32, 7, 8), AttnSize(2, 48, 48, 4, 32, 7, 0)]
        ddn = [DDNSize(32, 64, 3, 512, 16, 16), DDNSize(32, 64, 3, 64, 32, 32)]
        # The exact probe makes 3 * H * W backward passes of thousands of small ops: ~1.5 s a call at
        # 24x24 on 2 cores (32x32: ~3.5 s, and ~20 s of the default run with its memory profile).
        probe = ProbeSize(4, 24, 24)
    elif tier == "gpu":
        attn = [AttnSize(4, 128, 128, 8, 64, 13, 16)]
        ddn = [DDNSize(64, 128, 3, 512, 64, 64)]
        probe = ProbeSize(4, 32, 32)
    else:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    out: list[Case] = []
    for size in attn:
        out += attention_cases(size)
    for op in ("ddn_select", "ddn_gather"):
        for size in ddn:
            out += ddn_cases(op, size)
    out += probe_cases(probe)
    out += disk_cases()
    out += train_step_cases(tier)
    return out


def select_cases(tier: str, ops: Optional[list[str]] = None) -> list[Case]:
    wanted = set(ops or OPS)
    return [c for c in cases_for(tier) if c.op in wanted]
