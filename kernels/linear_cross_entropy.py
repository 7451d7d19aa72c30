"""LM head + cross-entropy for K stacked trials, never holding all N rows' fp32 logits.

h (K, N, C), weight (K, V, C), targets (K, N), logit_scale s (a float or one per trial, (K,)):
    z = s * (h @ weight^T)              (K, N, V), μP's output multiplier folded in
    loss_k = mean_n [ logsumexp(z_kn) - z_kn[target_kn] ]          -> shape (K,), fp32
Gradients (targets and s get none), with P = softmax(z) and Y the one-hot targets:
    dL_k/dlogits_kn = s * (P_kn - Y_kn) / N
    grad_h_k = (dL/dlogits)_k @ weight_k,    grad_weight_k = (dL/dlogits)_k^T @ h_k
Each trial's loss and gradients come from its own slice only: a NaN in trial 0 stays there.

The Triton version (Liger-Kernel's fused linear cross-entropy, batched over trials): rows go in
chunks; per chunk, torch computes the logits (K, n, V) in the input dtype, one Triton program per
row computes its loss in fp32 and overwrites the row with its logit gradient, and grad_h /
grad_weight take that chunk's share by two batched matmuls (grad_weight accumulates in fp32).
So the gradients are computed in the forward pass and saved for backward (grad_h and
grad_weight: the logits exist only then); the backward only scales them by each trial's
incoming gradient. Peak memory: one chunk of logits plus h- and weight-sized buffers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def _scales(logit_scale, K, device):
    if isinstance(logit_scale, torch.Tensor):
        s = logit_scale.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if s.numel() == 1:
            s = s.expand(K)
        if s.numel() != K:
            raise ValueError(f"linear_cross_entropy: logit_scale must be a float or ({K},), got {tuple(logit_scale.shape)}")
        return s.contiguous()
    return torch.full((K,), float(logit_scale), dtype=torch.float32, device=device)


def linear_cross_entropy_reference(h, weight, targets, logit_scale):
    """Pure PyTorch, unfused: the (K, N, V) logits in full; per-trial mean loss (K,) in fp32."""
    K, N, _ = h.shape
    acc = torch.promote_types(h.dtype, torch.float32)
    scale = _scales(logit_scale, K, h.device).to(acc)
    logits = torch.bmm(h, weight.transpose(1, 2)).to(acc) * scale[:, None, None]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return loss.view(K, N).mean(1).float()


@triton.jit
def _cross_entropy_kernel(
    Z_ptr, Z_row_stride, T_ptr, T_row_stride, LOSS_ptr, LOSS_row_stride, SCALE_ptr,
    rows_per_trial, n_cols, grad_scale,
    HAS_GRAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, L2_HINTS: tl.constexpr,
):
    # One program per row of a (K, n, V) logits chunk; row = trial * n + i.
    row = tl.program_id(0).to(tl.int64)
    trial = row // rows_per_trial
    i = row % rows_per_trial
    scale = tl.load(SCALE_ptr + trial)
    target = tl.load(T_ptr + trial * T_row_stride + i)
    z_row = Z_ptr + row * Z_row_stride
    # Pass 1: online max and sum of exp over the row (fp32, whatever the storage dtype).
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        if L2_HINTS:  # keep the row in L2 for pass 2
            z = tl.load(z_row + cols, mask=cols < n_cols, other=0.0, eviction_policy="evict_last")
        else:
            z = tl.load(z_row + cols, mask=cols < n_cols, other=0.0)
        z = tl.where(cols < n_cols, z.to(tl.float32) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    z_target = tl.load(z_row + target).to(tl.float32) * scale  # read before the row is overwritten
    tl.store(LOSS_ptr + trial * LOSS_row_stride + i, lse - z_target)
    if HAS_GRAD:
        # Pass 2: the row becomes its logit gradient s * (softmax - onehot) / N, in place. The
        # second read comes from L2 (the program just read the row). Keeping the row in registers
        # to read it once was measured slower on an H100 (CE kernel 2.46 vs 2.13 ms a K=64 chunk).
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            z = tl.load(z_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32) * scale
            g = (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)) * (scale * grad_scale)
            if L2_HINTS:  # the gradient is read next by the matmuls, not by this kernel
                tl.store(z_row + cols, g.to(Z_ptr.dtype.element_ty), mask=cols < n_cols, eviction_policy="evict_first")
            else:
                tl.store(z_row + cols, g.to(Z_ptr.dtype.element_ty), mask=cols < n_cols)


# Rows per chunk: as many as fit CHUNK_LOGITS logits (K * n * V; 2^26 bf16 logits are 128 MiB,
# 4096 rows at V = 16384), but at least MIN_CHUNK_ROWS per trial, so a stacked population still
# gets matmuls big enough to run near full speed, and grad_weight (fp32, read and written once a
# chunk) is not re-accumulated too often: 2048 rows trained 1.6% faster than 1024 for 8% more
# memory, 4096 only 0.5% more for 15% more (results/bench/README.md#ce-chunk).
CHUNK_LOGITS = 1 << 26
MIN_CHUNK_ROWS = 2048
# Launch constants of the CE kernel (fixed, so a CUDA graph records the same launch every run):
# the widest block of a row one program loads at a time, its warps, and whether its loads and
# stores carry L2 eviction hints. Chosen on an H200 with `python -m windtunnel.kernels.tune
# cross_entropy` (results/bench/ce_tune_h200.log): small programs looping over the row keep more
# rows in flight per SM; 1.5x faster than one 16-warp program holding the whole row (16384, 16,
# no hints) on each chunk of the K = 1, 16 and 64 reference shapes, 74-81% of a copy's bandwidth.
MAX_BLOCK = 4096
CE_WARPS = 4
CE_L2_HINTS = True


_MIXED_BADDBMM = [True]  # bf16 x bf16 -> fp32 baddbmm (CUDA, torch >= 2.8); cleared if missing


def _accumulate_grad_weight(grad_w, g_t, h_chunk):
    """grad_w (fp32) += g_t @ h_chunk, from low-precision operands without a full-size temp."""
    if g_t.dtype == grad_w.dtype:
        grad_w.baddbmm_(g_t, h_chunk)
        return
    if grad_w.device.type == "cuda" and _MIXED_BADDBMM[0]:
        try:
            torch.baddbmm(grad_w, g_t, h_chunk, out_dtype=torch.float32, out=grad_w)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _MIXED_BADDBMM[0] = False
    grad_w += torch.bmm(g_t, h_chunk)  # a low-precision temp, added into fp32


def linear_cross_entropy_forward(h, weight, targets, scales, need_grad, chunk_logits=None):
    K, N, C = h.shape
    V = weight.shape[1]
    n = max(1, min(N, max((chunk_logits or CHUNK_LOGITS) // max(1, K * V), MIN_CHUNK_ROWS)))
    loss = torch.empty((K, N), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_grad else None
    grad_w = torch.zeros((K, V, C), dtype=torch.float32, device=h.device) if need_grad else None
    w_t = weight.transpose(1, 2)
    block = min(triton.next_power_of_2(V), MAX_BLOCK)
    for start in range(0, N, n):
        end = min(start + n, N)
        h_chunk = h[:, start:end]
        z = torch.bmm(h_chunk, w_t)  # (K, n, V) in the input dtype: the only logits alive
        t_chunk = targets[:, start:end]
        l_chunk = loss[:, start:end]
        _cross_entropy_kernel[(K * (end - start),)](
            z, z.stride(1), t_chunk, t_chunk.stride(0), l_chunk, l_chunk.stride(0), scales,
            end - start, V, 1.0 / N, HAS_GRAD=need_grad, BLOCK_SIZE=block, L2_HINTS=CE_L2_HINTS, num_warps=CE_WARPS,
        )
        if need_grad:
            torch.bmm(z, weight, out=grad_h[:, start:end])  # into the slice: no temp and copy
            _accumulate_grad_weight(grad_w, z.transpose(1, 2), h_chunk)
    return loss.mean(1), grad_h, grad_w


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Saved for backward: grad_h and grad_weight, already computed in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, targets, logit_scale, need_grad):
        scales = _scales(logit_scale, h.shape[0], h.device)
        # Under autocast the matmuls run in its dtype (fp32 params, bf16 logits); the cast is
        # made once here so every matmul below sees one dtype.
        dev = h.device.type
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        with torch.autocast(dev, enabled=False):
            loss, grad_h, grad_w = linear_cross_entropy_forward(
                h.to(mm_dtype), weight.to(mm_dtype), targets.contiguous(), scales, need_grad)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        go = grad_loss.float()[:, None, None]  # one scale per trial: trials stay apart
        # autograd casts grad_h to h's dtype where autocast made them differ
        return (grad_h * go).to(grad_h.dtype), (grad_w * go).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(h, weight, targets, logit_scale):
    """Triton fused LM head + cross-entropy: per-trial mean loss (K,) in fp32 (see module doc)."""
    if h.dim() != 3 or weight.dim() != 3 or h.shape[0] != weight.shape[0] or h.shape[2] != weight.shape[2]:
        raise ValueError(f"linear_cross_entropy: h (K, N, C) and weight (K, V, C) expected, got {tuple(h.shape)}, {tuple(weight.shape)}")
    if targets.shape != h.shape[:2]:
        raise ValueError(f"linear_cross_entropy: targets must be (K, N) = {tuple(h.shape[:2])}, got {tuple(targets.shape)}")
    # ctx.needs_input_grad stays True under no_grad: ask autograd's mode, or evaluation would make
    # (and drop) every gradient: two more GEMMs a chunk and a (K, V, C) fp32 buffer
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return LinearCrossEntropyFunction.apply(h, weight, targets, logit_scale, need_grad)
