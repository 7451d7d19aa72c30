"""Is fusing the step's elementwise passes into its GEMMs a way to 400 model TFLOP/s (issue #6)?

A population step at d 256, K = 64 spends ~54 ms in cuBLAS GEMMs and ~35 ms in passes that run
near HBM bandwidth (RMSNorm, SwiGLU, CE, AdamW, ...): fused into the GEMMs' prologues and
epilogues, those passes would stop moving their bytes. That needs GEMMs of our own (Triton);
this measures, side by side in one process on the step's own batched shapes (K = 64 trials,
8192 rows each, d 256, F 704, bf16, CUDA-graph replays, L2 flushed):
  1. each forward GEMM as cuBLAS (torch.bmm) and as a Triton batched GEMM (best of a small
     launch grid): what a GEMM of our own costs before any fusion;
  2. two fusions against the unfused pair they replace:
     rms_norm -> qkv GEMM        vs  the GEMM normalising its A tile (d = 256: a row is one K tile)
     gate_up GEMM -> swiglu      vs  the GEMM with two accumulators (gate, up) writing silu(g)*u
     (the fused SwiGLU also writes [gate | up], which the backward reads, so both forms keep
     the bytes the backward needs).

    bash windtunnel/bench/device/gpu.sh py windtunnel/bench/device/gemm_fusion.py   # summary: results/bench/README.md
"""
import math

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from windtunnel.kernels.rms_norm import rms_norm_forward
from windtunnel.kernels.swiglu import swiglu_forward

K, N, C, F = 64, 8192, 256, 704
EPS = 1e-6


@triton.jit
def _tile(M, Nn, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """This program's (row tile, column tile) in grouped order: programs near in time share A rows in L2."""
    pid = tl.program_id(0)
    n_n = tl.cdiv(Nn, BN)
    first_m = pid // (GROUP * n_n) * GROUP
    size = tl.minimum(tl.cdiv(M, BM) - first_m, GROUP)
    return first_m + (pid % (GROUP * n_n)) % size, (pid % (GROUP * n_n)) // size


@triton.jit
def _gemm(A, B, Cout, W, G, M, Nn, Kd, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn, sgb, sgm,
          NORM: tl.constexpr, SWIGLU: tl.constexpr, F_: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """C[b] = A[b] @ B[b] (A (M, Kd), B (Kd, Nn) by strides). NORM: A's rows RMS-normalised and
    scaled by W[b] first (BK == Kd: the whole row is one tile). SWIGLU: a second accumulator on
    B's columns + F_, writes silu(acc) * acc2 to Cout (M, F_) and [acc | acc2] to G (M, 2F_)."""
    pm, pn = _tile(M, Nn, BM, BN, GROUP)
    b = tl.program_id(1).to(tl.int64)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptr = A + b * sab + rm[:, None] * sam + rk[None, :] * sak
    b_ptr = B + b * sbb + rk[:, None] * sbk + rn[None, :] * sbn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, Kd, BK):
        a = tl.load(a_ptr)
        if NORM:
            af = a.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(af * af, 1) / Kd + 1e-6)
            w = tl.load(W + b * Kd + rk)
            a = (af * rstd[:, None] * w[None, :]).to(A.dtype.element_ty)
        acc = tl.dot(a, tl.load(b_ptr), acc)
        if SWIGLU:
            acc2 = tl.dot(a, tl.load(b_ptr + F_ * sbn), acc2)
        a_ptr += BK * sak
        b_ptr += BK * sbk
    if SWIGLU:
        gp = G + b * sgb + rm[:, None] * sgm + rn[None, :]
        tl.store(gp, acc.to(G.dtype.element_ty))
        tl.store(gp + F_, acc2.to(G.dtype.element_ty))
        y = acc * tl.sigmoid(acc) * acc2
        tl.store(Cout + b * scb + rm[:, None] * scm + rn[None, :] * scn, y.to(Cout.dtype.element_ty),
                 mask=(rn < F_)[None, :])
    else:
        tl.store(Cout + b * scb + rm[:, None] * scm + rn[None, :] * scn, acc.to(Cout.dtype.element_ty))


