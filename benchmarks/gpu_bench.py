"""The benchmark sections of benchmarks/gpu_check.sh: correctness and speed of fastcomp on a CUDA GPU.

    python3 benchmarks/gpu_bench.py --out DIR --section env|lca|flex|ddn|profile   # one per process
    python3 benchmarks/gpu_bench.py --out DIR --summary                       # the short table, last
    TRITON_INTERPRET=1 python3 benchmarks/gpu_bench.py --smoke --out DIR --section env,lca,flex,ddn,profile

gpu_check.sh runs each section in its own process under its own `timeout`, so a hang costs that section
only. Each section merges its results into DIR/bench.json as soon as it has them (a section killed halfway
keeps what it finished); the compiled Triton kernels a section ran are described in DIR/triton_meta.json
(registers, spills, shared memory, warps, stages, HGMMA / LDL / STL counts in the SASS).

Sections:
  env      device, versions, measured ceilings: bf16 8192^3 matmul TFLOP/s, device-to-device copy GB/s.
  lca      local conditional attention, bf16, B4 128x128 h8 d64 k13 M16 (conditioner disks ~20 % of the
           image each): out and all 5 gradients vs the fp32 reference (relative RMS; the low-precision rule:
           ours <= 2x plain PyTorch bf16's error); median times (triton.testing.do_bench) fwd and fwd+bwd
           of ours (the public op), dense masked SDPA (the reference), unmasked SDPA over all H*W keys (the
           FlashAttention-class ceiling); useful TFLOP/s = 4 D x allowed query-key pairs forward, 3.5x that
           forward+backward.
  flex     the same case through compiled flex_attention with the equivalent block mask, in row-major and
           in 8x16-tile-major token order (NATTEN's flattening): agreement with ours, compile and mask-build
           seconds, fwd and fwd+bwd times (in lca's table in the summary).
  ddn      ddn_select bf16 B64 K512 Cout3 64x64, Cin 64 and 128: index agreement, distance and output error
           of triton and cuda vs the reference (index mismatches with the reference's own distance gap, so
           near-ties show as such); fwd, fwd+bwd and the distances kernel alone; peak memory.
  profile  torch.profiler table of one ours fwd+bwd and one triton ddn_select fwd+bwd (DIR/profile.txt).
--smoke: tiny sizes on CPU tensors through the Triton interpreter, every code path, no timing worth reading.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

BENCH_JSON = "bench.json"
META_JSON = "triton_meta.json"
PROFILE_TXT = "profile.txt"


# --- plumbing ---------------------------------------------------------------------------------------

def _device(smoke: bool) -> torch.device:
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device (use --smoke for the CPU code-path check)")
    return torch.device("cuda")


def _merge(out_dir: str, name: str, value) -> None:
    """Merge {name: value} into bench.json (rewritten whole, atomically: a killed run leaves the last)."""
    path = os.path.join(out_dir, BENCH_JSON)
    data = {}
    if os.path.exists(path):
        with open(path) as fh:
            data = json.load(fh)
    data[name] = value
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:1500]


def bench_ms(fn, smoke: bool) -> float:
    """Median ms: triton.testing.do_bench on CUDA (CUDA events, L2 flushed between calls); one timed call in
    smoke mode (code paths only)."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def peak_mb(fn, dev) -> float | None:
    """Memory one call allocates on top of what is held (CUDA), None on CPU."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-300))


def _timed(name, fn, smoke, dev, times, flops=None):
    """Time fn into times[name] = {ms, tflops?, peak_mb} or {error}; never raises."""
    try:
        ms = bench_ms(fn, smoke)
        row = {"ms": round(ms, 4), "peak_mb": peak_mb(fn, dev)}
        if flops:
            row["tflops"] = round(flops / ms / 1e9, 1)
        times[name] = row
    except Exception as e:  # noqa: BLE001 - one failing provider must not sink the section
        times[name] = {"error": _error(e)}
        traceback.print_exc()


# --- env ------------------------------------------------------------------------------------------------

def env_section(dev, smoke):
    import triton

    import fastcomp

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "fastcomp": getattr(fastcomp, "__version__", "?"), "smoke": smoke}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    mem_gb=round(p.total_memory / 2**30, 1))
        n = 8192
        a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))  # random, never zeros
        info["bf16_matmul_tflops"] = round(2 * n**3 / bench_ms(lambda: a @ b, smoke) / 1e9, 1)
        x = torch.randn(2**28, device=dev)  # 1 GiB
        y = torch.empty_like(x)
        info["copy_gbs_read_plus_write"] = round(2 * x.numel() * 4 / bench_ms(lambda: y.copy_(x), smoke) / 1e6, 1)
    return info


# --- local conditional attention ------------------------------------------------------------------------

def lca_sizes(smoke):
    # B, S (H = W), heads, D, kernel, M, flex tile
    return (1, 8, 1, 16, 3, 2, (4, 4)) if smoke else (4, 128, 8, 64, 13, 16, (8, 16))


class LcaCase:
    """The attention case both the lca and the flex sections run: the same seeded inputs in each process."""

    def __init__(self, dev, smoke):
        import fastcomp

        B, S, nh, D, ks, M, tile = self.sizes = lca_sizes(smoke)
        self.B, self.S, self.heads, self.D, self.ks, self.M, self.tile = B, S, nh, D, ks, M, tile
        dt = torch.bfloat16
        g = torch.Generator().manual_seed(0)
        self.q, self.k, self.v = (torch.randn(B, S, S, nh, D, generator=g).to(dev, dt) for _ in range(3))
        self.ck, self.cv = (torch.randn(B, M, nh, D, generator=g).to(dev, dt) for _ in range(2))
        radius = math.sqrt(0.2 * S * S / math.pi)  # each disk covers ~20 % of the image, as cases.py
        lo = torch.tensor([min(radius, S / 2)] * 2)
        points = lo + torch.rand(B, M, 2, generator=g) * (S - 2 * lo)
        self.cond_mask = fastcomp.disk_mask(points.to(dev), radius, S, S, backend="reference")
        self.do = torch.randn(B, S, S, nh, D, generator=g).to(dev, dt)
        self.scale = D ** -0.5
        self.N = S * S
        pairs = B * nh * self.N * ks * ks + nh * int(self.cond_mask.sum())  # allowed query-key pairs
        self.fwd_flops = 4.0 * D * pairs
        self.inputs = (self.q, self.k, self.v, self.ck, self.cv)
        self.leaves = [t.detach().requires_grad_() for t in self.inputs]

    def describe(self) -> dict:
        return {"size": f"B{self.B} {self.S}x{self.S} h{self.heads} d{self.D} k{self.ks} M{self.M} bf16",
                "conditioner_coverage": round(float(self.cond_mask.float().mean()), 3),
                "useful_gflop_fwd": round(self.fwd_flops / 1e9, 2)}

    def ours(self, *tensors):
        import fastcomp

        q, k, v, ck, cv = tensors or self.inputs
        return fastcomp.local_conditional_attention(q, k, v, self.ks, cond_k=ck, cond_v=cv,
                                                    cond_mask=self.cond_mask, backend="triton")


def lca_section(dev, smoke, out_dir):
    """Ours vs the references: correctness of out and all gradients, then fwd and fwd+bwd times."""
    from fastcomp.bench import cases
    from fastcomp.reference import local_conditional_attention_reference as reference

    c = LcaCase(dev, smoke)
    ks, scale, do, leaves = c.ks, c.scale, c.do, c.leaves
    res = c.describe()
    _merge(out_dir, "lca", res)

    # Correctness: out and the 5 gradients vs the fp32 reference (dense masked SDPA) on the same inputs.
    # The low-precision rule's baseline, plain PyTorch in bf16 (cases.plain_attention: dense scores), runs
    # on batch item 0 only (its [heads, N, N + M] scores are 4.3 GB per item at 128x128); items are
    # independent, so item 0's error estimates the whole batch's.
    names = ("out", "dq", "dk", "dv", "dcond_k", "dcond_v")
    ours = c.ours(*leaves)
    ours_all = (ours, *torch.autograd.grad(ours, leaves, do))
    ref32_leaves = [t.detach().float().requires_grad_() for t in c.inputs]
    ref32 = reference(*ref32_leaves[:3], (ks, ks), ref32_leaves[3], ref32_leaves[4], c.cond_mask, scale)
    ref32_all = (ref32, *torch.autograd.grad(ref32, ref32_leaves, do.float()))
    del ref32_leaves, ref32
    plain_leaves = [t[:1].detach().requires_grad_() for t in c.inputs]
    plain = cases.plain_attention(*plain_leaves, c.cond_mask[:1], (ks, ks), scale)
    plain_all = (plain, *torch.autograd.grad(plain, plain_leaves, do[:1]))
    del plain_leaves, plain
    # The triton interpreter truncates float32 -> bfloat16 (compiled kernels round): up to ~2x the error
    # alone, so smoke mode allows 3x, as tests/test_attention_triton.py does.
    factor = res["low_precision_factor"] = 3.0 if smoke else 2.0
    errors = {}
    for name, a, r32, p16 in zip(names, ours_all, ref32_all, plain_all):
        e_ours, e_plain = rel_rms(a, r32), rel_rms(p16, r32[:1])
        errors[name] = {"ours": e_ours, "plain_bf16": e_plain, "ok": bool(e_ours <= factor * e_plain + 1e-6)}
    res["rel_rms_vs_fp32_reference"] = errors
    del ours_all, ref32_all, plain_all
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    _merge(out_dir, "lca", res)

    times = res["times"] = {}

    def ours_fwd():
        with torch.no_grad():
            return c.ours()

    def ours_fb():
        return torch.autograd.grad(c.ours(*leaves), leaves, do)

    def ref_fwd():
        with torch.no_grad():
            return reference(c.q, c.k, c.v, (ks, ks), c.ck, c.cv, c.cond_mask, scale)

    def ref_fb():
        return torch.autograd.grad(reference(*leaves[:3], (ks, ks), leaves[3], leaves[4], c.cond_mask, scale),
                                   leaves, do)

    B, N, nh, D = c.B, c.N, c.heads, c.D
    qt, kt, vt = (t.reshape(B, N, nh, D).transpose(1, 2).detach().requires_grad_() for t in (c.q, c.k, c.v))
    dot = do.reshape(B, N, nh, D).transpose(1, 2)

    def dense_fwd():  # no mask: FlashAttention-class kernel over all N keys, the throughput ceiling
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale)

    def dense_fb():
        return torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale),
                                   (qt, kt, vt), dot)

    dense_flops = 4.0 * D * B * nh * N * N
    for name, fwd, fb, flops in (("ours", ours_fwd, ours_fb, c.fwd_flops),
                                 ("reference_masked_sdpa", ref_fwd, ref_fb, c.fwd_flops),
                                 ("sdpa_unmasked_all_keys", dense_fwd, dense_fb, dense_flops)):
        _timed(f"{name} fwd", fwd, smoke, dev, times, flops)
        _timed(f"{name} fwd+bwd", fb, smoke, dev, times, 3.5 * flops)
        _merge(out_dir, "lca", res)
    kernel_meta(out_dir, "lca")
    return res


def flex_section(dev, smoke, out_dir):
    """Compiled flex_attention with the equivalent block mask, in row-major and in tile-major token order
    (its own section: the inductor compiles take most of its time). Times merge into lca's table."""
    from fastcomp.bench import cases
    from torch.nn.attention.flex_attention import flex_attention

    c = LcaCase(dev, smoke)
    res = {}
    with torch.no_grad():
        ours = c.ours()
    # eager on CPU in smoke mode (and no CPU backward); the block mask built once, outside the timing
    # (compiled on CUDA, see cases.flex_block_mask)
    flex = flex_attention if smoke else torch.compile(flex_attention, dynamic=False)
    times = {}
    for name, order in (("flex_rowmajor", None), (f"flex_tiled{c.tile[0]}x{c.tile[1]}",
                                                   cases.tile_major_order(c.S, c.S, c.tile, dev))):
        try:
            t0 = time.time()
            block_mask = cases.flex_block_mask(c.cond_mask, c.S, c.S, c.ks, dev, order=order)
            res[f"{name}_mask_build_s"] = round(time.time() - t0, 1)
            res[f"{name}_block_sparsity"] = round(float(block_mask.sparsity()), 1) if hasattr(
                block_mask, "sparsity") else None
            t0 = time.time()
            with torch.no_grad():
                out = cases.flex_local_conditional_attention(flex, *c.inputs, block_mask, order)
            res[f"{name}_first_call_s"] = round(time.time() - t0, 1)  # the compile
            res[f"{name}_rel_rms_vs_ours"] = rel_rms(out, ours)  # the same function, or the race is off

            def f_fwd(bm=block_mask, order=order):
                with torch.no_grad():
                    return cases.flex_local_conditional_attention(flex, *c.inputs, bm, order)

            def f_fb(bm=block_mask, order=order):
                o = cases.flex_local_conditional_attention(flex, *c.leaves, bm, order)
                return torch.autograd.grad(o, c.leaves, c.do)

            _timed(f"{name} fwd", f_fwd, smoke, dev, times, c.fwd_flops)
            if dev.type == "cuda":
                _timed(f"{name} fwd+bwd", f_fb, smoke, dev, times, 3.5 * c.fwd_flops)
        except Exception as e:  # noqa: BLE001
            res[f"{name}_error"] = _error(e)
            traceback.print_exc()
        _merge(out_dir, "flex", dict(res, times=times))
    return dict(res, times=times)


