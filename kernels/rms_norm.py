"""RMSNorm, optionally fused with the residual add in front of it.

Forward, per row h of C features (h = x, or h = x + residual when fused):
    rstd = 1 / sqrt(mean(h^2) + eps),    y = h * rstd * w
Gradients, with h_hat = h * rstd and g = dy * w:
    dh = rstd * (g - h_hat * mean(g * h_hat))      (+ the gradient arriving at h itself, if fused)
    dw = sum over the rows that use w of dy * h_hat
    dx = dresidual = dh                            (fused: h = x + residual)
Weights: (C,) for one model, or (K, C) for K stacked trials while x is (K, ..., C); each trial's
rows use only their own weight row, so trials never mix.
Statistics in fp32 whatever the storage dtype; outputs in x's dtype, dw in w's dtype.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def rms_norm_reference(x, weight, eps, residual=None):
    """Pure PyTorch: y, or (y, h) with h = x + residual. Computes in fp32 (fp64 stays fp64)."""
    if residual is not None:
        h = x + residual
        return rms_norm_reference(h, weight, eps), h
    acc = torch.promote_types(x.dtype, torch.float32)
    xf, w = x.to(acc), weight.to(acc)
    if weight.dim() == 2:  # (K, C) against x (K, ..., C)
        w = w.view(w.shape[0], *([1] * (x.dim() - 2)), w.shape[1])
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w
    return y.to(x.dtype)


@triton.jit
def _rms_norm_fwd_kernel(
    Y_ptr, Y_row_stride, H_ptr, H_row_stride, X_ptr, X_row_stride, R_ptr, R_row_stride,
    W_ptr, W_row_stride, n_rows, n_cols, rows_per_w, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    # BLOCK_ROWS rows per program: at C = 256 one row is too little work for a program.
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X_ptr + rows[:, None] * X_row_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R_ptr + rows[:, None] * R_row_stride + cols[None, :], mask=mask, other=0.0)
        # h is rounded to the storage dtype before the norm, as the reference's x + residual is.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(H_ptr.dtype.element_ty)
        tl.store(H_ptr + rows[:, None] * H_row_stride + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    w = tl.load(W_ptr + (rows // rows_per_w)[:, None] * W_row_stride + cols[None, :], mask=mask, other=0.0)
    y = x * rstd[:, None] * w.to(tl.float32)
    tl.store(Y_ptr + rows[:, None] * Y_row_stride + cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DX_ptr, DX_row_stride, DY_ptr, DY_row_stride, DH_ptr, DH_row_stride, X_ptr, X_row_stride,
    W_ptr, W_row_stride, DW_ptr, rows_per_w, n_cols, eps,
    HAS_DH: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    # Grid (K, P): program (k, p) walks row blocks p, p + P, ... of weight group k, so its dw
    # partial sum belongs to one group; the host sums the P partials of each group.
    k = tl.program_id(0)
    p = tl.program_id(1)
    n_p = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_SIZE)
    cmask = cols < n_cols
    w = tl.load(W_ptr + k * W_row_stride + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_ROWS, BLOCK_SIZE), dtype=tl.float32)
    for start in range(p * BLOCK_ROWS, rows_per_w, n_p * BLOCK_ROWS):
        local = start + tl.arange(0, BLOCK_ROWS)
        rows = k.to(tl.int64) * rows_per_w + local
        mask = (local < rows_per_w)[:, None] & cmask[None, :]
        x = tl.load(X_ptr + rows[:, None] * X_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + rows[:, None] * DY_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # rstd is recomputed rather than saved: the row is loaded anyway, so this costs one
        # reduction and spares a buffer and its round trip.
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        dx = (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH_ptr + rows[:, None] * DH_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX_ptr + rows[:, None] * DX_row_stride + cols[None, :], dx.to(DX_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_ptr + (k * n_p + p) * n_cols + cols, tl.sum(dw, axis=0), mask=cmask)




def _blocks(n_cols):
    block = triton.next_power_of_2(n_cols)
    # ~4K elements per tile keeps registers in check and gives each program real work.
    rows = max(1, min(64, 4096 // block))
    return block, rows, (4 if block * rows <= 2048 else 8)


def _as_rows(t, n_cols):
    t = t.reshape(-1, n_cols)
    return t if t.stride(-1) == 1 else t.contiguous()


def _groups(x, weight):
    if weight.dim() == 1:
        return 1
    if weight.dim() != 2 or x.dim() < 2 or x.shape[0] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be (C,) or (K, C) with x (K, ..., C), got x {tuple(x.shape)}")
    return weight.shape[0]


def rms_norm_forward(x, weight, eps, residual=None):
    """Host wrapper: returns (y, h) as row matrices (h is x itself without residual)."""
    n_cols = x.shape[-1]
    x2 = _as_rows(x, n_cols)
    n_rows = x2.shape[0]
    w2 = weight.reshape(-1, n_cols)
    rows_per_w = max(1, n_rows // w2.shape[0])
    y = torch.empty_like(x2)
    h = x2
    if residual is not None:
        r2 = _as_rows(residual, n_cols)
        h = torch.empty_like(x2)
    else:
        r2 = x2
    block, block_rows, warps = _blocks(n_cols)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        y, y.stride(0), h, h.stride(0), x2, x2.stride(0), r2, r2.stride(0),
        w2, w2.stride(0), n_rows, n_cols, rows_per_w, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows, BLOCK_SIZE=block, num_warps=warps,
    )
    return y, h


@functools.lru_cache(maxsize=None)
def _n_programs(device):
    # 4 programs per SM for the backward's row loop. Measured on an H100 (bench.py, K=16,
    # rms_norm fwd+bwd as a CUDA graph): 4 per SM 0.144 ms (d 256) / 0.265 ms (d 512);
    # 16 per SM 0.168 / 0.283 ms: more, smaller programs only add dw partial sums.
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return 4


def rms_norm_backward(dy, dh, h, weight, eps):
    """Host wrapper: (dx, dw) from dy (and dh, the gradient at h when fused)."""
    n_cols = h.shape[-1]
    w2 = weight.reshape(-1, n_cols)
    n_groups = w2.shape[0]
    n_rows = h.shape[0]
    rows_per_w = n_rows // n_groups
    dy = _as_rows(dy, n_cols)
    dh = _as_rows(dh, n_cols) if dh is not None else None
    block, block_rows, warps = _blocks(n_cols)
    n_p = max(1, min(triton.cdiv(rows_per_w, block_rows), _n_programs(h.device) // n_groups))
    dx = torch.empty_like(h)
    dw_part = torch.empty((n_groups, n_p, n_cols), dtype=torch.float32, device=h.device)
    _rms_norm_bwd_kernel[(n_groups, n_p)](
        dx, dx.stride(0), dy, dy.stride(0), dh if dh is not None else dy, (dh if dh is not None else dy).stride(0),
        h, h.stride(0), w2, w2.stride(0), dw_part, rows_per_w, n_cols, eps,
        HAS_DH=dh is not None, BLOCK_ROWS=block_rows, BLOCK_SIZE=block, num_warps=warps,
    )
    return dx, dw_part.sum(1).to(weight.dtype).view_as(weight)


class RMSNormFunction(torch.autograd.Function):
    """Saved for backward: h (the normalised input; x itself without residual) and w. rstd is
    not saved: the backward reloads h and recomputes it for free (see the kernel)."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        _groups(x, weight)
        y, h = rms_norm_forward(x, weight, eps, residual)
        ctx.save_for_backward(h, weight)
        ctx.eps, ctx.shape, ctx.fused = eps, x.shape, residual is not None
        if residual is None:
            return y.view(x.shape)
        return y.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h)
        dx, dw = rms_norm_backward(dy, dh if ctx.fused else None, h, weight, ctx.eps)
        dx = dx.view(ctx.shape)
        return dx, dw, None, (dx if ctx.fused else None)


def rms_norm(x, weight, eps, residual=None):
    """Triton RMSNorm: y, or (y, h = x + residual) when residual is given (see module doc)."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    return RMSNormFunction.apply(x, weight, eps, residual)
