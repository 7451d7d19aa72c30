"""RMSNorm, optionally fused with the residual add in front of it.

Forward, per row of C features: h = x, or fused h = residual + s * x (s = scale[k], 1 without
scale; computed in fp32, rounded once to the residual's dtype), then
    rstd = 1 / sqrt(mean(h^2) + eps),    y = h * rstd * w
Gradients, with h_hat = h * rstd, g = dy * w and g_h the total gradient at h:
    g_h = rstd * (g - h_hat * mean(g * h_hat))      (+ the gradient arriving at h itself, if fused)
    dw = sum over the rows that use w of dy * h_hat
    dx = g_h;   fused: dresidual = g_h, dx = s * g_h   (scale is a buffer: no gradient)
Weights: (C,) for one model, or (K, C) for K stacked trials while x is (K, ..., C), scale (K,)
(a (C,) weight takes a (1,) scale); each trial's rows use only their own weight row and scale,
so trials never mix. Statistics in fp32 whatever the storage dtype; y and h in the residual's
dtype when fused (x's without), dx in x's, dresidual in the residual's, dw in w's.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Launch heuristics: fixed numbers, no autotuning (the same launches every run, graph-capturable).
# Chosen on an H100 with `python -m windtunnel.kernels.tune rms_norm` (each phase as a CUDA graph,
# bf16 x (1 | 16, 8192, 256 | 512)): no one setting is best at every shape; these are within 4% of
# the best at each.
FWD_TILE = 2048  # forward elements per program: rows per program = FWD_TILE // next_pow2(C), 1 to 64
BWD_TILE = 2048  # backward elements per step of a program's row loop, likewise
# warps = tile // (32 * elements per thread), 1 to 16; None: C / 32, a warp per row, the best forward
# at C = 256 (by 7% at one trial) and at C = 512 on an H200 (results/bench/rms_norm_tune_h200.log)
FWD_ELEMS_PER_THREAD = None
BWD_ELEMS_PER_THREAD = 32  # likewise in the backward: fewer warps, cheaper dw reduction
BWD_PROGRAMS_PER_SM = 2  # backward programs per SM at least: each ends in a costly dw reduction + atomic add
BWD_MAX_STEPS = 16  # more backward programs when each would walk more row blocks than this
BWD_STAGES = 3  # software-pipelining depth of the backward's row loop (num_stages)


def _per_trial(t, x):
    """A (K, ...) tensor viewed to broadcast against x (K, ..., C) ((1, ...) broadcasts anyway)."""
    return t.view(t.shape[0], *([1] * (x.dim() - t.dim())), *t.shape[1:])


def rms_norm_reference(x, weight, eps, residual=None, scale=None):
    """Pure PyTorch: y, or (y, h) with h = residual + scale * x. Computes in fp32 (fp64 stays fp64)."""
    _check(x, weight, residual, scale)
    if residual is not None:
        acc = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), torch.float32)
        branch = x.to(acc) if scale is None else _per_trial(scale.detach().to(acc), x) * x.to(acc)
        h = (residual.to(acc) + branch).to(residual.dtype)
        return rms_norm_reference(h, weight, eps), h
    acc = torch.promote_types(x.dtype, torch.float32)
    xf, w = x.to(acc), weight.to(acc)
    if weight.dim() == 2:
        w = _per_trial(w, x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w
    return y.to(x.dtype)


@triton.jit
def _rms_norm_fwd_kernel(
    Y_ptr, Y_row_stride, H_ptr, H_row_stride, X_ptr, X_row_stride, R_ptr, R_row_stride,
    W_ptr, W_row_stride, S_ptr, DW_ptr, n_rows, n_cols, rows_per_w, n_groups, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr, ZERO_DW: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    # BLOCK_ROWS rows per program: at C = 256 one row is too little work for a program.
    pid = tl.program_id(0)
    rows = (pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols < n_cols)[None, :]
    group = rows // rows_per_w
    x = tl.load(X_ptr + rows[:, None] * X_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R_ptr + rows[:, None] * R_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            x *= tl.load(S_ptr + group, mask=rmask, other=0.0).to(tl.float32)[:, None]
        # h is rounded to the residual's dtype before the norm, as the reference's is.
        h = (r + x).to(H_ptr.dtype.element_ty)
        tl.store(H_ptr + rows[:, None] * H_row_stride + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    w = tl.load(W_ptr + group[:, None] * W_row_stride + cols[None, :], mask=mask, other=0.0)
    y = x * rstd[:, None] * w.to(tl.float32)
    tl.store(Y_ptr + rows[:, None] * Y_row_stride + cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)
    # The backward adds into dw atomically; zeroing it here spares it a memset launch.
    if ZERO_DW:  # noqa: SIM102 (compile-time flag outside, run-time test inside)
        if pid < n_groups:
            tl.store(DW_ptr + pid * n_cols + cols, tl.zeros((BLOCK_SIZE,), tl.float32), mask=cols < n_cols)


@triton.jit
def _rms_norm_bwd_kernel(
    DX_ptr, DX_row_stride, DR_ptr, DR_row_stride, DY_ptr, DY_row_stride, DH_ptr, DH_row_stride,
    H_ptr, H_row_stride, W_ptr, W_row_stride, S_ptr, DW_ptr, rows_per_w, n_cols, eps,
    HAS_DH: tl.constexpr, HAS_DR: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # Grid (K, P): program (k, p) walks row blocks p, p + P, ... of trial k, so its dw partial
    # sum is trial k's alone; it adds it into dw[k] (fp32, zeroed by the forward) once, at the end.
    k = tl.program_id(0)
    p = tl.program_id(1)
    n_p = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_SIZE)
    cmask = cols < n_cols
    w = tl.load(W_ptr + k * W_row_stride + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_ROWS, BLOCK_SIZE), dtype=tl.float32)
    for start in tl.range(p * BLOCK_ROWS, rows_per_w, n_p * BLOCK_ROWS, num_stages=NUM_STAGES):
        local = start + tl.arange(0, BLOCK_ROWS)
        rows = k.to(tl.int64) * rows_per_w + local
        mask = (local < rows_per_w)[:, None] & cmask[None, :]
        x = tl.load(H_ptr + rows[:, None] * H_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + rows[:, None] * DY_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # rstd is recomputed rather than saved: the row is loaded anyway, so this costs one
        # reduction and spares a buffer and its round trip.
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        dh = (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None]) * rstd[:, None]
        if HAS_DH:
            dh += tl.load(DH_ptr + rows[:, None] * DH_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DR:  # the residual's gradient differs from x's (scaled, or another dtype)
            tl.store(DR_ptr + rows[:, None] * DR_row_stride + cols[None, :], dh.to(DR_ptr.dtype.element_ty), mask=mask)
        if HAS_SCALE:
            dh *= tl.load(S_ptr + k).to(tl.float32)
        tl.store(DX_ptr + rows[:, None] * DX_row_stride + cols[None, :], dh.to(DX_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.atomic_add(DW_ptr + k * n_cols + cols, tl.sum(dw, axis=0), mask=cmask, sem="relaxed")


def _config(n_cols, tile, elems_per_thread):
    """(BLOCK_SIZE, BLOCK_ROWS, num_warps) for rows of n_cols and about `tile` elements a step."""
    block = triton.next_power_of_2(n_cols)
    rows = max(1, min(64, tile // block))
    return block, rows, max(1, min(16, block * rows // (32 * elems_per_thread)))


def _as_rows(t, n_cols):
    t = t.reshape(-1, n_cols)
    return t if t.stride(-1) == 1 else t.contiguous()


def _groups(x, weight):
    if weight.dim() == 1:
        return 1
    if weight.dim() != 2 or x.dim() < 2 or x.shape[0] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be (C,) or (K, C) with x (K, ..., C), got x {tuple(x.shape)}")
    return weight.shape[0]


def _check(x, weight, residual, scale):
    """The argument checks both versions share; returns the number of weight rows K."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if scale is not None and residual is None:
        raise ValueError("rms_norm: scale needs residual (it scales x, the branch added to the residual)")
    n_groups = _groups(x, weight)
    if scale is not None and tuple(scale.shape) != (n_groups,):
        raise ValueError(f"rms_norm: scale {tuple(scale.shape)} must be ({n_groups},), one value per weight row")
    return n_groups


