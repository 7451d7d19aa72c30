"""Causal flash attention's backward kernels (the launcher, attention_backward, is in attention.py).

dk, dv: one program per key block, over the query blocks that see it; dq: one program per query
block, recomputing P and dP. dq by fp32 atomics from the dk/dv programs (FlashAttention-2's way)
was 3% slower on an H100 (results/bench/README.md#fused-dq).
RoPE's transpose is applied to dq', dk' on tiles in registers (`_unrope`): no extra pass.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rotate_half(x, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    # cat(-x2, x1) on a register tile: view (BLOCK, 2, D/2), split the halves, swap, rejoin.
    # No second load of the tile from memory.
    x1, x2 = tl.split(tl.permute(tl.reshape(x, (BLOCK, 2, HEAD_DIM // 2)), (0, 2, 1)))
    return tl.reshape(tl.permute(tl.join(-x2, x1), (0, 2, 1)), (BLOCK, HEAD_DIM))


@triton.jit
def _unrope(dx, rows, cols, seq_len, C_ptr, S_ptr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Gradient through RoPE: dx * cos - rotate_half(dx * sin)."""
    mask = (rows < seq_len)[:, None]
    cs = rows[:, None] * HEAD_DIM + cols[None, :]
    c = tl.load(C_ptr + cs, mask=mask, other=0.0)
    s = tl.load(S_ptr + cs, mask=mask, other=0.0)
    return dx * c - _rotate_half(dx * s, BLOCK, HEAD_DIM)


@triton.jit
def _attn_bwd_delta_kernel(O_ptr, DO_ptr, DELTA_ptr, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt,
                           n_heads, seq_len, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    cols = tl.arange(0, HEAD_DIM)
    mask = (offs_m < seq_len)[:, None]
    o = tl.load(O_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + cols[None, :], mask=mask, other=0.0)
    do = tl.load(DO_ptr + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + cols[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA_ptr + bh.to(tl.int64) * seq_len + offs_m, delta, mask=offs_m < seq_len)


@triton.jit
def _attn_bwd_dkdv_step(dk, dv, k, v, q_base, do_base, stride_qt, stride_dt, lse_base, delta_base, start_m, offs_n, cols,
                        seq_len, qk_scale, MASK: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rmask = offs_m < seq_len
    q = tl.load(q_base + offs_m[:, None] * stride_qt + cols[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dt + cols[None, :], mask=rmask[:, None], other=0.0)
    lse = tl.load(lse_base + offs_m, mask=rmask, other=0.0)
    delta = tl.load(delta_base + offs_m, mask=rmask, other=0.0)
    p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
    if MASK:  # diagonal blocks, and query rows past the end
        p_t = tl.where((offs_m[None, :] >= offs_n[:, None]) & rmask[None, :], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do)
    ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, DK_ptr, DV_ptr, LSE_ptr, DELTA_ptr, C_ptr, S_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_db, stride_dh, stride_dt, stride_gb, stride_gh, stride_gt,
    n_heads, seq_len, qk_scale, sm_scale,
    ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per key block: dk, dv accumulate over the query blocks that see it (i >= j).
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HEAD_DIM)
    nmask = (offs_n < seq_len)[:, None]
    k = tl.load(K_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + cols[None, :], mask=nmask, other=0.0)
    v = tl.load(V_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + cols[None, :], mask=nmask, other=0.0)
    q_base = Q_ptr + b * stride_qb + h * stride_qh
    do_base = DO_ptr + b * stride_db + h * stride_dh
    lse_base = LSE_ptr + bh.to(tl.int64) * seq_len
    delta_base = DELTA_ptr + bh.to(tl.int64) * seq_len
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    diag_end = tl.minimum(start_n + BLOCK_N, seq_len)
    full_end = diag_end + ((seq_len - diag_end) // BLOCK_M) * BLOCK_M
    for start_m in range(start_n, diag_end, BLOCK_M):  # diagonal: causal mask
        dk, dv = _attn_bwd_dkdv_step(dk, dv, k, v, q_base, do_base, stride_qt, stride_dt, lse_base, delta_base, start_m,
                                     offs_n, cols, seq_len, qk_scale, True, BLOCK_M)
    for start_m in range(diag_end, full_end, BLOCK_M):  # below it, all rows valid: no mask
        dk, dv = _attn_bwd_dkdv_step(dk, dv, k, v, q_base, do_base, stride_qt, stride_dt, lse_base, delta_base, start_m,
                                     offs_n, cols, seq_len, qk_scale, False, BLOCK_M)
    for start_m in range(full_end, seq_len, BLOCK_M):  # ragged tail
        dk, dv = _attn_bwd_dkdv_step(dk, dv, k, v, q_base, do_base, stride_qt, stride_dt, lse_base, delta_base, start_m,
                                     offs_n, cols, seq_len, qk_scale, True, BLOCK_M)
    dk *= sm_scale
    if ROPE:  # dk' -> dk, on the tile in registers
        dk = _unrope(dk, offs_n, cols, seq_len, C_ptr, S_ptr, BLOCK_N, HEAD_DIM)
    out = b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gt + cols[None, :]
    tl.store(DK_ptr + out, dk.to(DK_ptr.dtype.element_ty), mask=nmask)
    tl.store(DV_ptr + out, dv.to(DV_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _attn_bwd_dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, cols,
                      seq_len, qk_scale, MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    nmask = (offs_n < seq_len)[:, None]
    k = tl.load(k_base + offs_n[:, None] * stride_kt + cols[None, :], mask=nmask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + cols[None, :], mask=nmask, other=0.0)
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    if MASK:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, DQ_ptr, LSE_ptr, DELTA_ptr, C_ptr, S_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_db, stride_dh, stride_dt, stride_gb, stride_gh, stride_gt,
    n_heads, seq_len, qk_scale, sm_scale,
    ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per query block: dq accumulates over the key blocks it sees (j <= i).
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    rmask = offs_m < seq_len
    q = tl.load(Q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + cols[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(DO_ptr + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + cols[None, :], mask=rmask[:, None], other=0.0)
    # Rows past the end get lse = +inf, so their p is 0 and nothing there can overflow.
    lse = tl.load(LSE_ptr + bh.to(tl.int64) * seq_len + offs_m, mask=rmask, other=float("inf"))
    delta = tl.load(DELTA_ptr + bh.to(tl.int64) * seq_len + offs_m, mask=rmask, other=0.0)
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start_n in range(0, start_m, BLOCK_N):
        dq = _attn_bwd_dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, cols,
                               seq_len, qk_scale, False, BLOCK_N)
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, seq_len), BLOCK_N):
        dq = _attn_bwd_dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, cols,
                               seq_len, qk_scale, True, BLOCK_N)
    dq *= sm_scale
    if ROPE:  # dq' -> dq, on the tile in registers
        dq = _unrope(dq, offs_m, cols, seq_len, C_ptr, S_ptr, BLOCK_M, HEAD_DIM)
    tl.store(DQ_ptr + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + cols[None, :],
             dq.to(DQ_ptr.dtype.element_ty), mask=rmask[:, None])

