"""The token embedding of K stacked trials, scaled per trial and cast, in one pass each way.

idx (K, N) token ids, weight (K, V, C), scale (K,) (μP's embedding multiplier, a buffer: no
gradient); math in fp32, out in `dtype` (by default the weight's and scale's promoted dtype):
    out[k, n] = (weight[k, idx[k, n]] * scale[k]).to(dtype)
    dweight[k, v] = sum over n with idx[k, n] = v of dout[k, n] * scale[k]    (summed in fp32,
                                                                               the weight's dtype)
PyTorch's form is a gather in the weight's dtype, a multiply and a cast forward, and a cast, a
multiply and a sorted segment-sum backward: six passes over (K, N, C) where these kernels make
one each. The backward adds rows into the zeroed fp32 gradient with atomics, so the order of a
repeated token's additions varies between runs (as the RMSNorm weight gradient's does).
Ids are trusted (the trainer checks the data's vocabulary against the model's); one outside
[0, V) reads a zero row and adds nothing, rather than touching another row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def embedding_reference(idx, weight, scale, dtype=None):
    """Pure PyTorch: one lookup for all trials (trial k's table is rows [k·V, (k+1)·V) of the
    flattened weight), then the per-trial scale, then the cast. An id outside [0, V) reads row 0
    of its own trial's table, zeroed by the scale, as the kernel's zero row (never another trial's)."""
    K, V, C = weight.shape
    offsets = (torch.arange(K, device=idx.device) * V).view(K, 1)
    in_table = (idx >= 0) & (idx < V)
    x = torch.nn.functional.embedding(torch.where(in_table, idx, 0) + offsets, weight.reshape(K * V, C))
    s = scale.detach().view(K, 1, 1) * in_table[..., None]  # the scale is a buffer: no gradient
    return (x * s).to(dtype or torch.promote_types(weight.dtype, scale.dtype))


# A program owns BLOCK_R rows of out (one token each) across all C columns; rows of one program
# may belong to two trials (k = row // N).
@triton.jit
def _token_rows(IDX_ptr, S_ptr, n_rows, N, V, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's rows of out, their columns, each row's table row k·V + token and trial
    scale, and the masks of the rows that exist and of the elements whose token is in the table."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < n_rows
    k = rows // N
    tok = tl.load(IDX_ptr + rows, mask=rmask, other=0).to(tl.int64)
    s = tl.load(S_ptr + k, mask=rmask, other=0.0).to(tl.float32)
    out_mask = rmask[:, None] & (cols < C)[None, :]
    in_table = out_mask & ((tok >= 0) & (tok < V))[:, None]
    return rows, cols, k * V + tok, s, out_mask, in_table


@triton.jit
def _embedding_fwd_kernel(OUT_ptr, IDX_ptr, W_ptr, S_ptr, n_rows, N, V, C,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, cols, table_row, s, out_mask, in_table = _token_rows(IDX_ptr, S_ptr, n_rows, N, V, C, BLOCK_R, BLOCK_C)
    w = tl.load(W_ptr + table_row[:, None] * C + cols[None, :], mask=in_table, other=0.0).to(tl.float32)
    tl.store(OUT_ptr + rows[:, None] * C + cols[None, :], (w * s[:, None]).to(OUT_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _embedding_bwd_kernel(DW_ptr, DOUT_ptr, IDX_ptr, S_ptr, n_rows, N, V, C,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, cols, table_row, s, out_mask, in_table = _token_rows(IDX_ptr, S_ptr, n_rows, N, V, C, BLOCK_R, BLOCK_C)
    g = tl.load(DOUT_ptr + rows[:, None] * C + cols[None, :], mask=in_table, other=0.0).to(tl.float32)
    tl.atomic_add(DW_ptr + table_row[:, None] * C + cols[None, :], g * s[:, None], mask=in_table, sem="relaxed")


_TILE = 4096  # elements per program: rows of C columns, 8 warps


def _launch(n_rows, C):
    block_c = triton.next_power_of_2(C)
    block_r = max(1, _TILE // block_c)
    return (triton.cdiv(n_rows, block_r),), dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)


class EmbeddingFunction(torch.autograd.Function):
    """Saved for backward: idx and scale (the weight itself is not needed)."""

    @staticmethod
    def forward(ctx, idx, weight, scale, dtype):
        K, V, C = weight.shape
        idx, scale = idx.contiguous(), scale.contiguous()
        out = torch.empty((*idx.shape, C), dtype=dtype, device=weight.device)
        grid, meta = _launch(idx.numel(), C)
        _embedding_fwd_kernel[grid](out, idx, weight.contiguous(), scale, idx.numel(), idx.shape[1], V, C, **meta)
        ctx.save_for_backward(idx, scale)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        idx, scale = ctx.saved_tensors
        K, V, C = ctx.weight_shape
        dw = torch.zeros((K, V, C), dtype=torch.float32, device=dout.device)
        grid, meta = _launch(idx.numel(), C)
        _embedding_bwd_kernel[grid](dw, dout.contiguous(), idx, scale, idx.numel(), idx.shape[1], V, C, **meta)
        return None, dw.to(ctx.weight_dtype), None, None


def embedding(idx, weight, scale, dtype=None):
    """Triton scaled embedding of stacked trials: (K, N) ids -> (K, N, C) (see module doc)."""
    if weight.dim() != 3 or idx.dim() != 2 or idx.shape[0] != weight.shape[0] or tuple(scale.shape) != (weight.shape[0],):
        raise ValueError(f"embedding: idx (K, N), weight (K, V, C) and scale (K,) expected, got "
                         f"{tuple(idx.shape)}, {tuple(weight.shape)}, {tuple(scale.shape)}")
    return EmbeddingFunction.apply(idx, weight, scale, dtype or torch.promote_types(weight.dtype, scale.dtype))