# --- DDN --------------------------------------------------------------------------------------------

def ddn_section(dev, smoke, out_dir):
    import fastcomp
    from fastcomp import backends as _b
    from fastcomp.kernels.ddn import ddn_distances_triton
    from fastcomp.reference import ddn_select_reference

    res = {}
    for nominal_cin in (64, 128):
        key = f"Cin{nominal_cin}"  # the case; smoke mode runs it at an eighth of the channels
        B, K, Cout, H, W = (2, 20, 3, 5, 5) if smoke else (64, 512, 3, 64, 64)
        Cin = nominal_cin // 8 if smoke else nominal_cin
        dt = torch.float32 if smoke else torch.bfloat16  # the interpreter (numpy) has no bfloat16
        g = torch.Generator().manual_seed(1)
        f = torch.randn(B, Cin, H, W, generator=g).to(dev, dt).requires_grad_()
        w = (torch.randn(K, Cout, Cin, generator=g) * Cin ** -0.5).to(dev, dt).requires_grad_()
        b = (torch.randn(K, Cout, generator=g) * 0.1).to(dev, dt).requires_grad_()
        r = torch.randn(B, Cout, H, W, generator=g).to(dev, dt).requires_grad_()
        t = torch.randn(B, Cout, H, W, generator=g).to(dev, dt)
        d_out = torch.randn(B, Cout, H, W, generator=g).to(dev, dt)
        row = res[key] = {"size": f"B{B} Cin{Cin} Cout{Cout} K{K} {H}x{W} {str(dt)[6:]}",
                          "direct_gflop": round(2 * B * K * Cout * Cin * H * W / 1e9, 2)}
        with torch.no_grad():
            ref_out, ref_idx, ref_d = ddn_select_reference(f, w, t, b, r, "l2")
        table = {x.name: x for x in _b.backends("ddn_select")}
        runnable = []
        for name in ("triton", "cuda"):
            why = table[name].why_not(f, w, t, b, r) if name in table else "not registered"
            if why:
                row[name] = {"skip": why}
                continue
            try:
                sel = fastcomp.ddn_select(f, w, t, bias=b, residual=r, backend=name)
                bad = (sel.index != ref_idx).nonzero().flatten()
                # how far the mismatched picks are from the reference's best, by the reference's distances
                gap = (ref_d[bad, sel.index[bad]] - ref_d[bad, ref_idx[bad]]) / ref_d[bad, ref_idx[bad]]
                row[name] = {"index_mismatches": int(bad.numel()), "of": B,
                             "mismatch_max_rel_gap": float(gap.max()) if bad.numel() else 0.0,
                             "dist_rel_rms": rel_rms(sel.distances, ref_d), "out_rel_rms": rel_rms(sel.output,
                                                                                                   ref_out)}
                runnable.append(name)
            except Exception as e:  # noqa: BLE001
                row[name] = {"error": _error(e)}
                traceback.print_exc()
        row["auto_backend"] = _b.select("ddn_select", None, f, w, t, b, r).name
        _merge(out_dir, "ddn", res)
        wrt = [f, w, b, r]

        def select(name):
            if name == "reference":
                return ddn_select_reference(f, w, t, b, r, "l2")[0]
            return fastcomp.ddn_select(f, w, t, bias=b, residual=r, backend=name).output

        times = row["times"] = {}
        if "triton" in runnable:
            _timed("triton distances kernel", lambda: ddn_distances_triton(f, w, t, b, r, "l2"), smoke, dev, times)
        for name in ["reference"] + runnable:
            def fwd(name=name):
                with torch.no_grad():
                    return select(name)

            _timed(f"{name} fwd", fwd, smoke, dev, times)
            _timed(f"{name} fwd+bwd", lambda name=name: torch.autograd.grad(select(name), wrt, d_out), smoke, dev,
                   times)
            _merge(out_dir, "ddn", res)
        del f, w, b, r, t, d_out, ref_out
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    kernel_meta(out_dir, "ddn")
    return res


