"""Triton kernels for fused local conditional attention: forward, backward and forward-mode derivative (jvp).

Semantics (spec: fastcomp/ops/attention/reference.py, local_conditional_attention_reference): image pixel (i, j)
attends, in ONE softmax, the kh x kw window of image keys with top-left corner
(clamp(i - kh//2, 0, H - kh), clamp(j - kw//2, 0, W - kw)) (NATTEN na2d, dilation 1) plus the conditioner
tokens m with cond_mask[b, m, i, j] true.

Entry points (the triton launchers in fastcomp/ops/attention/triton.py call exactly these):

    lca_forward(q, k, v, cond_k, cond_v, cond_mask, kernel_size, scale) -> (out, lse)
    lca_backward(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, kernel_size, scale)
        -> (dq, dk, dv, dcond_k, dcond_v)
    lca_jvp(q, k, v, cond_k, cond_v, cond_mask, out, lse, dq, dk, dv, dcond_k, dcond_v, kernel_size, scale)
        -> dout (see the jvp section at the end)

q, k, v: [B, H, W, heads, D], any strides with a unit stride along D (otherwise copied); cond_k, cond_v:
[B, M, heads, D] or None; cond_mask: [B, M, H, W] bool or None. lse is float32 [B, heads, H, W] in log2
units (m + log2(l) of the base-2 online softmax); it is opaque to the caller.

Design
------
Forward (_lca_fwd_kernel): one program per (TILE_H x TILE_W query tile, batch * head). With the clamped
window rule the union of the windows of a tile is the contiguous box
    rows [ws(r0), ws(r_last) + kh),   cols [ws(c0), ws(c_last) + kw)
of at most (TILE_H + kh - 1) x (TILE_W + kw - 1) keys, so every K/V row of the tile's halo is loaded once per
tile (not once per query as in a per-pixel kernel). The box is flattened and walked in BLOCK_N-key blocks:
S = Q K^T with tl.dot, then each query keeps only the keys inside its own window (a range test on the key's
row and column), and a base-2 online softmax (running max m, running sum l, fp32 accumulator) folds the block
in; no score matrix is ever stored. Conditioners are more key blocks of the same online softmax: the
[B, M, H, W] bool mask is packed by torch ops in the launcher into one bit per conditioner, ceil(M / 32)
int32 words per query ([B, H, W, words]), so a tile loads one word per query per 32 conditioners; a word
that is zero for every query of the tile (disks covering a small part of the image) skips the whole
conditioner block, its loads and its two dots.

Backward: delta = rowsum(dO * O) first (fp32, _lca_bwd_delta_kernel), then three launches, all recomputing P from the
stored lse (FlashAttention-2 style: recomputation is cheaper than storing any [queries, keys] tensor):
  * _lca_bwd_dq_kernel with WRITE_DQ: query-owned tiles, the forward's tiling and key box, image key blocks
    then conditioner blocks; accumulates dq in registers and writes it once, no atomics.
  * _lca_bwd_dq_kernel with WRITE_DCOND (only when there are conditioners): the same tiles, conditioner
    blocks only; d cond_k = scale * dS^T Q and d cond_v = P^T dO are summed over the tile and
    tl.atomic_add-ed in fp32 into [B, M, heads, D] buffers. A separate launch, not a branch of the dq
    launch, because the two extra [32, D] products pushed the fused kernel past 255 registers into spills
    (sm_90 compile) for the whole kernel, image-key loop included; the extra launch re-reads Q and dO once.
    Why atomics: a conditioner is shared by all H*W queries, so a conditioner-owned kernel would have only
    B * heads * ceil(M / 32) programs each walking the whole image (too little parallelism), and per-tile
    partial buffers cost n_tiles * B * heads * M * D * 4 bytes (268 MB at 128x128, B=4, 8 heads, M=256,
    D=64). Atomics are one [32, D] add per tile and conditioner block, skipped with the block when no
    query of the tile may see it. (Their order varies, so d cond_k / d cond_v are not bitwise
    deterministic; dq, dk, dv are.)
  * _lca_bwd_dkdv_kernel: key-owned tiles (TILE_H x TILE_W image keys). The queries whose windows can
    contain a key of rows [a, b] are the contiguous rows [0 if a < kh else a - kh//2,
    H - 1 if b >= H - kh else b + kh//2] (and likewise for columns), because the window start is monotone
    in the query index. The kernel walks that query box in BLOCK_M-query blocks, recomputes P^T and dS^T
    for its keys and accumulates dk, dv in registers: every dk/dv element is written exactly once, no
    atomics, deterministic. (Atomics from the dq kernel would be the alternative: with kh*kw up to 961
    overlapping windows per key they would contend heavily and make dk/dv non-deterministic.)
All accumulation is fp32; the P and dS operands of the second dot of each pair are cast to the input dtype
as FlashAttention does (fp32 inputs stay fp32 with input_precision="ieee", no TF32, unless PyTorch's float32
matmul setting allows TF32: kernels/_launch.py fp32_dot_precision).

Block sizes (_config): on a GPU 8 x 16 = 128-query tiles and 64-key blocks (32 before Hopper; 128-key tiles
and 32-query blocks for dk/dv), 8 warps, 2 pipeline stages, picked from spill-free sm_90/sm_80 compiles
(tests/test_triton_aot.py compiles every kernel for both without a GPU); smaller tiles for float32. Under
TRITON_INTERPRET=1 (CPU tests) the interpreter runs every block operation through numpy, so big blocks only
waste time on masked lanes: _config returns 4 x 4 tiles and 16-key blocks there. No autotuning: the kernels
are launched with these fixed configurations.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import GRID_YZ_LIMIT, check_int32_extent, fp32_dot_precision, launch
from .limits import ATTENTION_DTYPES, ATTENTION_HEAD_DIMS

_RCP_LN2 = 1.4426950408889634  # log2(e): softmax in base 2 (exp2 is the native instruction)
_COND_BLOCK = 32  # conditioners per conditioner block = bits per mask word


# --------------------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _dot(b_a, b_b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """[X, K] @ [K, Y] -> [X, Y] fp32. UPCAST (only under TRITON_INTERPRET=1 with bfloat16): the triton 3.9
    interpreter keeps bfloat16 as raw uint16 and multiplies the bit patterns in tl.dot, so the operands go
    through float32 there; compiled kernels always take the native path."""
    if UPCAST:
        return tl.dot(b_a.to(tl.float32), b_b.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    else:
        return tl.dot(b_a, b_b, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def _window_start(o_pix, size, K):
    """First key index of the window of each query index along one axis: clamp(i - K//2, 0, size - K)."""
    return tl.minimum(tl.maximum(o_pix - K // 2, 0), size - K)


@triton.jit
def _key_box(r0, c0, H, W, KH, KW, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """(top, left, height, width) of the union of the windows of the query tile whose top-left pixel is
    (r0, c0): one contiguous box, because the clamped window start is monotone in the query index."""
    box_r0 = _window_start(r0, H, KH)
    box_c0 = _window_start(c0, W, KW)
    box_h = _window_start(tl.minimum(r0 + TILE_H, H) - 1, H, KH) + KH - box_r0
    box_w = _window_start(tl.minimum(c0 + TILE_W, W) - 1, W, KW) + KW - box_c0
    return box_r0, box_c0, box_h, box_w


@triton.jit
def _cond_bits(b_word):
    """[BQ] int32 mask words -> [BQ, 32] bool, bit c of word = may the query see conditioner 32*w + c."""
    o_bit = tl.arange(0, 32)  # [32]
    return ((b_word[:, None] >> o_bit[None, :]) & 1) != 0


@triton.jit
def _online_softmax_step(b_s, b_v, m_i, l_i, b_acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one key block into the base-2 online softmax.

    b_s: [BQ, BN] fp32 scores in log2 units, -inf where masked; b_v: [BN, BD]; m_i, l_i: [BQ];
    b_acc: [BQ, BD] fp32. m_i starts at a finite -1e30, so a block masked out for a query gives p = 0 and
    alpha = 1 instead of exp2(-inf + inf) = NaN.
    """
    m_new = tl.maximum(m_i, tl.max(b_s, 1))  # [BQ]
    b_alpha = tl.exp2(m_i - m_new)  # [BQ]
    b_p = tl.exp2(b_s - m_new[:, None])  # [BQ, BN]
    l_i = l_i * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(b_v.dtype), b_v, PRECISION, UPCAST)
    return m_new, l_i, b_acc


# --------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _lca_fwd_kernel(
    p_q, p_k, p_v,  # [B, H, W, heads, D], strides below, unit stride along D
    p_ck, p_cv,  # [B, M, heads, D] (dummy pointers when HAS_COND is false)
    p_bits,  # [B, H, W, N_WORDS] int32 packed cond_mask
    p_out,  # [B, H, W, heads, D] contiguous
    p_lse,  # [B, heads, H, W] fp32 contiguous
    sq_b, sq_h, sq_w, sq_n,
    sk_b, sk_h, sk_w, sk_n,
    sv_b, sv_h, sv_w, sv_n,
    sck_b, sck_m, sck_n,
    scv_b, scv_m, scv_n,
    H, W, HEADS, D, M, N_WORDS, KH, KW, n_tiles_w,
    qk_scale,  # softmax scale * log2(e)
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_COND: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = TILE_H * TILE_W
    i_tile = tl.program_id(0)
    i_bn = tl.program_id(1)
    i_b = (i_bn // HEADS).to(tl.int64)
    i_n = i_bn % HEADS
    r0 = (i_tile // n_tiles_w) * TILE_H
    c0 = (i_tile % n_tiles_w) * TILE_W

    o_t = tl.arange(0, BLOCK_Q)  # [BQ]
    o_qi = r0 + o_t // TILE_W  # [BQ] query rows
    o_qj = c0 + o_t % TILE_W  # [BQ] query cols
    m_q = (o_qi < H) & (o_qj < W)  # [BQ]
    o_d = tl.arange(0, BLOCK_D)  # [BD]
    m_d = o_d < D  # [BD]
    ws_i = _window_start(o_qi, H, KH)  # [BQ] window top row per query
    ws_j = _window_start(o_qj, W, KW)  # [BQ] window left col per query

    p_q_tile = p_q + i_b * sq_b + i_n * sq_n + o_qi[:, None] * sq_h + o_qj[:, None] * sq_w + o_d[None, :]
    b_q = tl.load(p_q_tile, mask=m_q[:, None] & m_d[None, :], other=0.0)  # [BQ, BD]

    m_i = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)

    # Key box: union of the tile's windows.
    box_r0, box_c0, box_h, box_w = _key_box(r0, c0, H, W, KH, KW, TILE_H, TILE_W)
    n_box = box_h * box_w
    p_k_bn = p_k + i_b * sk_b + i_n * sk_n
    p_v_bn = p_v + i_b * sv_b + i_n * sv_n
    for n0 in range(0, n_box, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)  # [BN] flat index in the box
        m_n = o_n < n_box
        o_ki = box_r0 + o_n // box_w  # [BN] key rows
        o_kj = box_c0 + o_n % box_w  # [BN] key cols
        m_kd = m_n[:, None] & m_d[None, :]
        b_k = tl.load(p_k_bn + o_ki[:, None] * sk_h + o_kj[:, None] * sk_w + o_d[None, :], mask=m_kd, other=0.0)
        b_v = tl.load(p_v_bn + o_ki[:, None] * sv_h + o_kj[:, None] * sv_w + o_d[None, :], mask=m_kd, other=0.0)
        b_s = _dot(b_q, tl.trans(b_k), PRECISION, UPCAST) * qk_scale  # [BQ, BN]
        m_win = ((o_ki[None, :] >= ws_i[:, None]) & (o_ki[None, :] < ws_i[:, None] + KH)
                 & (o_kj[None, :] >= ws_j[:, None]) & (o_kj[None, :] < ws_j[:, None] + KW)
                 & m_n[None, :])  # [BQ, BN] key inside the query's window
        b_s = tl.where(m_win, b_s, float("-inf"))
        m_i, l_i, b_acc = _online_softmax_step(b_s, b_v, m_i, l_i, b_acc, PRECISION, UPCAST)

    if HAS_COND:
        p_bits_q = p_bits + ((i_b * H + o_qi) * W + o_qj) * N_WORDS  # [BQ]
        p_ck_bn = p_ck + i_b * sck_b + i_n * sck_n
        p_cv_bn = p_cv + i_b * scv_b + i_n * scv_n
        for i_w in range(0, N_WORDS):
            b_word = tl.load(p_bits_q + i_w, mask=m_q, other=0)  # [BQ] int32
            if tl.max((b_word != 0).to(tl.int32), 0) > 0:  # some query of the tile sees this block
                o_m = i_w * 32 + tl.arange(0, 32)  # [32] conditioner index
                m_md = (o_m < M)[:, None] & m_d[None, :]
                b_ck = tl.load(p_ck_bn + o_m[:, None] * sck_m + o_d[None, :], mask=m_md, other=0.0)  # [32, BD]
                b_cv = tl.load(p_cv_bn + o_m[:, None] * scv_m + o_d[None, :], mask=m_md, other=0.0)
                b_s = _dot(b_q, tl.trans(b_ck), PRECISION, UPCAST) * qk_scale
                b_s = tl.where(_cond_bits(b_word), b_s, float("-inf"))  # [BQ, 32]
                m_i, l_i, b_acc = _online_softmax_step(b_s, b_cv, m_i, l_i, b_acc, PRECISION, UPCAST)

    # Every real query sees kh*kw >= 1 image keys, so l_i > 0 for it.
    b_out = b_acc / l_i[:, None]
    p_out_tile = (p_out + (((i_b * H + o_qi[:, None]) * W + o_qj[:, None]) * HEADS + i_n) * D + o_d[None, :])
    tl.store(p_out_tile, b_out.to(p_out.dtype.element_ty), mask=m_q[:, None] & m_d[None, :])
    tl.store(p_lse + (i_b * HEADS + i_n) * H * W + o_qi * W + o_qj, m_i + tl.log2(l_i), mask=m_q)


# --------------------------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O)
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _lca_bwd_delta_kernel(
    p_do, p_o,  # [B, H, W, heads, D], strides below, unit stride along D
    p_delta,  # [B, heads, H, W] fp32 contiguous
    sdo_b, sdo_h, sdo_w, sdo_n,
    so_b, so_h, so_w, so_n,
    H, W, HEADS, D,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_blk = tl.program_id(0)
    i_bn = tl.program_id(1)
    i_b = (i_bn // HEADS).to(tl.int64)
    i_n = i_bn % HEADS
    o_p = i_blk * BLOCK_P + tl.arange(0, BLOCK_P)  # [BP] flat pixel index
    m_p = o_p < H * W
    o_i = o_p // W
    o_j = o_p % W
    o_d = tl.arange(0, BLOCK_D)
    m_pd = m_p[:, None] & (o_d < D)[None, :]  # [BP, BD]
    b_do = tl.load(p_do + i_b * sdo_b + i_n * sdo_n + o_i[:, None] * sdo_h + o_j[:, None] * sdo_w + o_d[None, :],
                   mask=m_pd, other=0.0).to(tl.float32)  # [BP, BD]
    b_o = tl.load(p_o + i_b * so_b + i_n * so_n + o_i[:, None] * so_h + o_j[:, None] * so_w + o_d[None, :],
                  mask=m_pd, other=0.0).to(tl.float32)  # [BP, BD]
    tl.store(p_delta + (i_b * HEADS + i_n) * H * W + o_p, tl.sum(b_do * b_o, 1), mask=m_p)


# --------------------------------------------------------------------------------------------------------
# Backward: dq (+ d cond_k, d cond_v) over query tiles
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _lca_bwd_dq_kernel(
    p_q, p_k, p_v, p_do,  # [B, H, W, heads, D], strides below
    p_ck, p_cv,  # [B, M, heads, D]
    p_bits,  # [B, H, W, N_WORDS] int32
    p_lse, p_delta,  # [B, heads, H, W] fp32
    p_dq,  # [B, H, W, heads, D] contiguous, q's dtype
    p_dck, p_dcv,  # [B, M, heads, D] contiguous fp32, zero-initialised (atomics)
    sq_b, sq_h, sq_w, sq_n,
    sk_b, sk_h, sk_w, sk_n,
    sv_b, sv_h, sv_w, sv_n,
    sdo_b, sdo_h, sdo_w, sdo_n,
    sck_b, sck_m, sck_n,
    scv_b, scv_m, scv_n,
    H, W, HEADS, D, M, N_WORDS, KH, KW, n_tiles_w,
    scale, qk_scale,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_COND: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    WRITE_DQ: tl.constexpr, WRITE_DCOND: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = TILE_H * TILE_W
    i_tile = tl.program_id(0)
    i_bn = tl.program_id(1)
    i_b = (i_bn // HEADS).to(tl.int64)
    i_n = i_bn % HEADS
    r0 = (i_tile // n_tiles_w) * TILE_H
    c0 = (i_tile % n_tiles_w) * TILE_W

    o_t = tl.arange(0, BLOCK_Q)  # [BQ]
    o_qi = r0 + o_t // TILE_W
    o_qj = c0 + o_t % TILE_W
    m_q = (o_qi < H) & (o_qj < W)  # [BQ]
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_qd = m_q[:, None] & m_d[None, :]  # [BQ, BD]
    ws_i = _window_start(o_qi, H, KH)
    ws_j = _window_start(o_qj, W, KW)

    b_q = tl.load(p_q + i_b * sq_b + i_n * sq_n + o_qi[:, None] * sq_h + o_qj[:, None] * sq_w + o_d[None, :],
                  mask=m_qd, other=0.0)  # [BQ, BD]
    b_do = tl.load(p_do + i_b * sdo_b + i_n * sdo_n + o_qi[:, None] * sdo_h + o_qj[:, None] * sdo_w
                   + o_d[None, :], mask=m_qd, other=0.0)  # [BQ, BD]
    o_stat = (i_b * HEADS + i_n) * H * W + o_qi * W + o_qj  # [BQ]
    b_lse = tl.load(p_lse + o_stat, mask=m_q, other=0.0)  # [BQ] log2 units
    b_delta = tl.load(p_delta + o_stat, mask=m_q, other=0.0)  # [BQ]
    b_dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)

    box_r0, box_c0, box_h, box_w = _key_box(r0, c0, H, W, KH, KW, TILE_H, TILE_W)
    n_box = box_h * box_w
    if WRITE_DQ:  # the image keys: dq only
        p_k_bn = p_k + i_b * sk_b + i_n * sk_n
        p_v_bn = p_v + i_b * sv_b + i_n * sv_n
        for n0 in range(0, n_box, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < n_box
            o_ki = box_r0 + o_n // box_w
            o_kj = box_c0 + o_n % box_w
            m_kd = m_n[:, None] & m_d[None, :]
            b_k = tl.load(p_k_bn + o_ki[:, None] * sk_h + o_kj[:, None] * sk_w + o_d[None, :], mask=m_kd, other=0.0)
            b_v = tl.load(p_v_bn + o_ki[:, None] * sv_h + o_kj[:, None] * sv_w + o_d[None, :], mask=m_kd, other=0.0)
            b_s = _dot(b_q, tl.trans(b_k), PRECISION, UPCAST) * qk_scale
            m_win = ((o_ki[None, :] >= ws_i[:, None]) & (o_ki[None, :] < ws_i[:, None] + KH)
                     & (o_kj[None, :] >= ws_j[:, None]) & (o_kj[None, :] < ws_j[:, None] + KW)
                     & m_n[None, :] & m_q[:, None])  # [BQ, BN]
            b_p = tl.where(m_win, tl.exp2(b_s - b_lse[:, None]), 0.0)  # [BQ, BN] softmax probabilities
            b_dp = _dot(b_do, tl.trans(b_v), PRECISION, UPCAST)  # [BQ, BN]
            b_ds = b_p * (b_dp - b_delta[:, None])  # [BQ, BN] d loss / d (scale * q.k)
            b_dq += _dot(b_ds.to(b_k.dtype), b_k, PRECISION, UPCAST)

    if HAS_COND:
        p_bits_q = p_bits + ((i_b * H + o_qi) * W + o_qj) * N_WORDS
        p_ck_bn = p_ck + i_b * sck_b + i_n * sck_n
        p_cv_bn = p_cv + i_b * scv_b + i_n * scv_n
        for i_w in range(0, N_WORDS):
            b_word = tl.load(p_bits_q + i_w, mask=m_q, other=0)  # [BQ] int32
            if tl.max((b_word != 0).to(tl.int32), 0) > 0:
                o_m = i_w * 32 + tl.arange(0, 32)  # [32]
                m_md = (o_m < M)[:, None] & m_d[None, :]  # [32, BD]
                b_ck = tl.load(p_ck_bn + o_m[:, None] * sck_m + o_d[None, :], mask=m_md, other=0.0)
                b_cv = tl.load(p_cv_bn + o_m[:, None] * scv_m + o_d[None, :], mask=m_md, other=0.0)
                b_s = _dot(b_q, tl.trans(b_ck), PRECISION, UPCAST) * qk_scale
                b_p = tl.where(_cond_bits(b_word), tl.exp2(b_s - b_lse[:, None]), 0.0)  # [BQ, 32]
                b_dp = _dot(b_do, tl.trans(b_cv), PRECISION, UPCAST)
                b_ds = b_p * (b_dp - b_delta[:, None])  # [BQ, 32]
                if WRITE_DQ:
                    b_dq += _dot(b_ds.to(b_ck.dtype), b_ck, PRECISION, UPCAST)
                if WRITE_DCOND:
                    # Tile sums for the conditioners, added into fp32 buffers (see the module docstring).
                    b_dcv = _dot(tl.trans(b_p.to(b_do.dtype)), b_do, PRECISION, UPCAST)  # [32, BD]
                    b_dck = _dot(tl.trans(b_ds.to(b_q.dtype)), b_q, PRECISION, UPCAST) * scale  # [32, BD]
                    o_cond = ((i_b * M + o_m[:, None]) * HEADS + i_n) * D + o_d[None, :]  # [32, BD]
                    tl.atomic_add(p_dcv + o_cond, b_dcv, mask=m_md)
                    tl.atomic_add(p_dck + o_cond, b_dck, mask=m_md)

    if WRITE_DQ:
        b_dq = b_dq * scale
        p_dq_tile = p_dq + (((i_b * H + o_qi[:, None]) * W + o_qj[:, None]) * HEADS + i_n) * D + o_d[None, :]
        tl.store(p_dq_tile, b_dq.to(p_dq.dtype.element_ty), mask=m_qd)


# --------------------------------------------------------------------------------------------------------
# Backward: dk, dv over key tiles
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _lca_bwd_dkdv_kernel(
    p_q, p_k, p_v, p_do,  # [B, H, W, heads, D], strides below
    p_lse, p_delta,  # [B, heads, H, W] fp32
    p_dk, p_dv,  # [B, H, W, heads, D] contiguous, k's / v's dtype
    sq_b, sq_h, sq_w, sq_n,
    sk_b, sk_h, sk_w, sk_n,
    sv_b, sv_h, sv_w, sv_n,
    sdo_b, sdo_h, sdo_w, sdo_n,
    H, W, HEADS, D, KH, KW, n_tiles_w,
    scale, qk_scale,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    BLOCK_K: tl.constexpr = TILE_H * TILE_W
    i_tile = tl.program_id(0)
    i_bn = tl.program_id(1)
    i_b = (i_bn // HEADS).to(tl.int64)
    i_n = i_bn % HEADS
    r0 = (i_tile // n_tiles_w) * TILE_H
    c0 = (i_tile % n_tiles_w) * TILE_W
    r1 = tl.minimum(r0 + TILE_H, H) - 1  # last key row of the tile
    c1 = tl.minimum(c0 + TILE_W, W) - 1

    o_t = tl.arange(0, BLOCK_K)  # [BK]
    o_ki = r0 + o_t // TILE_W  # [BK] key rows
    o_kj = c0 + o_t % TILE_W  # [BK] key cols
    m_k = (o_ki < H) & (o_kj < W)  # [BK]
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_kd = m_k[:, None] & m_d[None, :]
    b_k = tl.load(p_k + i_b * sk_b + i_n * sk_n + o_ki[:, None] * sk_h + o_kj[:, None] * sk_w + o_d[None, :],
                  mask=m_kd, other=0.0)  # [BK, BD]
    b_v = tl.load(p_v + i_b * sv_b + i_n * sv_n + o_ki[:, None] * sv_h + o_kj[:, None] * sv_w + o_d[None, :],
                  mask=m_kd, other=0.0)  # [BK, BD]
    b_dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)

    # Query box: the window start is monotone in the query index, so the queries whose window meets key
    # rows [r0, r1] are a contiguous range (likewise for columns).
    qbox_r0 = tl.where(r0 < KH, 0, r0 - KH // 2)
    qbox_r1 = tl.where(r1 >= H - KH, H - 1, r1 + KH // 2)
    qbox_c0 = tl.where(c0 < KW, 0, c0 - KW // 2)
    qbox_c1 = tl.where(c1 >= W - KW, W - 1, c1 + KW // 2)
    qbox_w = qbox_c1 - qbox_c0 + 1
    n_qbox = (qbox_r1 - qbox_r0 + 1) * qbox_w
    p_q_bn = p_q + i_b * sq_b + i_n * sq_n
    p_do_bn = p_do + i_b * sdo_b + i_n * sdo_n
    p_stat_bn = (i_b * HEADS + i_n) * H * W
    for q0 in range(0, n_qbox, BLOCK_M):
        o_m = q0 + tl.arange(0, BLOCK_M)  # [BM] flat index in the query box
        m_m = o_m < n_qbox
        o_qi = qbox_r0 + o_m // qbox_w  # [BM] query rows
        o_qj = qbox_c0 + o_m % qbox_w  # [BM] query cols
        m_md = m_m[:, None] & m_d[None, :]
        b_q = tl.load(p_q_bn + o_qi[:, None] * sq_h + o_qj[:, None] * sq_w + o_d[None, :], mask=m_md, other=0.0)
        b_do = tl.load(p_do_bn + o_qi[:, None] * sdo_h + o_qj[:, None] * sdo_w + o_d[None, :], mask=m_md,
                       other=0.0)  # [BM, BD]
        b_lse = tl.load(p_lse + p_stat_bn + o_qi * W + o_qj, mask=m_m, other=0.0)  # [BM]
        b_delta = tl.load(p_delta + p_stat_bn + o_qi * W + o_qj, mask=m_m, other=0.0)  # [BM]
        ws_i = _window_start(o_qi, H, KH)  # [BM]
        ws_j = _window_start(o_qj, W, KW)
        m_win = ((o_ki[:, None] >= ws_i[None, :]) & (o_ki[:, None] < ws_i[None, :] + KH)
                 & (o_kj[:, None] >= ws_j[None, :]) & (o_kj[:, None] < ws_j[None, :] + KW)
                 & m_m[None, :] & m_k[:, None])  # [BK, BM] key inside the query's window
        b_st = _dot(b_k, tl.trans(b_q), PRECISION, UPCAST) * qk_scale  # [BK, BM]
        b_pt = tl.where(m_win, tl.exp2(b_st - b_lse[None, :]), 0.0)  # [BK, BM]
        b_dv += _dot(b_pt.to(b_do.dtype), b_do, PRECISION, UPCAST)
        b_dpt = _dot(b_v, tl.trans(b_do), PRECISION, UPCAST)  # [BK, BM]
        b_dst = b_pt * (b_dpt - b_delta[None, :])  # [BK, BM]
        b_dk += _dot(b_dst.to(b_q.dtype), b_q, PRECISION, UPCAST)

    b_dk = b_dk * scale
    o_out = (((i_b * H + o_ki[:, None]) * W + o_kj[:, None]) * HEADS + i_n) * D + o_d[None, :]  # [BK, BD]
    tl.store(p_dk + o_out, b_dk.to(p_dk.dtype.element_ty), mask=m_kd)
    tl.store(p_dv + o_out, b_dv.to(p_dv.dtype.element_ty), mask=m_kd)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _capability(device: torch.device) -> Optional[tuple[int, int]]:
    """The CUDA compute capability of `device` ((9, 0) on an H100/H200), None off CUDA."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _config(D: int, dtype: torch.dtype, capability: Optional[tuple[int, int]] = None) -> dict:
    """Block sizes and launch parameters (fixed, no autotuning) for head dim D, dtype and the GPU's compute
    capability.

    GPU, half precision: 8 x 16 query tiles (128 queries per program, as FlashAttention) over BLOCK_N-key
    blocks for the forward and dq; dk/dv: 8 x 16 key tiles over BLOCK_M-query blocks (32, 16 at D = 128);
    8 warps, 2 stages. BLOCK_N: on Hopper (sm_90) 64, 32 at D = 128; before Hopper (sm_80/86/89, mma.sync)
    half that: at 64/32 the forward and dq kernels with conditioners hit 255 registers and spilled there
    (8-64 bytes), at 32/16 they do not. The largest blocks that compile without register spills, chosen
    from ahead-of-time sm_90 and sm_80 compiles with triton 3.6 and 3.9 (`python -m fastcomp.kernels._aot`,
    tests/test_triton_aot.py; no GPU was at hand to time them): the 4-warp variants, 64-query dk/dv blocks
    and, on sm_80 at D = 128, 32-query dk/dv blocks hit 255 registers and spill.
    float32 runs its dots with input_precision="ieee" on CUDA cores by default (exact enough for float32
    references; "tf32x3" spilled as much and needed up to 208 KB of shared memory); it is the correctness
    path, not the fast one, and takes small 4 x 16 tiles with 32-blocks (16 and one stage at D > 64). Its
    kernels spill registers (up to ~10 KB per thread with conditioners at D = 128): Triton's FMA dot keeps
    whole D-long operand rows in registers for q k^T and dO v^T.
    Interpreter (TRITON_INTERPRET=1, CPU tests): 4 x 4 tiles and 16-blocks, the smallest tl.dot accepts,
    since every masked lane costs numpy time there.
    """
    block_d = max(16, triton.next_power_of_2(D))
    if _interpreting():
        return dict(TILE_H=4, TILE_W=4, BLOCK_N=16, BLOCK_M=16, BLOCK_D=block_d, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        small = block_d <= 64
        return dict(TILE_H=4, TILE_W=16, BLOCK_N=32 if small else 16, BLOCK_M=32 if small else 16,
                    BLOCK_D=block_d, num_warps=4, num_stages=2 if small else 1)
    block_n = 64 if block_d <= 64 else 32
    if capability is not None and capability[0] < 9:
        block_n //= 2
    return dict(TILE_H=8, TILE_W=16, BLOCK_N=block_n, BLOCK_M=32 if block_d <= 64 else 16,
                BLOCK_D=block_d, num_warps=8, num_stages=2)


# Every input the kernels index with its own strides (q, k, v, cond_k, cond_v, and the backward's grad_out
# and out) passes through _strides5 / _strides4, which check its int32 offsets: the batch offset is int64 in
# the kernels, each offset inside one batch item (index * stride, one per axis) int32. The outputs are
# allocated contiguous and addressed from the int64 batch offset.

def _strides5(name: str, t: torch.Tensor, where: str) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Strides (b, h, w, head) of a [B, H, W, heads, D] tensor; copied first when D is not unit-stride."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    check_int32_extent(f"fastcomp.kernels.attention.{where}", name, t, (1, 2, 3))
    return t, (t.stride(0), t.stride(1), t.stride(2), t.stride(3))


def _strides4(name: str, t: torch.Tensor, where: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Strides (b, m, head) of a [B, M, heads, D] tensor; copied first when D is not unit-stride."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    # masked lanes of the last conditioner block index up to the next multiple of 32
    padded_m = triton.cdiv(t.shape[1], _COND_BLOCK) * _COND_BLOCK
    check_int32_extent(f"fastcomp.kernels.attention.{where}", name, t, (1, 2), sizes={1: padded_m})
    return t, (t.stride(0), t.stride(1), t.stride(2))


def _pack_cond_mask(cond_mask: Optional[torch.Tensor], B: int, M: int, H: int, W: int,
                    device) -> torch.Tensor:
    """[B, M, H, W] bool (None = all true) -> [B, H, W, ceil(M / 32)] int32, bit c of word w = m = 32 w + c."""
    n_words = triton.cdiv(M, _COND_BLOCK)
    if cond_mask is None:
        allowed = torch.ones(B, M, H, W, dtype=torch.bool, device=device)
    else:
        allowed = cond_mask
    padded = torch.zeros(B, n_words * _COND_BLOCK, H, W, dtype=torch.int64, device=device)
    padded[:, :M] = allowed
    weights = torch.bitwise_left_shift(torch.ones(_COND_BLOCK, dtype=torch.int64, device=device),
                                       torch.arange(_COND_BLOCK, device=device))  # [32] = 2^c
    words = (padded.view(B, n_words, _COND_BLOCK, H, W) * weights[None, None, :, None, None]).sum(2)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as int32 (two's complement)
    return words.to(torch.int32).permute(0, 2, 3, 1).contiguous()  # [B, H, W, n_words]


def _check_inputs(q, k, v, cond_k, cond_v, cond_mask, kernel_size, fn: str):
    """What only the kernels know: the dtypes and head dims they are built for, the devices they run on and
    the grid limit. The rest of the contract (shapes, dtypes and devices alike, an odd kernel at most the
    image side, conditioners and mask together) is checked once, by fastcomp.local_conditional_attention."""
    where = f"fastcomp.kernels.attention.{fn}"
    if q.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"{where}: q has dtype {q.dtype}; the Triton kernels support float32, float16 and "
                        f"bfloat16 (use the cpu backend for float64)")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"{where}: tensors on {q.device} need TRITON_INTERPRET=1 (set before importing "
                           f"this module); move them to a CUDA device or use the cpu backend")
    B, H, W, heads, D = q.shape
    if B * heads > GRID_YZ_LIMIT:  # grid axis 1 is batch * head
        raise ValueError(f"{where}: batch * heads = {B * heads} exceeds {GRID_YZ_LIMIT}; split the batch into chunks")
    low, high = ATTENTION_HEAD_DIMS
    if not low <= D <= high:
        raise ValueError(f"{where}: head dim D = {D} is outside the supported {low}..{high}")


def _precision(dtype: torch.dtype) -> str:
    # float32 dots follow PyTorch's float32 matmul setting, as the reference's matmuls do: "ieee" by default
    # (exact enough for float32 references), "tf32" once the user allowed TF32. Half precision ignores it.
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return _interpreting() and dtype == torch.bfloat16  # see _dot


def lca_forward(q, k, v, cond_k, cond_v, cond_mask, kernel_size, scale):
    """Fused forward. Returns out [B, H, W, heads, D] (q.dtype) and lse [B, heads, H, W] float32 (log2)."""
    _check_inputs(q, k, v, cond_k, cond_v, cond_mask, kernel_size, "lca_forward")
    B, H, W, heads, D = q.shape
    kh, kw = kernel_size
    out = torch.empty(B, H, W, heads, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, heads, H, W, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    q, sq = _strides5("q", q, "lca_forward")
    k, sk = _strides5("k", k, "lca_forward")
    v, sv = _strides5("v", v, "lca_forward")
    M = 0 if cond_k is None else cond_k.shape[1]
    has_cond = M > 0
    if has_cond:
        cond_k, sck = _strides4("cond_k", cond_k, "lca_forward")
        cond_v, scv = _strides4("cond_v", cond_v, "lca_forward")
        bits = _pack_cond_mask(cond_mask, B, M, H, W, q.device)
    else:  # dummies: never dereferenced with HAS_COND false
        cond_k, cond_v, sck, scv = q, q, (0, 0, 0), (0, 0, 0)
        bits = torch.zeros(1, dtype=torch.int32, device=q.device)
    cfg = _config(D, q.dtype, _capability(q.device))
    n_tiles_w = triton.cdiv(W, cfg["TILE_W"])
    grid = (triton.cdiv(H, cfg["TILE_H"]) * n_tiles_w, B * heads)
    launch(
        _lca_fwd_kernel, grid, q.device,
        q, k, v, cond_k, cond_v, bits, out, lse,
        *sq, *sk, *sv, *sck, *scv,
        H, W, heads, D, M, triton.cdiv(M, _COND_BLOCK), kh, kw, n_tiles_w,
        float(scale) * _RCP_LN2,
        TILE_H=cfg["TILE_H"], TILE_W=cfg["TILE_W"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        HAS_COND=has_cond, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=True,
    )
    return out, lse


def lca_backward(grad_out, q, k, v, cond_k, cond_v, cond_mask, out, lse, kernel_size, scale):
    """Fused backward from lca_forward's out and lse. Returns (dq, dk, dv, dcond_k, dcond_v), each in its
    input's dtype and shape; dcond_* are None when cond_k is None."""
    _check_inputs(q, k, v, cond_k, cond_v, cond_mask, kernel_size, "lca_backward")
    if grad_out.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"fastcomp.kernels.attention.lca_backward: grad_out {list(grad_out.shape)} and "
                         f"out {list(out.shape)} must have q's shape {list(q.shape)}")
    B, H, W, heads, D = q.shape
    kh, kw = kernel_size
    M = 0 if cond_k is None else cond_k.shape[1]
    has_cond = M > 0
    dq = torch.empty(B, H, W, heads, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, W, heads, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, H, W, heads, D, dtype=v.dtype, device=q.device)
    # Conditioner gradients are sums of atomic adds: they start at zero, in fp32.
    dck32 = torch.zeros(B, M, heads, D, dtype=torch.float32, device=q.device) if cond_k is not None else None
    dcv32 = torch.zeros(B, M, heads, D, dtype=torch.float32, device=q.device) if cond_k is not None else None

    def result():
        if cond_k is None:
            return dq, dk, dv, None, None
        return dq, dk, dv, dck32.to(cond_k.dtype), dcv32.to(cond_v.dtype)

    if dq.numel() == 0:
        return result()
    grad_out = grad_out.to(q.dtype)
    lse = lse.contiguous()
    q, sq = _strides5("q", q, "lca_backward")
    k, sk = _strides5("k", k, "lca_backward")
    v, sv = _strides5("v", v, "lca_backward")
    grad_out, sdo = _strides5("grad_out", grad_out, "lca_backward")
    out, so = _strides5("out", out, "lca_backward")
    # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij: the softmax-backward row term, fp32.
    delta = torch.empty(B, heads, H, W, dtype=torch.float32, device=q.device)
    block_p = 16 if _interpreting() else 64
    launch(
        _lca_bwd_delta_kernel, (triton.cdiv(H * W, block_p), B * heads), q.device,
        grad_out, out, delta, *sdo, *so, H, W, heads, D,
        BLOCK_P=block_p, BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=4, enable_fp_fusion=True,
    )
    if has_cond:
        ck, sck = _strides4("cond_k", cond_k, "lca_backward")
        cv, scv = _strides4("cond_v", cond_v, "lca_backward")
        bits = _pack_cond_mask(cond_mask, B, M, H, W, q.device)
        dck_arg, dcv_arg = dck32, dcv32
    else:
        ck, cv, sck, scv = q, q, (0, 0, 0), (0, 0, 0)
        bits = torch.zeros(1, dtype=torch.int32, device=q.device)
        dck_arg = dcv_arg = torch.zeros(1, dtype=torch.float32, device=q.device)
    cfg = _config(D, q.dtype, _capability(q.device))
    precision = _precision(q.dtype)
    n_tiles_w = triton.cdiv(W, cfg["TILE_W"])
    grid = (triton.cdiv(H, cfg["TILE_H"]) * n_tiles_w, B * heads)
    dq_args = (
        q, k, v, grad_out, ck, cv, bits, lse, delta, dq, dck_arg, dcv_arg,
        *sq, *sk, *sv, *sdo, *sck, *scv,
        H, W, heads, D, M, triton.cdiv(M, _COND_BLOCK), kh, kw, n_tiles_w,
        float(scale), float(scale) * _RCP_LN2,
    )
    dq_meta = dict(TILE_H=cfg["TILE_H"], TILE_W=cfg["TILE_W"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                   HAS_COND=has_cond, PRECISION=precision, UPCAST=_upcast(q.dtype),
                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=True)
    launch(_lca_bwd_dq_kernel, grid, q.device, *dq_args, WRITE_DQ=True, WRITE_DCOND=False, **dq_meta)
    if has_cond:  # the same kernel specialised to the conditioner blocks' d cond_k, d cond_v (atomics)
        launch(_lca_bwd_dq_kernel, grid, q.device, *dq_args, WRITE_DQ=False, WRITE_DCOND=True, **dq_meta)
    launch(
        _lca_bwd_dkdv_kernel, grid, q.device,
        q, k, v, grad_out, lse, delta, dk, dv,
        *sq, *sk, *sv, *sdo,
        H, W, heads, D, kh, kw, n_tiles_w,
        float(scale), float(scale) * _RCP_LN2,
        TILE_H=cfg["TILE_H"], TILE_W=cfg["TILE_W"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
        PRECISION=precision, UPCAST=_upcast(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=True,
    )
    return result()


# --- forward-mode derivative (jvp) ------------------------------------------------------------------
#
# Entry point:
#
#     lca_jvp(q, k, v, cond_k, cond_v, cond_mask, out, lse, dq, dk, dv, dcond_k, dcond_v, kernel_size, scale)
#         -> dout [B, H, W, heads, D] in q.dtype
#
# q, k, v, cond_k, cond_v, cond_mask: as for lca_forward; out, lse: what it returned
# (lse float32 in log2 units); dq, dk, dv (like q) and dcond_k, dcond_v (like cond_k): tangents, None where zero.
#
# Math: with p_ij = exp2(s_ij - lse_i) known from the forward (s in log2 units), the tangent of out_i is
#     dout_i = sum_j p_ij t_ij v_j - mu_i out_i + sum_j p_ij dv_j,   t_ij = scale (dq_i . k_j + q_i . dk_j),
#     mu_i = sum_j p_ij t_ij,
# over the query's window keys and the conditioners it may see. So, unlike the forward, no online softmax:
# one pass over the forward's tiling (TILE_H x TILE_W query tiles, the union of their windows walked in
# BLOCK_N-key blocks, conditioner blocks of 32 skipped when no query of the tile sees them), with up to five
# tl.dot per block (S = Q K^T, dQ K^T, Q dK^T, (P * T) V, P dV); a tangent that is None drops its dots at
# compile time (HAS_* constexprs). This shares the forward's helpers and block sizes (above).


@triton.jit
def _jvp_block(b_q, b_dq, b_k, b_v, b_dk, b_dv, b_lse, m_keep, b_acc, b_mu, qk_scale, scale,
               HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one key block into (b_acc [BQ, BD], b_mu [BQ]). b_q, b_dq: [BQ, BD]; b_k, b_v, b_dk, b_dv:
    [BN, BD]; b_lse: [BQ] log2 units; m_keep: [BQ, BN] may the query see the key."""
    b_s = _dot(b_q, tl.trans(b_k), PRECISION, UPCAST) * qk_scale  # [BQ, BN] log2 units
    b_p = tl.where(m_keep, tl.exp2(b_s - b_lse[:, None]), 0.0)  # [BQ, BN]
    if HAS_DQ or HAS_DK:
        b_t = b_s * 0.0  # [BQ, BN]
        if HAS_DQ:
            b_t += _dot(b_dq, tl.trans(b_k), PRECISION, UPCAST)
        if HAS_DK:
            b_t += _dot(b_q, tl.trans(b_dk), PRECISION, UPCAST)
        b_pt = b_p * b_t * scale  # [BQ, BN]
        b_mu += tl.sum(b_pt, 1)
        b_acc += _dot(b_pt.to(b_v.dtype), b_v, PRECISION, UPCAST)
    if HAS_DV:
        b_acc += _dot(b_p.to(b_dv.dtype), b_dv, PRECISION, UPCAST)
    return b_acc, b_mu


@triton.jit
def _lca_jvp_kernel(
    p_q, p_k, p_v, p_dq, p_dk, p_dv,  # [B, H, W, heads, D], strides below (dq, dk, dv share q's, k's, v's)
    p_ck, p_cv, p_dck, p_dcv,  # [B, M, heads, D] (dummies when HAS_COND is false)
    p_bits,  # [B, H, W, N_WORDS] int32 packed cond_mask
    p_out, p_lse, p_dout,  # out, dout [B, H, W, heads, D] contiguous; lse [B, heads, H, W] fp32 (log2)
    sq_b, sq_h, sq_w, sq_n,
    sk_b, sk_h, sk_w, sk_n,
    sv_b, sv_h, sv_w, sv_n,
    sck_b, sck_m, sck_n,
    scv_b, scv_m, scv_n,
    H, W, HEADS, D, M, N_WORDS, KH, KW, n_tiles_w,
    qk_scale, scale,  # softmax scale * log2(e), softmax scale
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_COND: tl.constexpr, HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr,
    HAS_DCK: tl.constexpr, HAS_DCV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = TILE_H * TILE_W
    i_tile = tl.program_id(0)
    i_bn = tl.program_id(1)
    i_b = (i_bn // HEADS).to(tl.int64)
    i_n = i_bn % HEADS
    r0 = (i_tile // n_tiles_w) * TILE_H
    c0 = (i_tile % n_tiles_w) * TILE_W

    o_t = tl.arange(0, BLOCK_Q)  # [BQ]
    o_qi = r0 + o_t // TILE_W  # [BQ] query rows
    o_qj = c0 + o_t % TILE_W  # [BQ] query cols
    m_q = (o_qi < H) & (o_qj < W)  # [BQ]
    o_d = tl.arange(0, BLOCK_D)  # [BD]
    m_d = o_d < D  # [BD]
    m_qd = m_q[:, None] & m_d[None, :]
    ws_i = _window_start(o_qi, H, KH)  # [BQ]
    ws_j = _window_start(o_qj, W, KW)  # [BQ]

    o_q_tile = i_b * sq_b + i_n * sq_n + o_qi[:, None] * sq_h + o_qj[:, None] * sq_w + o_d[None, :]
    b_q = tl.load(p_q + o_q_tile, mask=m_qd, other=0.0)  # [BQ, BD]
    b_dq = b_q
    if HAS_DQ:
        b_dq = tl.load(p_dq + o_q_tile, mask=m_qd, other=0.0)
    b_lse = tl.load(p_lse + (i_b * HEADS + i_n) * H * W + o_qi * W + o_qj, mask=m_q, other=0.0)  # [BQ]

    b_acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    b_mu = tl.zeros([BLOCK_Q], dtype=tl.float32)

    if HAS_DQ or HAS_DK or HAS_DV:  # image keys contribute only through these tangents
        box_r0, box_c0, box_h, box_w = _key_box(r0, c0, H, W, KH, KW, TILE_H, TILE_W)
        n_box = box_h * box_w
        o_k_bn = i_b * sk_b + i_n * sk_n
        o_v_bn = i_b * sv_b + i_n * sv_n
        for n0 in range(0, n_box, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)  # [BN] flat index in the box
            m_n = o_n < n_box
            o_ki = box_r0 + o_n // box_w  # [BN]
            o_kj = box_c0 + o_n % box_w  # [BN]
            m_kd = m_n[:, None] & m_d[None, :]
            o_k = o_k_bn + o_ki[:, None] * sk_h + o_kj[:, None] * sk_w + o_d[None, :]
            o_v = o_v_bn + o_ki[:, None] * sv_h + o_kj[:, None] * sv_w + o_d[None, :]
            b_k = tl.load(p_k + o_k, mask=m_kd, other=0.0)  # [BN, BD]
            b_v = tl.load(p_v + o_v, mask=m_kd, other=0.0)
            b_dk = b_k
            b_dv = b_v
            if HAS_DK:
                b_dk = tl.load(p_dk + o_k, mask=m_kd, other=0.0)
            if HAS_DV:
                b_dv = tl.load(p_dv + o_v, mask=m_kd, other=0.0)
            m_win = ((o_ki[None, :] >= ws_i[:, None]) & (o_ki[None, :] < ws_i[:, None] + KH)
                     & (o_kj[None, :] >= ws_j[:, None]) & (o_kj[None, :] < ws_j[:, None] + KW)
                     & m_n[None, :] & m_q[:, None])  # [BQ, BN]
            b_acc, b_mu = _jvp_block(b_q, b_dq, b_k, b_v, b_dk, b_dv, b_lse, m_win, b_acc, b_mu, qk_scale, scale,
                                     HAS_DQ, HAS_DK, HAS_DV, PRECISION, UPCAST)

    if HAS_COND and (HAS_DQ or HAS_DCK or HAS_DCV):
        p_bits_q = p_bits + ((i_b * H + o_qi) * W + o_qj) * N_WORDS  # [BQ]
        o_ck_bn = i_b * sck_b + i_n * sck_n
        o_cv_bn = i_b * scv_b + i_n * scv_n
        for i_w in range(0, N_WORDS):
            b_word = tl.load(p_bits_q + i_w, mask=m_q, other=0)  # [BQ] int32
            if tl.max((b_word != 0).to(tl.int32), 0) > 0:  # some query of the tile sees this block
                o_m = i_w * 32 + tl.arange(0, 32)  # [32]
                m_md = (o_m < M)[:, None] & m_d[None, :]
                o_ck = o_ck_bn + o_m[:, None] * sck_m + o_d[None, :]
                o_cv = o_cv_bn + o_m[:, None] * scv_m + o_d[None, :]
                b_ck = tl.load(p_ck + o_ck, mask=m_md, other=0.0)  # [32, BD]
                b_cv = tl.load(p_cv + o_cv, mask=m_md, other=0.0)
                b_dck = b_ck
                b_dcv = b_cv
                if HAS_DCK:
                    b_dck = tl.load(p_dck + o_ck, mask=m_md, other=0.0)
                if HAS_DCV:
                    b_dcv = tl.load(p_dcv + o_cv, mask=m_md, other=0.0)
                m_see = _cond_bits(b_word) & m_q[:, None]  # [BQ, 32]
                b_acc, b_mu = _jvp_block(b_q, b_dq, b_ck, b_cv, b_dck, b_dcv, b_lse, m_see, b_acc, b_mu, qk_scale,
                                         scale, HAS_DQ, HAS_DCK, HAS_DCV, PRECISION, UPCAST)

    o_out = (((i_b * H + o_qi[:, None]) * W + o_qj[:, None]) * HEADS + i_n) * D + o_d[None, :]
    b_out = tl.load(p_out + o_out, mask=m_qd, other=0.0).to(tl.float32)
    b_dout = b_acc - b_mu[:, None] * b_out
    tl.store(p_dout + o_out, b_dout.to(p_dout.dtype.element_ty), mask=m_qd)


def _like(name: str, t, ref: torch.Tensor):
    """A tangent, in ref's dtype with ref's shape, or None."""
    if t is None:
        return None
    if t.shape != ref.shape:
        raise ValueError(f"fastcomp.kernels.attention.lca_jvp: {name} has shape {list(t.shape)}, "
                         f"expected {list(ref.shape)}")
    return t.to(device=ref.device, dtype=ref.dtype)


def lca_jvp(q, k, v, cond_k, cond_v, cond_mask, out, lse, dq, dk, dv, dcond_k, dcond_v, kernel_size, scale):
    """Fused forward-mode derivative from lca_forward's out and lse: dout [B, H, W, heads, D] in q.dtype."""
    _check_inputs(q, k, v, cond_k, cond_v, cond_mask, kernel_size, "lca_jvp")
    B, H, W, heads, D = q.shape
    kh, kw = kernel_size
    dq, dk, dv = _like("dq", dq, q), _like("dk", dk, k), _like("dv", dv, v)
    M = 0 if cond_k is None else cond_k.shape[1]
    has_cond = M > 0
    dcond_k = _like("dcond_k", dcond_k, cond_k) if has_cond else None
    dcond_v = _like("dcond_v", dcond_v, cond_v) if has_cond else None
    dout = torch.empty(B, H, W, heads, D, dtype=q.dtype, device=q.device)
    if dout.numel() == 0:
        return dout
    # dq, dk, dv are indexed with q's, k's, v's strides: give them the same layout.
    q, k, v, out = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous()
    dq, dk, dv = (None if t is None else t.contiguous() for t in (dq, dk, dv))
    q, sq = _strides5("q", q, "lca_jvp")
    k, sk = _strides5("k", k, "lca_jvp")
    v, sv = _strides5("v", v, "lca_jvp")
    # out, dout and the tangents are indexed with q's strides (all contiguous, same shape): one check covers
    # them; see _strides5 for the int32 offsets inside one batch item.
    if has_cond:
        cond_k, cond_v = cond_k.contiguous(), cond_v.contiguous()
        dcond_k, dcond_v = (None if t is None else t.contiguous() for t in (dcond_k, dcond_v))
        cond_k, sck = _strides4("cond_k", cond_k, "lca_jvp")
        cond_v, scv = _strides4("cond_v", cond_v, "lca_jvp")
        bits = _pack_cond_mask(cond_mask, B, M, H, W, q.device)
    else:  # dummies: never dereferenced with HAS_COND false
        cond_k, cond_v, sck, scv = q, q, (0, 0, 0), (0, 0, 0)
        bits = torch.zeros(1, dtype=torch.int32, device=q.device)
    cfg = _config(D, q.dtype, _capability(q.device))
    n_tiles_w = triton.cdiv(W, cfg["TILE_W"])
    grid = (triton.cdiv(H, cfg["TILE_H"]) * n_tiles_w, B * heads)
    launch(
        _lca_jvp_kernel, grid, q.device,
        q, k, v, q if dq is None else dq, k if dk is None else dk, v if dv is None else dv,
        cond_k, cond_v, cond_k if dcond_k is None else dcond_k, cond_v if dcond_v is None else dcond_v,
        bits, out, lse.contiguous(), dout,
        *sq, *sk, *sv, *sck, *scv,
        H, W, heads, D, M, triton.cdiv(M, _COND_BLOCK), kh, kw, n_tiles_w,
        float(scale) * _RCP_LN2, float(scale),
        TILE_H=cfg["TILE_H"], TILE_W=cfg["TILE_W"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        HAS_COND=has_cond, HAS_DQ=dq is not None, HAS_DK=dk is not None, HAS_DV=dv is not None,
        HAS_DCK=dcond_k is not None, HAS_DCV=dcond_v is not None,
        PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=True,
    )
    return dout
