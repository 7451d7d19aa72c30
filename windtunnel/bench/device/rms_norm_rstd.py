"""Would the RMSNorm backward reach its copy's bandwidth at one trial if it read rstd (saved by the
forward, 4 bytes a row) instead of recomputing it? One row reduction fewer on each row block's
dependency chain, for 0.3% more bytes. Both backwards, CUDA-graph timed side by side in one process
over a small grid of launches, beside a copy of as many bytes.

    bash windtunnel/bench/device/gpu.sh py windtunnel/bench/device/rms_norm_rstd.py   # summary: results/bench/README.md
    TRITON_INTERPRET=1 python windtunnel/bench/device/rms_norm_rstd.py --check    # CPU: the variant's gradients
"""
import itertools
import sys

import torch
import triton
import triton.language as tl

from windtunnel.kernels import rms_norm as R


@triton.jit
def bwd_saved_rstd(DX, DY, H, W, RSTD, DW, rows_per_w, n_cols,
                   BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_STAGES: tl.constexpr):
    # the module's backward (plain form, no residual), with rstd loaded instead of recomputed
    k = tl.program_id(0)
    p = tl.program_id(1)
    n_p = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_SIZE)
    cmask = cols < n_cols
    w = tl.load(W + k * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_ROWS, BLOCK_SIZE), dtype=tl.float32)
    for start in tl.range(p * BLOCK_ROWS, rows_per_w, n_p * BLOCK_ROWS, num_stages=NUM_STAGES):
        local = start + tl.arange(0, BLOCK_ROWS)
        rows = k.to(tl.int64) * rows_per_w + local
        rmask = local < rows_per_w
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(H + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        dh = (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * n_cols + cols[None, :], dh.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.atomic_add(DW + k * n_cols + cols, tl.sum(dw, axis=0), mask=cmask, sem="relaxed")


def saved_rstd_backward(dy, h, w, rstd, dw, tile, elems, per_sm, stages, sms):
    n_rows, C = h.shape
    K = w.shape[0]
    rows_per_w = n_rows // K
    block, block_rows, warps = R._config(C, tile, elems)
    blocks = triton.cdiv(rows_per_w, block_rows)
    n_p = max(1, min(blocks, max(sms * per_sm // K, triton.cdiv(blocks, R.BWD_MAX_STEPS))))
    dx = torch.empty_like(h)
    bwd_saved_rstd[(K, n_p)](dx, dy, h, w, rstd, dw, rows_per_w, C, BLOCK_ROWS=block_rows, BLOCK_SIZE=block,
                             NUM_STAGES=stages, num_warps=warps)
    return dx, dw


def inputs(K, N, C, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(K * N, C, device=device, dtype=dtype, generator=g)
    dy = torch.randn(K * N, C, device=device, dtype=dtype, generator=g)
    w = torch.rand(K, C, device=device, generator=g) + 0.5
    rstd = torch.rsqrt(h.float().pow(2).mean(-1) + 1e-6)
    return h, dy, w, rstd


def check():
    h, dy, w, rstd = inputs(3, 20, 48, "cpu", torch.float32)
    dx_ref, _, dw_ref = R.rms_norm_backward(dy, None, h, w, 1e-6)
    dx, dw = saved_rstd_backward(dy, h, w, rstd, torch.zeros_like(w), 256, 8, 1, 2, sms=2)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref)
    print("saved-rstd backward matches the module's")


def main():
    from triton.testing import do_bench_cudagraph

    def ms(fn):
        return do_bench_cudagraph(fn, rep=200)

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(0))
    for K, N, C in [(1, 8192, 256), (1, 8192, 512), (16, 8192, 256)]:
        h, dy, w, rstd = inputs(K, N, C, "cuda", torch.bfloat16)
        n_bytes = 3 * h.numel() * h.element_size()  # h, dy in; dx out (w, dw, rstd: < 0.5%)
        src = torch.empty(n_bytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy = ms(lambda: dst.copy_(src))
        dw = torch.zeros_like(w)  # given to both, as the forward's zeroed buffer is in the model: no memset timed
        cur = ms(lambda: R.rms_norm_backward(dy, None, h, w, 1e-6, dw=dw))
        print(f"\nx ({K}, {N}, {C}) bf16 backward: copy of as many bytes {copy * 1e3:.1f} us; "
              f"the module's (recomputes rstd) {cur * 1e3:.1f} us = {copy / cur:.1%} of copy")
        rows = []
        for tile, elems, per_sm, stages in itertools.product((1024, 2048, 4096), (16, 32), (1, 2, 4), (2, 3)):
            t = ms(lambda: saved_rstd_backward(dy, h, w, rstd, dw, tile, elems, per_sm, stages, sms))
            rows.append((t, dict(tile=tile, elems=elems, per_sm=per_sm, stages=stages)))
        same = dict(tile=R.BWD_TILE, elems=R.BWD_ELEMS_PER_THREAD, per_sm=R.BWD_PROGRAMS_PER_SM, stages=R.BWD_STAGES)
        for t, cfg in sorted(rows, key=lambda r: r[0])[:5] + [r for r in rows if r[1] == same]:
            print(f"  saved rstd {t * 1e3:6.1f} us  {copy / t:6.1%} of copy  {cfg}{'  (the module’s launch)' if cfg == same else ''}")


if __name__ == "__main__":
    check() if "--check" in sys.argv else main()