# --- profile -------------------------------------------------------------------------------------------

def profile_section(dev, smoke, out_dir):
    import fastcomp
    from torch.profiler import ProfilerActivity, profile

    B, S, nh, D, ks, M, _ = lca_sizes(smoke)
    g = torch.Generator().manual_seed(2)
    dt = torch.bfloat16
    leaves = [torch.randn(B, S, S, nh, D, generator=g).to(dev, dt).requires_grad_() for _ in range(3)]
    leaves += [torch.randn(B, M, nh, D, generator=g).to(dev, dt).requires_grad_() for _ in range(2)]
    cond_mask = fastcomp.disk_mask(torch.rand(B, M, 2, generator=g).to(dev) * S, S / 4, S, S, backend="reference")
    Bd, Cin, K, HW = (2, 8, 20, 5) if smoke else (64, 128, 512, 64)
    ddt = torch.float32 if smoke else dt
    f = torch.randn(Bd, Cin, HW, HW, generator=g).to(dev, ddt).requires_grad_()
    w = (torch.randn(K, 3, Cin, generator=g) * Cin ** -0.5).to(dev, ddt).requires_grad_()
    t = torch.randn(Bd, 3, HW, HW, generator=g).to(dev, ddt)

    def step():
        o = fastcomp.local_conditional_attention(*leaves[:3], ks, cond_k=leaves[3], cond_v=leaves[4],
                                                 cond_mask=cond_mask, backend="triton")
        torch.autograd.grad(o, leaves, torch.ones_like(o))
        s = fastcomp.ddn_select(f, w, t, backend="triton")
        torch.autograd.grad(s.output, (f, w), torch.ones_like(s.output))

    step()  # compile outside the profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    for sort_by in (("cuda_time_total", "device_time_total") if dev.type == "cuda" else ("cpu_time_total",)):
        try:
            text = averages.table(sort_by=sort_by, row_limit=25)
            break
        except Exception:  # noqa: BLE001 - torch versions name the device column differently
            text = averages.table(row_limit=25)
    path = os.path.join(out_dir, PROFILE_TXT)
    with open(path, "w") as fh:
        fh.write(f"one attention fwd+bwd (B{B} {S}x{S} h{nh} d{D} k{ks} M{M} bf16) and one triton ddn_select "
                 f"fwd+bwd (B{Bd} Cin{Cin} K{K} {HW}x{HW})\n{text}\n")
    return {"written": PROFILE_TXT}