def rms_norm_forward(x, weight, eps, residual=None, scale=None, zero_dw=False):
    """Host wrapper: (y, h, dw) with y and h as row matrices (h is x itself without residual) and
    dw the backward's fp32 accumulator, shaped like weight, zeroed here (None unless zero_dw)."""
    n_cols = x.shape[-1]
    x2 = _as_rows(x, n_cols)
    n_rows = x2.shape[0]
    w2 = weight.reshape(-1, n_cols)
    n_groups = w2.shape[0]
    rows_per_w = max(1, n_rows // n_groups)
    if residual is not None:
        r2 = _as_rows(residual, n_cols)
        h = torch.empty_like(r2)
    else:
        r2 = h = x2
    y = torch.empty_like(h)
    dw = torch.empty(weight.shape, dtype=torch.float32, device=x.device) if zero_dw else None
    per_thread = FWD_ELEMS_PER_THREAD or max(1, triton.next_power_of_2(n_cols) // 32)
    block, block_rows, warps = _config(n_cols, FWD_TILE, per_thread)
    grid = max(triton.cdiv(n_rows, block_rows), n_groups if zero_dw else 1)  # program k zeroes dw[k]
    _rms_norm_fwd_kernel[(grid,)](
        y, y.stride(0), h, h.stride(0), x2, x2.stride(0), r2, r2.stride(0),
        w2, w2.stride(0), scale if scale is not None else w2, dw if zero_dw else w2,
        n_rows, n_cols, rows_per_w, n_groups, eps,
        HAS_RESIDUAL=residual is not None, HAS_SCALE=scale is not None, ZERO_DW=zero_dw,
        BLOCK_ROWS=block_rows, BLOCK_SIZE=block, num_warps=warps,
    )
    return y, h, dw


@functools.cache
def _sm_count(device):
    # the interpreter: 2, so that a few programs walk several row blocks and share a dw row
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def rms_norm_backward(dy, dh, h, weight, eps, scale=None, x_dtype=None, dw=None):
    """Host wrapper: (dx, dresidual, dw) from dy (and dh, the gradient at h when fused). dx is in
    x_dtype (h's by default); dresidual is dx itself unless scale or the dtypes set them apart
    (None when not fused); dw is accumulated into the given fp32 buffer, zeroed, or a new one."""
    n_cols = h.shape[-1]
    w2 = weight.reshape(-1, n_cols)
    n_groups = w2.shape[0]
    n_rows = h.shape[0]
    rows_per_w = n_rows // n_groups
    dy = _as_rows(dy, n_cols)
    dh = _as_rows(dh, n_cols) if dh is not None else None
    block, block_rows, warps = _config(n_cols, BWD_TILE, BWD_ELEMS_PER_THREAD)
    blocks = triton.cdiv(rows_per_w, block_rows)  # row blocks per trial
    n_p = max(1, min(blocks, max(_sm_count(h.device) * BWD_PROGRAMS_PER_SM // n_groups, triton.cdiv(blocks, BWD_MAX_STEPS))))
    dx = torch.empty((n_rows, n_cols), dtype=x_dtype or h.dtype, device=h.device)
    split = dh is not None and (scale is not None or dx.dtype != h.dtype)
    dr = torch.empty_like(h) if split else dx
    if dw is None:
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
    _rms_norm_bwd_kernel[(n_groups, n_p)](
        dx, dx.stride(0), dr, dr.stride(0), dy, dy.stride(0),
        dh if dh is not None else dy, (dh if dh is not None else dy).stride(0),
        h, h.stride(0), w2, w2.stride(0), scale if scale is not None else w2, dw, rows_per_w, n_cols, eps,
        HAS_DH=dh is not None, HAS_DR=split, HAS_SCALE=scale is not None,
        BLOCK_ROWS=block_rows, BLOCK_SIZE=block, NUM_STAGES=BWD_STAGES, num_warps=warps,
    )
    return dx, (dr if dh is not None else None), dw.to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Saved for backward: h (the normalised input; x itself without residual), w and scale.
    rstd is not saved: the backward reloads h and recomputes it for free (see the kernel)."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual, scale, need_dw):
        y, h, ctx.dw = rms_norm_forward(x, weight, eps, residual, scale, zero_dw=need_dw)
        ctx.save_for_backward(h, weight, scale)
        ctx.eps, ctx.shape, ctx.x_dtype, ctx.fused = eps, x.shape, x.dtype, residual is not None
        if residual is None:
            return y.view(x.shape)
        return y.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, scale = ctx.saved_tensors
        dw_buf, ctx.dw = ctx.dw, None  # used once: a second backward (retain_graph) zeroes its own
        if dy is None:
            dy = torch.zeros_like(h)
        dx, dr, dw = rms_norm_backward(dy, dh if ctx.fused else None, h, weight, ctx.eps, scale, ctx.x_dtype, dw_buf)
        return dx.view(ctx.shape), dw, None, (dr.view(ctx.shape) if ctx.fused else None), None, None


def rms_norm(x, weight, eps, residual=None, scale=None):
    """Triton RMSNorm: y, or (y, h = residual + scale * x) when residual is given (see module doc)."""
    _check(x, weight, residual, scale)
    scale = scale.contiguous() if scale is not None else None  # the kernels index it as scale[k]
    need_dw = weight.requires_grad and torch.is_grad_enabled()  # else the forward zeroes no dw buffer
    return RMSNormFunction.apply(x, weight, eps, residual, scale, need_dw)
