"""Where does the one-trial RMSNorm backward's time go? The module's backward beside variants that
each leave one part out, every one a CUDA graph of one launch timed as kernels.md times it (L2
flushed between replays), beside a copy of as many bytes, over a grid of launches:

    full       the module's kernel (dx, and dw summed by one atomic add per program)
    partials   dw partial sums stored per program, not added atomically (a second pass would sum them)
    no_dw      dx only
    no_reduce  no row reductions (rstd = 1, no mean(g * x_hat) term), dw by atomics
    io         the same loads and stores, no arithmetic to speak of

    bash windtunnel/bench/device/gpu.sh py windtunnel/bench/device/rms_norm_bwd_parts.py   # summary: results/bench/README.md
    TRITON_INTERPRET=1 python windtunnel/bench/device/rms_norm_bwd_parts.py --check   # CPU: 'full' and 'partials' are the module's math
"""
import itertools
import sys

import torch
import triton
import triton.language as tl

from windtunnel.kernels import rms_norm as R

MODES = ("full", "partials", "no_dw", "no_reduce", "io")


@triton.jit
def bwd_part(DX, DY, H, W, DW, rows_per_w, n_cols, eps, MODE: tl.constexpr,
             BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_STAGES: tl.constexpr):
    # the module's backward (plain form, no residual, one trial), parts left out by MODE (see above)
    p = tl.program_id(0)
    n_p = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_SIZE)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_ROWS, BLOCK_SIZE), dtype=tl.float32)
    for start in tl.range(p * BLOCK_ROWS, rows_per_w, n_p * BLOCK_ROWS, num_stages=NUM_STAGES):
        rows = (start + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        mask = (rows < rows_per_w)[:, None] & cmask[None, :]
        x = tl.load(H + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        if MODE == 4:  # io
            dh = g + x
        elif MODE == 3:  # no_reduce
            dh = g - x
            dw += dy * x
        else:
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
            x_hat = x * rstd[:, None]
            dh = (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None]) * rstd[:, None]
            if MODE != 2:
                dw += dy * x_hat
        tl.store(DX + rows[:, None] * n_cols + cols[None, :], dh.to(DX.dtype.element_ty), mask=mask)
    if MODE == 0 or MODE == 3:
        tl.atomic_add(DW + cols, tl.sum(dw, axis=0), mask=cmask, sem="relaxed")
    if MODE == 1:
        tl.store(DW + p * n_cols + cols, tl.sum(dw, axis=0), mask=cmask)


def launch(mode, dy, h, w, dw, tile, elems, per_sm, stages, sms):
    n_rows, C = h.shape
    block, block_rows, warps = R._config(C, tile, elems)
    blocks = triton.cdiv(n_rows, block_rows)
    n_p = max(1, min(blocks, max(sms * per_sm, triton.cdiv(blocks, R.BWD_MAX_STEPS))))
    dx = torch.empty_like(h)
    bwd_part[(n_p,)](dx, dy, h, w, dw, n_rows, C, 1e-6, MODE=MODES.index(mode), BLOCK_ROWS=block_rows,
                     BLOCK_SIZE=block, NUM_STAGES=stages, num_warps=warps)
    return dx, dw, n_p


def inputs(N, C, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, C, device=device, dtype=dtype, generator=g)
    dy = torch.randn(N, C, device=device, dtype=dtype, generator=g)
    w = torch.rand(1, C, device=device, generator=g) + 0.5
    return h, dy, w


def check():
    h, dy, w = inputs(40, 48, "cpu", torch.float32)
    dx_ref, _, dw_ref = R.rms_norm_backward(dy, None, h, w, 1e-6)
    dx, dw, _ = launch("full", dy, h, w, torch.zeros_like(w), 256, 8, 1, 2, sms=2)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref)
    dx, parts, n_p = launch("partials", dy, h, w, torch.zeros(64, 48), 256, 8, 1, 2, sms=2)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(parts[:n_p].sum(0, keepdim=True), dw_ref)
    print("'full' and 'partials' match the module's backward")


def graph_us(fn):
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=10, rep=100, return_mode="median") * 1e3


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(0))
    for N, C in [(8192, 256), (8192, 512)]:
        h, dy, w = inputs(N, C, "cuda", torch.bfloat16)
        n_bytes = 3 * h.numel() * h.element_size()  # h, dy in; dx out
        src = torch.empty(n_bytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy = graph_us(lambda: dst.copy_(src))
        dw = torch.zeros(4096, C, device="cuda")  # room for every program's partial row
        mod = graph_us(lambda: R.rms_norm_backward(dy, None, h, w, 1e-6, dw=dw[:1]))
        print(f"\nx (1, {N}, {C}) bf16 backward, L2 flushed: copy of as many bytes {copy:.1f} us; "
              f"the module's {mod:.1f} us = {copy / mod:.1%} of copy")
        best = {}
        for mode, tile, elems, per_sm, stages in itertools.product(
                MODES, (1024, 2048, 4096), (16, 32), (1, 2, 4, 16), (3,)):
            cfg = dict(tile=tile, elems=elems, per_sm=per_sm, stages=stages)
            t = graph_us(lambda: launch(mode, dy, h, w, dw, **cfg, sms=sms))
            if cfg == dict(tile=R.BWD_TILE, elems=R.BWD_ELEMS_PER_THREAD, per_sm=R.BWD_PROGRAMS_PER_SM, stages=R.BWD_STAGES):
                best.setdefault(mode, []).append((t, {**cfg, "launch": "module's"}))
            best.setdefault(mode, []).append((t, cfg))
        for mode in MODES:
            rows = sorted(best[mode], key=lambda r: r[0])
            module = [r for r in rows if r[1].get("launch")]
            print(f"  {mode:9s} module's launch {module[0][0]:5.1f} us ({copy / module[0][0]:5.1%} of copy); "
                  f"best {rows[0][0]:5.1f} us ({copy / rows[0][0]:5.1%})  {rows[0][1]}")


if __name__ == "__main__":
    check() if "--check" in sys.argv else main()
