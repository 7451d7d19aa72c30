"""The model's batched linear layer for K stacked trials: y = x @ w^T per trial.

x (K, N, in), w (K, out, in) -> y (K, N, out), one batched GEMM for all trials. No Triton here:
cuBLAS does the matmuls; what this adds is control of the weight's layout and dtype around them.
Left to autocast, the fp32 weight is cast through its transposed view (a strided copy, ~3x
slower than a contiguous one) and its gradient comes back as a transposed bf16 tensor that is
cast to fp32 and copied again. `batched_linear` casts the weight contiguously once, and its
weight gradient is one GEMM (dy^T @ x) writing the weight's own dtype straight from cuBLAS.
That costs a Python autograd.Function per call, which only pays where the host is not the
bottleneck (a CUDA graph, a large population): the reference stays plain `torch.bmm`.
"""
from __future__ import annotations

import torch


def batched_linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Pure PyTorch (autocast applies as to any bmm)."""
    return torch.bmm(x, w.transpose(1, 2))


class BatchedLinearFunction(torch.autograd.Function):
    """Saved for backward: x and the weight in the compute dtype (what autocast would save)."""

    @staticmethod
    def forward(ctx, x, w):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(x.dtype, w.dtype)
        x, w_c = x.to(dtype), w.to(dtype)
        ctx.save_for_backward(x, w_c)
        ctx.w_dtype = w.dtype
        with torch.autocast(dev, enabled=False):
            return torch.bmm(x, w_c.transpose(1, 2))

    @staticmethod
    def backward(ctx, dy):
        x, w_c = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dx = torch.bmm(dy, w_c) if ctx.needs_input_grad[0] else None
        dw = _bmm_to(dy.transpose(1, 2), x, ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


_OUT_DTYPE = [True]  # torch.bmm(..., out_dtype=) on CUDA (torch >= 2.8); cleared if missing


def _bmm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `dtype`: straight from the GEMM on CUDA (bf16 x bf16 -> fp32), else cast after."""
    if a.dtype != dtype and a.device.type == "cuda" and _OUT_DTYPE[0]:
        try:
            return torch.bmm(a, b, out_dtype=dtype)
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE[0] = False
    return torch.bmm(a, b).to(dtype)


def batched_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (K, N, in) @ w (K, out, in)^T -> (K, N, out) (see module doc)."""
    if x.dim() != 3 or w.dim() != 3 or x.shape[0] != w.shape[0] or x.shape[2] != w.shape[2]:
        raise ValueError(f"batched_linear: x (K, N, in) and w (K, out, in) expected, got {tuple(x.shape)}, {tuple(w.shape)}")
    return BatchedLinearFunction.apply(x, w)