# --- compiled-kernel metadata ------------------------------------------------------------------------

def kernel_meta(out_dir: str, section: str) -> None:
    """Append what this process compiled (registers, spills, shared memory, warps, stages; HGMMA, LDL, STL
    in the SASS) to triton_meta.json. Compiled kernels only: nothing under the interpreter."""
    from fastcomp.kernels import _aot

    rows = []
    for name, fn in _aot.all_kernels().items():
        for cache in getattr(fn, "device_caches", {}).values():
            kernel_cache = cache[0] if isinstance(cache, tuple) else cache
            for compiled in list(kernel_cache.values()):
                row = {"section": section, "kernel": name}
                try:
                    if hasattr(compiled, "_init_handles"):
                        compiled._init_handles()
                    md = compiled.metadata
                    row.update(regs=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None),
                               smem=md.shared, warps=md.num_warps, stages=md.num_stages)
                    usage = _aot._resources(compiled.asm["cubin"], getattr(compiled, "hash", ""), sass=True)
                    row.update({k: usage[k] for k in ("hgmma", "hmma", "ldl", "stl", "stack")})
                except Exception as e:  # noqa: BLE001
                    row["error"] = _error(e)
                rows.append(row)
    path = os.path.join(out_dir, META_JSON)
    old = []
    if os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)
    with open(path, "w") as fh:
        json.dump(old + rows, fh, indent=1, default=str)


