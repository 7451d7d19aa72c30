"""SwiGLU's gating: y = silu(gate) * up, elementwise, in one pass each way.

Forward:  s = sigmoid(gate),  y = gate * s * up
Gradients: dup = dy * gate * s,  dgate = dy * up * s * (1 + gate * (1 - s))
Saved for backward: gate and up (the inputs autograd would keep anyway); s is recomputed,
which is free in a memory-bound kernel. Math in fp32, storage in the inputs' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def swiglu_reference(gate, up):
    """Pure PyTorch silu(gate) * up (the activation in fp32, fp64 stays fp64)."""
    acc = torch.promote_types(gate.dtype, torch.float32)
    return (torch.nn.functional.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


@triton.jit
def _swiglu_fwd_kernel(Y_ptr, G_ptr, U_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y_ptr + offs, (g * tl.sigmoid(g) * u).to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DG_ptr, DU_ptr, DY_ptr, G_ptr, U_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    dy = tl.load(DY_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DU_ptr + offs, (dy * g * s).to(DU_ptr.dtype.element_ty), mask=mask)
    tl.store(DG_ptr + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG_ptr.dtype.element_ty), mask=mask)


_BLOCK = 4096  # 8 warps x 32 threads x 16 elements: several 16-byte loads in flight per thread


def swiglu_forward(gate, up):
    y = torch.empty_like(gate)
    n = gate.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](y, gate, up, n, BLOCK_SIZE=_BLOCK, num_warps=8)
    return y


def swiglu_backward(dy, gate, up):
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dg, du, dy.contiguous(), gate, up, n, BLOCK_SIZE=_BLOCK, num_warps=8)
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    """Saved for backward: gate and up (see the module doc)."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dy, gate, up)


def swiglu(gate, up):
    """Triton silu(gate) * up; gate and up of one shape and dtype, any leading dims."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    return SwiGLUFunction.apply(gate, up)
