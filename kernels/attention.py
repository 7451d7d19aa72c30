"""Causal flash attention (forward and backward) with RoPE fused: a pre-pass and the bwd epilogues.

q, k, v: (B, H, T, D), D in 32/64/128, any T. Scale 1/sqrt(D). With cos, sin (T, D):
    apply_rope(x) = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
    q' = apply_rope(q), k' = apply_rope(k)
Forward, per query row i (j <= i):
    s_ij = q'_i . k'_j / sqrt(D),  p_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij),  o_i = sum_j p_ij v_j
Gradients, with delta_i = do_i . o_i:
    dv_j = sum_i p_ij do_i,   ds_ij = p_ij (do_i . v_j - delta_i)
    dq'_i = sum_j ds_ij k'_j / sqrt(D),   dk'_j = sum_i ds_ij q'_i / sqrt(D)
    dq = dq' * cos - rotate_half(dq' * sin)   (rotate_half's transpose is -rotate_half; same for dk)
How RoPE is fused: one Triton pass writes q', k' (read q, k once, write once), the flash
kernels run on them, and the backward applies RoPE's transpose to dq', dk' in the epilogue of
the kernels that produce them, on tiles already in registers: no extra pass, no extra buffer.
Roping inside the flash kernels' inner loops instead re-ropes every K (and, backward, Q) tile
for every block that visits it; measured on an H100 it took fwd+bwd from 0.77 to 1.83 ms
(256 x 4 heads x 512 x 64, bf16), slower than this pre-pass (bench.py rows "rope fused").
The backward's kernels are in attention_bwd.py; this file launches them.
Saved for backward: q', k' (which replace q, k: same memory), v, o and the row log-sum-exp
(fp32, B*H*T floats). P is not saved: the backward recomputes it tile by tile, which costs
FLOPs but no (B, H, T, T) buffer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .attention_bwd import _attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel

HEAD_DIMS = (32, 64, 128)


def rope_cos_sin(T, D, theta=10000.0, device=None, dtype=torch.float32):
    """cos, sin of shape (T, D) for rotate-half RoPE: angle(t, j) = t * theta^(-2 (j mod D/2) / D)."""
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64, device=device) / D)
    angles = torch.arange(T, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x (..., T, D) with cos, sin (T, D) (or longer tables: the first T rows are used)."""
    T = x.shape[-2]
    cos, sin = cos[:T], sin[:T]
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def attention_reference(q, k, v, cos=None, sin=None):
    """Pure PyTorch: RoPE, then causal softmax(q k^T / sqrt(D)) v via SDPA (flash on CUDA)."""
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@triton.jit
def _rope_kernel(Q_ptr, K_ptr, QO_ptr, KO_ptr, C_ptr, S_ptr, stride_qb, stride_qh, stride_qt,
                 stride_kb, stride_kh, stride_kt, n_heads, seq_len, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    # Grid (T blocks, B*H, 2): axis 2 picks q or k, so one launch ropes both.
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    if tl.program_id(2) == 0:
        src = Q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt
        dst = QO_ptr
    else:
        src = K_ptr + b * stride_kb + h * stride_kh + rows[:, None] * stride_kt
        dst = KO_ptr
    cols = tl.arange(0, HEAD_DIM)
    # rotate_half(x)[j] = -x[j + D/2] (j < D/2), x[j - D/2] (j >= D/2): a second load of the
    # same cache lines with the halves swapped, instead of shuffling registers.
    rot = (cols + HEAD_DIM // 2) % HEAD_DIM
    sign = tl.where(cols < HEAD_DIM // 2, -1.0, 1.0)
    mask = (rows < seq_len)[:, None]
    x = tl.load(src + cols[None, :], mask=mask, other=0.0)
    x_rot = tl.load(src + rot[None, :], mask=mask, other=0.0).to(tl.float32) * sign[None, :]
    cs = rows[:, None] * HEAD_DIM + cols[None, :]
    c = tl.load(C_ptr + cs, mask=mask, other=0.0)
    s = tl.load(S_ptr + cs, mask=mask, other=0.0)
    y = x.to(tl.float32) * c + x_rot * s
    tl.store(dst + bh.to(tl.int64) * seq_len * HEAD_DIM + cs, y.to(x.dtype), mask=mask)


@triton.jit
def _attn_fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, cols, seq_len, qk_scale,
                   MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    nmask = (offs_n < seq_len)[:, None]
    k = tl.load(k_base + offs_n[:, None] * stride_kt + cols[None, :], mask=nmask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + cols[None, :], mask=nmask, other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units: exp2 below is exp of the scaled scores
    if MASK:  # only the diagonal blocks pay for the causal mask
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, LSE_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    n_heads, seq_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    rmask = offs_m < seq_len
    q = tl.load(Q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + cols[None, :],
                mask=rmask[:, None], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start_n in range(0, start_m, BLOCK_N):  # strictly below the diagonal: no mask
        acc, m_i, l_i = _attn_fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, cols,
                                       seq_len, qk_scale, False, BLOCK_N)
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, seq_len), BLOCK_N):
        acc, m_i, l_i = _attn_fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, cols,
                                       seq_len, qk_scale, True, BLOCK_N)
    # Every row sees at least key 0 (or itself), so l_i > 0 and m_i is finite.
    o = acc / l_i[:, None]
    tl.store(LSE_ptr + bh.to(tl.int64) * seq_len + offs_m, m_i + tl.math.log2(l_i), mask=rmask)
    tl.store(O_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + cols[None, :],
             o.to(O_ptr.dtype.element_ty), mask=rmask[:, None])


_LOG2E = 1.4426950408889634


# Launches per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages); for dkdv BLOCK_N is the key
# block a program owns and BLOCK_M the query block it steps by (BLOCK_N % BLOCK_M == 0; fwd and
# dq need BLOCK_M % BLOCK_N == 0). Chosen on an H100 with `python -m windtunnel.kernels.tune attention`.
CONFIGS = {
    64: dict(fwd=(64, 64, 4, 3), dkdv=(32, 64, 4, 3), dq=(64, 32, 4, 3)),  # head dims 32 and 64
    128: dict(fwd=(128, 64, 8, 2), dkdv=(32, 64, 8, 2), dq=(64, 32, 8, 2)),
}


def _config(head_dim):
    return CONFIGS[64 if head_dim <= 64 else 128]


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _rope_tables(cos, sin, T, D):
    if cos is None:
        return None, None
    if cos.shape[-1] != D or cos.shape[0] < T or sin.shape != cos.shape:
        raise ValueError(f"attention: cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} must be (T, D) = ({T}, {D})")
    return cos[:T].float().contiguous(), sin[:T].float().contiguous()


def rope_qk(q, k, cos, sin):
    """q', k' = apply_rope(q), apply_rope(k) in one Triton pass; contiguous (B, H, T, D)."""
    B, H, T, D = q.shape
    q_out, k_out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device), torch.empty((B, H, T, D), dtype=k.dtype, device=k.device)
    block_t = max(1, min(64, 4096 // D))
    _rope_kernel[(triton.cdiv(T, block_t), B * H, 2)](
        q, k, q_out, k_out, cos, sin, *_strides(q), *_strides(k), H, T, HEAD_DIM=D, BLOCK_T=block_t, num_warps=4)
    return q_out, k_out


def attention_forward(q, k, v, o=None):
    """o (B, H, T, D) and lse; o may be given, e.g. a strided view of a (B, T, H, D) buffer."""
    B, H, T, D = q.shape
    cfg = _config(D)
    if o is None:
        o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, T), dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = cfg["fwd"]
    _attn_fwd_kernel[(triton.cdiv(T, bm), B * H)](
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o), H, T, _LOG2E / math.sqrt(D),
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )
    return o, lse