# --- summary -------------------------------------------------------------------------------------------

def summary(out_dir: str) -> str:
    path = os.path.join(out_dir, BENCH_JSON)
    if not os.path.exists(path):
        return "no bench.json"
    with open(path) as fh:
        data = json.load(fh)
    lines = []
    env = data.get("env", {})
    if env:
        lines.append("env: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    lca = data.get("lca")
    if lca:
        lines.append(f"LCA {lca.get('size')}: useful {lca.get('useful_gflop_fwd')} GFLOP fwd")
        for name, e in lca.get("rel_rms_vs_fp32_reference", {}).items():
            lines.append(f"  {name:8s} rel RMS vs fp32: ours {e['ours']:.2e}, plain torch bf16 {e['plain_bf16']:.2e}"
                         f" -> {'ok' if e['ok'] else 'FAIL (> %gx)' % lca.get('low_precision_factor', 2)}")
        times = dict(lca.get("times", {}), **(data.get("flex") or {}).get("times", {}))
        for mode in ("fwd", "fwd+bwd"):
            ours = times.get(f"ours {mode}", {}).get("ms")
            for key, row in times.items():
                if not key.endswith(" " + mode):
                    continue
                if "ms" in row:
                    vs = f"  ours {row['ms'] / ours:5.2f}x faster" if ours and not key.startswith("ours") else ""
                    lines.append(f"  {key:34s} {row['ms']:9.3f} ms {row.get('tflops', 0):7.1f} TFLOP/s{vs}")
                else:
                    lines.append(f"  {key:34s} {row.get('error', '?')[:90]}")
        for key, value in (data.get("flex") or {}).items():
            if key.endswith("_error"):
                lines.append(f"  {key}: {value[:150]}")
            elif key.endswith(("_rel_rms_vs_ours", "_first_call_s", "_mask_build_s")):
                lines.append(f"  {key} {value:.3g}")
    for key, row in (data.get("ddn") or {}).items():
        lines.append(f"DDN {row.get('size')} (auto: {row.get('auto_backend')}): "
                     + "; ".join(f"{n} {row.get(n)}" for n in ("triton", "cuda")))
        ref = row.get("times", {}).get("reference fwd+bwd", {}).get("ms")
        for name, t in row.get("times", {}).items():
            if "ms" in t:
                vs = f"  ({ref / t['ms']:.1f}x the reference)" if ref and name.endswith("fwd+bwd") else ""
                lines.append(f"  {name:30s} {t['ms']:9.3f} ms  peak {t.get('peak_mb')} MB{vs}")
            else:
                lines.append(f"  {name:30s} {t.get('error', '?')[:90]}")
    for name, err in (data.get("errors") or {}).items():
        lines.append(f"ERROR in {name}: {err[:300]}")
    return "\n".join(lines)


SECTIONS = {"env": env_section, "lca": lca_section, "flex": flex_section, "ddn": ddn_section,
            "profile": profile_section}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    ap.add_argument("--section", default="", help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--summary", action="store_true", help="print the short table of bench.json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (TRITON_INTERPRET=1): code paths only")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    status = 0
    for name in filter(None, args.section.split(",")):
        t0 = time.time()
        try:
            dev = _device(args.smoke)
            takes_out = name != "env"
            value = SECTIONS[name](dev, args.smoke, args.out) if takes_out else SECTIONS[name](dev, args.smoke)
            _merge(args.out, name, value)
        except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
            traceback.print_exc()
            path = os.path.join(args.out, BENCH_JSON)
            errors = {}
            if os.path.exists(path):
                with open(path) as fh:
                    errors = json.load(fh).get("errors", {})
            errors[name] = _error(e)
            _merge(args.out, "errors", errors)
            status = 1
        print(f"gpu_bench: section {name} done in {time.time() - t0:.1f} s", flush=True)
    if args.summary:
        print(summary(args.out))
    return status


if __name__ == "__main__":
    sys.exit(main())
