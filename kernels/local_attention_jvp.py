"""Triton kernel for the forward-mode derivative (jvp) of the fused local conditional attention.

Entry point (fastcomp/ops/attention.py's triton backend calls it):

    lca_jvp(q, k, v, cond_k, cond_v, cond_mask, out, lse, dq, dk, dv, dcond_k, dcond_v, kernel_size, scale)
        -> dout [B, H, W, heads, D] in q.dtype

q, k, v, cond_k, cond_v, cond_mask: as for kernels/local_attention.py's lca_forward; out, lse: what it returned
(lse float32 in log2 units); dq, dk, dv (like q) and dcond_k, dcond_v (like cond_k): tangents, None where zero.

Math: with p_ij = exp2(s_ij - lse_i) known from the forward (s in log2 units), the tangent of out_i is
    dout_i = sum_j p_ij t_ij v_j - mu_i out_i + sum_j p_ij dv_j,   t_ij = scale (dq_i . k_j + q_i . dk_j),
    mu_i = sum_j p_ij t_ij,
over the query's window keys and the conditioners it may see. So, unlike the forward, no online softmax:
one pass over the forward's tiling (TILE_H x TILE_W query tiles, the union of their windows walked in
BLOCK_N-key blocks, conditioner blocks of 32 skipped when no query of the tile sees them), with up to five
tl.dot per block (S = Q K^T, dQ K^T, Q dK^T, (P * T) V, P dV); a tangent that is None drops its dots at
compile time (HAS_* constexprs). This shares the forward's helpers and block sizes (kernels/local_attention.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from . import local_attention as _la
from .local_attention import (_COND_BLOCK, _RCP_LN2, _cond_bits, _config, _dot, _key_box, _pack_cond_mask,
                              _precision, _strides4, _strides5, _upcast, _window_start)


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
        raise ValueError(f"fastcomp.kernels.local_attention_jvp.lca_jvp: {name} has shape {list(t.shape)}, "
                         f"expected {list(ref.shape)}")
    return t.to(device=ref.device, dtype=ref.dtype)


def lca_jvp(q, k, v, cond_k, cond_v, cond_mask, out, lse, dq, dk, dv, dcond_k, dcond_v, kernel_size, scale):
    """Fused forward-mode derivative from lca_forward's out and lse: dout [B, H, W, heads, D] in q.dtype."""
    _la._check_inputs(q, k, v, cond_k, cond_v, cond_mask, kernel_size, "lca_jvp")
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
    cfg = _config(D, q.dtype, _la._capability(q.device))
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
