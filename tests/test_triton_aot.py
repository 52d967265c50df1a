"""Every Triton kernel compiles ahead of time for sm_80 (A100) and sm_90 (H100/H200) with the installed
Triton (its ptxas), at the configurations the ops launch, and is fit for the GPU: half-precision kernels do
not spill registers on sm_90, and the attention kernels run their dots on Hopper's warpgroup MMA (wgmma).
No GPU needed (kernels/_aot.py).

The compile runs in a subprocess: this session imported the kernels under TRITON_INTERPRET=1 (conftest),
and interpreted kernels cannot be compiled. Compiled kernels are kept in Triton's cache, keyed by their
source (helpers included), options, target and Triton version, so a rerun recompiles only the kernels that
changed: about 10 s when none did, several minutes on 2 cores for all ~140 compiles from scratch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastcomp.kernels._aot", "--json", str(path), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=3600)
    print(proc.stdout)  # the per-kernel table: registers, spills, shared memory, wgmma / mma counts
    assert path.exists(), f"the AOT compile wrote no results (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    data = json.loads(path.read_text())
    data["stdout"], data["stderr"] = proc.stdout, proc.stderr
    return data


def _rows(aot, **where):
    return [r for r in aot["results"] if all(r[k] == v for k, v in where.items())]


def test_every_kernel_compiles_for_sm80_and_sm90(aot):
    failed = [f"sm_{r['arch']} {r['op']} {r['kernel']}: {r['error']}" for r in aot["results"] if r["error"]]
    assert not failed, "\n".join(failed)
    assert not aot["missing_kernels"], f"kernels no launcher launched: {aot['missing_kernels']}"
    for arch in (80, 90):
        assert {r["kernel"].split("[")[0] for r in _rows(aot, arch=arch)} == set(aot["kernels"])


def test_attention_compiles_at_every_dtype_and_head_dim(aot):
    for dtype in ("fp32", "fp16", "bf16"):
        for D in (32, 64, 128):
            kernels = {r["kernel"] for r in _rows(aot, arch=90, op=f"attention {dtype} D{D}")}
            assert {"_lca_fwd_kernel[HAS_COND]", "_lca_fwd_kernel", "_lca_bwd_delta_kernel",
                    "_lca_bwd_dq_kernel[WRITE_DQ,HAS_COND]", "_lca_bwd_dq_kernel[WRITE_DCOND,HAS_COND]",
                    "_lca_bwd_dq_kernel[WRITE_DQ]", "_lca_bwd_dkdv_kernel"} <= kernels, (dtype, D, kernels)


def test_half_precision_kernels_do_not_spill_on_sm90(aot):
    rows = [r for r in _rows(aot, arch=90) if r["dtype"] in ("fp16", "bf16")]
    assert len(rows) >= 2 * 3 * 7 + 4
    spilled = [f"{r['op']} {r['kernel']}: {r['regs']} registers, {r['spill_bytes']} bytes spilled "
               f"(warps {r['num_warps']}, stages {r['num_stages']}, {r['constexprs']})"
               for r in rows if r["spill_bytes"] != 0]
    assert not spilled, "\n".join(spilled)


def test_attention_kernels_use_wgmma_on_sm90(aot):
    rows = [r for r in _rows(aot, arch=90) if r["op"].startswith("attention") and r["dtype"] in ("fp16", "bf16")
            and "delta" not in r["kernel"]]  # the delta kernel is a row sum, no dot
    assert rows
    missing = [f"{r['op']} {r['kernel']} (mma.sync: {r['mma']})" for r in rows if r["wgmma"] == 0]
    assert not missing, "no wgmma on sm_90:\n" + "\n".join(missing)


def test_kernels_pass_fp_fusion_explicitly(aot):
    for r in aot["results"]:
        assert r["enable_fp_fusion"] is (r["kernel"] != "_disk_mask_kernel"), (r["op"], r["kernel"])
