"""SwiGLU's gating on the fused gate/up projection: y = silu(gate) * up, in one pass each way.

x (..., 2F) holds [gate | up], the output of one GEMM with the stacked (2F, C) weight: one GEMM
instead of two, and its input's gradient comes out of one dgrad GEMM instead of two summed by
autograd. y is (..., F).
Forward:  s = sigmoid(gate),  y = gate * s * up
Gradients: dup = dy * gate * s,  dgate = dy * up * s * (1 + gate * (1 - s)),  dx = [dgate | dup]
Saved for backward: x (the input autograd would keep anyway); s is recomputed, which is free in
a memory-bound kernel. Math in fp32, storage in the input's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def swiglu_reference(x):
    """Pure PyTorch silu(gate) * up with gate, up = x.chunk(2, -1) (fp32 math, fp64 stays fp64)."""
    gate, up = x.chunk(2, dim=-1)
    acc = torch.promote_types(x.dtype, torch.float32)
    return (torch.nn.functional.silu(gate.to(acc)) * up.to(acc)).to(x.dtype)


# One program per BLOCK elements of y, flat: y's element o sits in row o // F, and its gate and
# up in x at o + row·F and F further. F is a compile-time constant, so the division is a
# multiply and shifts. On an H200 this walk matched the old kernel on two separate tensors
# (same bytes), while 2-D tiles of x and row-owning programs were 3-15% slower
# (results/bench/README.md#swiglu-layouts).
@triton.jit
def _swiglu_fwd_kernel(Y_ptr, X_ptr, n_elements, F: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < n_elements
    x = X_ptr + o + (o // F) * F
    g = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x + F, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y_ptr + o, (g * tl.sigmoid(g) * u).to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DX_ptr, DY_ptr, X_ptr, n_elements, F: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < n_elements
    i = o + (o // F) * F  # gate's index in x (and dgate's in dx); up's is i + F
    g = tl.load(X_ptr + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X_ptr + i + F, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY_ptr + o, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DX_ptr + i, (dy * u * s * (1.0 + g * (1.0 - s))).to(DX_ptr.dtype.element_ty), mask=mask)
    tl.store(DX_ptr + i + F, (dy * g * s).to(DX_ptr.dtype.element_ty), mask=mask)


_BLOCK = 2048  # y elements per program, 8 warps: the best of 2048, 4096, 8192 in that log


def swiglu_forward(x):
    x = x.contiguous()
    F = x.shape[-1] // 2
    y = torch.empty((*x.shape[:-1], F), dtype=x.dtype, device=x.device)
    n = y.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](y, x, n, F=F, BLOCK=_BLOCK, num_warps=8)
    return y


def swiglu_backward(dy, x):
    x = x.contiguous()
    dx = torch.empty_like(x)
    n = dy.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dx, dy.contiguous(), x, n, F=x.shape[-1] // 2, BLOCK=_BLOCK, num_warps=8)
    return dx


class SwiGLUFunction(torch.autograd.Function):
    """Saved for backward: x (see the module doc)."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.save_for_backward(x)
        return swiglu_forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return swiglu_backward(dy, x)


def swiglu(x):
    """Triton silu(gate) * up on x (..., 2F) = [gate | up]; returns (..., F)."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"swiglu: x must be (..., 2F), [gate | up] on its last dim, got {tuple(x.shape)}")
    return SwiGLUFunction.apply(x)