def attention_backward(do, q, k, v, o, lse, cos, sin, grads=None):
    """Gradients to q, k, v; with cos/sin, q and k are the roped q', k' and dq, dk come out
    through RoPE's transpose. grads: (dq, dk, dv) to write, all with the same strides."""
    B, H, T, D = q.shape
    cfg = _config(D)
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(triton.cdiv(T, 64), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, T, HEAD_DIM=D, BLOCK_M=64)
    dq, dk, dv = grads or (torch.empty((B, H, T, D), dtype=t.dtype, device=t.device) for t in (q, k, v))
    rope = cos is not None
    c, s = (cos, sin) if rope else (q, q)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
              H, T, _LOG2E / math.sqrt(D), 1.0 / math.sqrt(D))
    bm, bn, warps, stages = cfg["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, bn), B * H)](
        q, k, v, do, dk, dv, lse, delta, c, s, *common,
        ROPE=rope, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    bm, bn, warps, stages = cfg["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](
        q, k, v, do, dq, lse, delta, c, s, *common,
        ROPE=rope, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """Saved for backward: q', k' (roped; q, k without RoPE), v, o, lse and the fp32 cos/sin."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        if cos is not None:
            q, k = rope_qk(q, k, cos, sin)
        o, lse = attention_forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse, cos, sin)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cos, sin = ctx.saved_tensors
        return (*attention_backward(do, q, k, v, o, lse, cos, sin), None, None)


def _check(q, k, v, cos, sin):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention: q, k, v must share one (B, H, T, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"attention: head dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    if (cos is None) != (sin is None):
        raise ValueError("attention: give both cos and sin, or neither")
    return _rope_tables(cos, sin, q.shape[2], q.shape[3])


def attention(q, k, v, cos=None, sin=None):
    """Triton causal attention, RoPE fused when cos/sin are given (see module doc)."""
    cos, sin = _check(q, k, v, cos, sin)
    return AttentionFunction.apply(q, k, v, cos, sin)


# -- the model's layout: one (B, T, 3, H, D) projection in, (B, T, H, D) out ---------------------
# q, k, v are strided views of the projection and o is written straight into (B, T, H, D), so
# neither direction copies between layouts: without this, splitting the projection's gradient
# (autograd stacks dq, dk, dv) and transposing o and dqkv cost three full passes per layer.

def _split(qkv):
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, T, D) views


def attention_qkv_reference(qkv, cos=None, sin=None):
    """Pure PyTorch: qkv (B, T, 3, H, D) -> (B, T, H, D) (attention_reference on its views)."""
    return attention_reference(*_split(qkv), cos, sin).transpose(1, 2)


class AttentionQKVFunction(torch.autograd.Function):
    """As AttentionFunction, with the projection's layout in and out (see above)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin):
        q, k, v = _split(qkv)
        if cos is not None:
            q, k = rope_qk(q, k, cos, sin)
        B, T, _, H, D = qkv.shape
        out = torch.empty((B, T, H, D), dtype=qkv.dtype, device=qkv.device)
        o, lse = attention_forward(q, k, v, out.transpose(1, 2))
        ctx.save_for_backward(q, k, v, o, lse, cos, sin)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, o, lse, cos, sin = ctx.saved_tensors
        dqkv = torch.empty((*dout.shape[:2], 3, *dout.shape[2:]), dtype=q.dtype, device=q.device)
        attention_backward(dout.transpose(1, 2), q, k, v, o, lse, cos, sin, grads=_split(dqkv))
        return dqkv, None, None


def attention_qkv(qkv, cos=None, sin=None):
    """Triton causal attention on the fused projection: qkv (B, T, 3, H, D) -> (B, T, H, D)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention_qkv: qkv must be (B, T, 3, H, D), got {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos, sin = _check(*_split(qkv), cos, sin)
    return AttentionQKVFunction.apply(qkv, cos, sin)
