"""AdamW's update for K stacked trials, one pass over each parameter.

Each parameter p has a leading trial axis; trial k's slice uses its own scalars:
    g = grad * grad_scale[k]                         (per-trial gradient clipping, folded in)
    m = b1 * m + (1 - b1) * g,    v = b2 * v + (1 - b2) * g^2
    p = p * decay[k] - step_size[k] * m / (sqrt(v) * bc2_rsqrt + eps)
step_size already holds lr × μP multiplier / (1 - b1^t); decay = 1 - lr × μP multiplier × wd;
bc2_rsqrt = 1 / sqrt(1 - b2^t) is a 0-d device tensor, so a CUDA graph can replay the step.
PyTorch's unfused form reads and writes p, m and v in several passes with temporaries; the
kernel reads p, g, m, v once and writes p, m, v once (28 bytes per fp32 parameter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@torch.no_grad()
def adamw_reference(params, grads, exp_avgs, exp_avg_sqs, step_size, decay, grad_scale, bc2_rsqrt,
                    beta1: float, beta2: float, eps: float) -> None:
    """Pure PyTorch, in place. step_size, decay: (P, K); grad_scale: (K,); bc2_rsqrt: 0-d."""
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        shape = (-1,) + (1,) * (p.ndim - 1)
        g = g * grad_scale.view(shape)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() * bc2_rsqrt).add_(eps)
        p.mul_(decay[i].view(shape)).sub_(m / denom * step_size[i].view(shape))


@triton.jit
def _adamw_kernel(P_ptr, G_ptr, M_ptr, V_ptr, STEP_ptr, DECAY_ptr, GSCALE_ptr, BC2_ptr,
                  per_trial, beta1, beta2, eps, BLOCK_SIZE: tl.constexpr):
    # Grid (blocks of one trial's slice, trials): each program's scalars are its trial's.
    k = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < per_trial
    offs += k.to(tl.int64) * per_trial
    g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(GSCALE_ptr + k)
    m = tl.load(M_ptr + offs, mask=mask, other=0.0)
    v = tl.load(V_ptr + offs, mask=mask, other=0.0)
    p = tl.load(P_ptr + offs, mask=mask, other=0.0)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p * tl.load(DECAY_ptr + k) - tl.load(STEP_ptr + k) * m / (tl.sqrt(v) * tl.load(BC2_ptr) + eps)
    tl.store(M_ptr + offs, m, mask=mask)
    tl.store(V_ptr + offs, v, mask=mask)
    tl.store(P_ptr + offs, p, mask=mask)


_BLOCK = 2048  # 8 warps x 32 threads x 8 fp32: two 16-byte loads in flight per thread and stream


@torch.no_grad()
def adamw(params, grads, exp_avgs, exp_avg_sqs, step_size, decay, grad_scale, bc2_rsqrt,
          beta1: float, beta2: float, eps: float) -> None:
    """Triton, in place, one launch per parameter (same arguments as adamw_reference)."""
    step_size, decay = step_size.float().contiguous(), decay.float().contiguous()
    grad_scale, bc2_rsqrt = grad_scale.float().contiguous(), bc2_rsqrt.float().reshape(1)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if p.dtype != torch.float32 or not all(t.is_contiguous() for t in (p, g, m, v)):
            raise ValueError(f"adamw: parameter {i} must be contiguous fp32 with contiguous state and grad")
        K = p.shape[0]
        per_trial = p.numel() // K
        _adamw_kernel[(triton.cdiv(per_trial, _BLOCK), K)](
            p, g, m, v, step_size[i], decay[i], grad_scale, bc2_rsqrt, per_trial, beta1, beta2, eps,
            BLOCK_SIZE=_BLOCK, num_warps=8)