@triton.jit
def _gemm_tma(A, B, Cout, G, M, Nn, Kd, SWIGLU: tl.constexpr, F_: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """As _gemm (no NORM), its tiles moved by TMA: A, B, C seen as 2-D (trials x rows, cols)."""
    pm, pn = _tile(M, Nn, BM, BN, GROUP)
    b = tl.program_id(1)
    n_b = tl.num_programs(1)
    n_w = 2 * Nn if SWIGLU else Nn
    a_d = tl.make_tensor_descriptor(A, shape=[n_b * M, Kd], strides=[Kd, 1], block_shape=[BM, BK])
    b_d = tl.make_tensor_descriptor(B, shape=[n_b * n_w, Kd], strides=[Kd, 1], block_shape=[BN, BK])
    c_d = tl.make_tensor_descriptor(Cout, shape=[n_b * M, Nn], strides=[Nn, 1], block_shape=[BM, BN])
    row = b * M + pm * BM
    col = b * n_w + pn * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, Kd, BK):
        a = a_d.load([row, k])
        acc = tl.dot(a, b_d.load([col, k]).T, acc)
        if SWIGLU:
            acc2 = tl.dot(a, b_d.load([col + F_, k]).T, acc2)
    if SWIGLU:
        g_d = tl.make_tensor_descriptor(G, shape=[n_b * M, 2 * Nn], strides=[2 * Nn, 1], block_shape=[BM, BN])
        g_d.store([row, pn * BN], acc.to(G.dtype.element_ty))
        g_d.store([row, F_ + pn * BN], acc2.to(G.dtype.element_ty))
        acc = acc * tl.sigmoid(acc) * acc2
    c_d.store([row, pn * BN], acc.to(Cout.dtype.element_ty))


def gemm_tma(x, w, cfg, swiglu=False):
    """gemm() through TMA descriptors (x, w contiguous)."""
    Kb, M, Kd = x.shape
    Nn = w.shape[1] // 2 if swiglu else w.shape[1]
    BM, BN, BK, warps, stages = cfg
    if M % BM or Kd % BK or Nn % BN:
        raise ValueError("a tile that does not divide the shape")
    out = torch.empty((Kb, M, Nn), dtype=x.dtype, device=x.device)
    g = torch.empty((Kb, M, 2 * Nn), dtype=x.dtype, device=x.device) if swiglu else out
    grid = (triton.cdiv(M, BM) * triton.cdiv(Nn, BN), Kb)
    _gemm_tma[grid](x, w, out, g, M, Nn, Kd, SWIGLU=swiglu, F_=Nn if swiglu else 1,
                    BM=BM, BN=BN, BK=BK, GROUP=8, num_warps=warps, num_stages=stages)
    return (out, g) if swiglu else out


def gemm(x, w, cfg, norm_w=None, swiglu=False):
    """x (K, M, Kd) @ w (K, Nn, Kd)^T; shapes here divide the tiles (no masks)."""
    Kb, M, Kd = x.shape
    Nn = w.shape[1] // 2 if swiglu else w.shape[1]
    BM, BN, BK, warps, stages = cfg
    if norm_w is not None:
        BK = Kd
    if M % BM or Kd % BK or Nn % BN:
        raise ValueError("a tile that does not divide the shape")
    out = torch.empty((Kb, M, Nn), dtype=x.dtype, device=x.device)
    g = torch.empty((Kb, M, 2 * Nn), dtype=x.dtype, device=x.device) if swiglu else out
    grid = (triton.cdiv(M, BM) * triton.cdiv(Nn, BN), Kb)
    _gemm[grid](x, w, out, norm_w if norm_w is not None else x, g, M, Nn, Kd, *x.stride(),
                w.stride(0), w.stride(2), w.stride(1), *out.stride(), g.stride(0), g.stride(1),
                NORM=norm_w is not None, SWIGLU=swiglu, F_=Nn if swiglu else 1,
                BM=BM, BN=BN, BK=BK, GROUP=8, num_warps=warps, num_stages=stages)
    return (out, g) if swiglu else out


CONFIGS = [(bm, bn, bk, w, s) for (bm, bn) in ((128, 128), (128, 256), (256, 128), (64, 256), (128, 64), (64, 64), (256, 64))
           for bk in (64,) for w in (4, 8) for s in (3, 4)]


def ms(fn):
    return do_bench_cudagraph(fn, rep=100)


def best(fn_of_cfg, cfgs, check):
    """(ms, launch) of the fastest launch; each checked against the reference first (a wrong
    result raises); launches needing more shared memory than the GPU has, or tiles that do not
    divide the shape, are skipped."""
    out = []
    for cfg in cfgs:
        try:
            y = fn_of_cfg(cfg)
        except (triton.runtime.errors.OutOfResources, ValueError):
            continue
        check(y)
        out.append((ms(lambda: fn_of_cfg(cfg)), cfg))
    return min(out)


def close(ref):
    def check(y):
        y = y[0] if isinstance(y, tuple) else y
        err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert err < 2e-2, f"max error {err:.3g}"
    return check


def tflops(flops, t_ms):
    return flops / t_ms / 1e9


def main():
    torch.manual_seed(0)
    dev = "cuda"
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"K = {K} trials x {N} rows, d {C}, F {F}, bf16; CUDA-graph replays (do_bench_cudagraph), ms\n")
    x = torch.randn(K, N, C, device=dev).to(torch.bfloat16)
    h = torch.randn(K, N, F, device=dev).to(torch.bfloat16)
    weights = {"qkv": (x, 3 * C), "out": (x, C), "gate_up": (x, 2 * F), "down": (h, C),
               "lm_head chunk (2048 rows)": (x[:, :2048], 16384)}
    # device-side TMA descriptors take their scratch from here
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    print(f"{'GEMM':28s} {'cuBLAS ms':>10s} {'TFLOP/s':>8s} {'Triton ms':>10s} {'TFLOP/s':>8s} {'Triton/cuBLAS':>14s}  launch")
    tot_c = tot_t = tot_d = 0.0
    tma_rows = []
    for name, (a, n_out) in weights.items():
        a = a.contiguous()
        w = (torch.randn(K, n_out, a.shape[2], device=dev) / math.sqrt(a.shape[2])).to(torch.bfloat16)
        ref = torch.bmm(a, w.transpose(1, 2))
        flops = 2 * a.shape[0] * a.shape[1] * a.shape[2] * n_out
        t_c = ms(lambda: torch.bmm(a, w.transpose(1, 2)))
        t_t, cfg = best(lambda c: gemm(a, w, c), CONFIGS, close(ref))
        t_d, cfg_d = best(lambda c: gemm_tma(a, w, c), CONFIGS, close(ref))
        tot_c, tot_t, tot_d = tot_c + t_c, tot_t + t_t, tot_d + t_d
        print(f"{name:28s} {t_c:10.3f} {tflops(flops, t_c):8.1f} {t_t:10.3f} {tflops(flops, t_t):8.1f} {t_c / t_t:13.2f}x  {cfg}")
        tma_rows.append(f"{name + ', TMA':28s} {t_c:10.3f} {tflops(flops, t_c):8.1f} {t_d:10.3f} {tflops(flops, t_d):8.1f} "
                        f"{t_c / t_d:13.2f}x  {cfg_d}")
    print(f"{'all five':28s} {tot_c:10.3f} {'':8s} {tot_t:10.3f} {'':8s} {tot_c / tot_t:13.2f}x")
    print("\n".join(tma_rows))
    print(f"{'all five, TMA':28s} {tot_c:10.3f} {'':8s} {tot_d:10.3f} {'':8s} {tot_c / tot_d:13.2f}x\n")

    # fusion 1: rms_norm -> qkv
    nw = (1 + 0.1 * torch.randn(K, C, device=dev)).float()
    wq = (torch.randn(K, 3 * C, C, device=dev) / math.sqrt(C)).to(torch.bfloat16)

    def norm():  # the module's forward kernel: (y, h, dw) with y as rows
        return rms_norm_forward(x, nw, EPS)[0].view(K, N, C)
    y = norm()
    ref = torch.bmm(y, wq.transpose(1, 2))

    def unfused_norm():
        return torch.bmm(norm(), wq.transpose(1, 2))
    t_u = ms(unfused_norm)
    cfgs = sorted({(bm, bn, C, w, s) for (bm, bn, _, w, s) in CONFIGS if bm <= 128})
    t_f, cfg = best(lambda c: gemm(x, wq, c, norm_w=nw), cfgs, close(ref))
    t_g = ms(lambda: torch.bmm(y, wq.transpose(1, 2)))
    print(f"rms_norm -> qkv      unfused (Triton norm + cuBLAS) {t_u:.3f} ms (the GEMM alone {t_g:.3f}); "
          f"fused Triton {t_f:.3f} ms: {t_u / t_f:.2f}x  {cfg}")

    # fusion 2: gate_up -> swiglu
    wg = (torch.randn(K, 2 * F, C, device=dev) / math.sqrt(C)).to(torch.bfloat16)
    gu = torch.bmm(x, wg.transpose(1, 2))
    ref = swiglu_forward(gu)

    def unfused_swiglu():
        return swiglu_forward(torch.bmm(x, wg.transpose(1, 2)))
    t_u = ms(unfused_swiglu)
    t_g = ms(lambda: torch.bmm(x, wg.transpose(1, 2)))
    cfgs = [c for c in CONFIGS if F % c[1] == 0]  # F = 704 = 11 x 64
    t_f, cfg = best(lambda c: gemm(x, wg, c, swiglu=True), cfgs, close(ref))
    t_d, cfg_d = best(lambda c: gemm_tma(x, wg, c, swiglu=True), cfgs, close(ref))
    print(f"gate_up -> swiglu    unfused (cuBLAS + Triton swiglu) {t_u:.3f} ms (the GEMM alone {t_g:.3f}); "
          f"fused Triton {t_f:.3f} ms: {t_u / t_f:.2f}x  {cfg}; fused Triton, TMA {t_d:.3f} ms: {t_u / t_d:.2f}x  {cfg_d}")


if __name__ == "__main__":
    main()
