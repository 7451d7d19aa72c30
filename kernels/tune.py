"""Tune the kernels' launch constants on a GPU (they are fixed numbers in the kernel modules, not
autotuned at run time, so every run makes the same launches and a CUDA graph can record them).

    python -m windtunnel.kernels.tune rms_norm [--shapes 1x8192x256,...]      # K x rows x C
    python -m windtunnel.kernels.tune attention [--shapes 16x4x512x64,...]    # B x H x T x D
    python -m windtunnel.kernels.tune cross_entropy [--shapes 64x1024x16384,...]  # K x rows x V

Every time is a replayed CUDA graph (the GPU's own time, L2 flushed), as in
windtunnel.kernels.bench. rms_norm: forward and backward timed apart, each against a copy of as
many bytes, then the best pair fwd + bwd (plain RMSNorm: the fused form runs the same kernels).
attention: each kernel's candidate launches checked against the current ones' outputs and
ranked by the geometric mean of their times over the shapes (the forward alone; the backward
as a whole, its dkdv launch tuned first, then dq's). cross_entropy: the CE kernel on one chunk
of logits (it reads the chunk and overwrites it with the gradient) against a copy of as many
bytes, then the whole fused LM head + CE with the current and the best launch. Set the printed
winners in the modules.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import math
import multiprocessing as mp

import torch
import triton

from . import attention as A
from . import linear_cross_entropy as L
from . import rms_norm as R
from .bench import _bench, _graph_ms

FWD_GRID = {"FWD_TILE": (1024, 2048, 4096, 8192), "FWD_ELEMS_PER_THREAD": (None, 8, 16, 32)}
BWD_GRID = {"BWD_TILE": (512, 1024, 2048, 4096), "BWD_ELEMS_PER_THREAD": (8, 16, 32),
            "BWD_PROGRAMS_PER_SM": (1, 2, 4, 8, 16), "BWD_STAGES": (2, 3, 4)}


def _copy_ms(n_bytes):
    """A copy moving n_bytes: n_bytes / 2 read, as many written."""
    src = torch.empty(n_bytes // 4, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return min(_bench(lambda: dst.copy_(src)), _graph_ms(lambda: dst.copy_(src), []))


def _configs(grid):
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values))


def _set(cfg):
    _set_module(R, cfg)


def tune_shape(K, N, C, top):
    """RMSNorm at x (K, N, C)."""
    x = torch.randn(K, N, C, device="cuda").to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(K, C, device="cuda")).requires_grad_()
    dy = torch.randn_like(x)
    numel, eps = x.numel(), 1e-5
    base = {k: getattr(R, k) for k in (*FWD_GRID, *BWD_GRID)}
    # fewest bytes: fwd reads x, writes y; bwd reads x and dy, writes dx (w and dw are tiny)
    fwd_copy, bwd_copy, all_copy = _copy_ms(4 * numel), _copy_ms(6 * numel), _copy_ms(10 * numel)
    h = x.reshape(-1, C)
    dw = torch.zeros(K, C, device="cuda")
    results = {}
    for phase, grid, fn, copy in (
        ("forward", FWD_GRID, lambda: R.rms_norm_forward(x, w, eps, zero_dw=True), fwd_copy),
        ("backward", BWD_GRID, lambda: R.rms_norm_backward(dy, None, h, w, eps, dw=dw), bwd_copy),
    ):
        rows = []
        for cfg in _configs(grid):
            _set({**base, **cfg})
            rows.append((_graph_ms(fn, []), cfg))
        rows.sort(key=lambda r: r[0])
        results[phase] = rows
        print(f"\nx ({K}, {N}, {C}) {phase}: copy of as many bytes {1000 * copy:.1f} us")
        for ms, cfg in rows[:top]:
            print(f"  {1000 * ms:7.1f} us  {100 * copy / ms:5.1f}% of copy  {cfg}" + ("  (current)" if all(base[k] == v for k, v in cfg.items()) else ""))
        cur = next(ms for ms, cfg in rows if all(base[k] == v for k, v in cfg.items()))
        print(f"  current {1000 * cur:.1f} us ({100 * copy / cur:.1f}%)")
    xg = x.clone().requires_grad_()
    seed = torch.randn_like(x)

    def step():
        R.rms_norm(xg, w, eps).backward(seed)
    for name, cfg in (("current", base), ("best", {**results["forward"][0][1], **results["backward"][0][1]})):
        _set(cfg)
        ms = _graph_ms(step, [xg, w])
        print(f"fwd+bwd {name}: {1000 * ms:.1f} us = {100 * all_copy / ms:.1f}% of copy ({1000 * all_copy:.1f} us)  {cfg}")
    _set(base)


# (BLOCK_M, BLOCK_N) pairs each attention kernel's loops allow, crossed with warps and stages
_BLOCKS = {"fwd": [(m, n) for m in (64, 128) for n in (32, 64, 128) if m % n == 0],
           "dkdv": [(m, n) for n in (32, 64, 128) for m in (16, 32, 64) if n % m == 0],
           "dq": [(m, n) for m in (64, 128) for n in (16, 32, 64) if m % n == 0]}
_LAUNCH = list(itertools.product((4, 8), (2, 3)))


def _candidates(kernel):
    return [(m, n, w, st) for (m, n) in _BLOCKS[kernel] for (w, st) in _LAUNCH]


def _attention_inputs(B, H, T, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4))
    return q, k, v, do


def _compile_some(D, kernel, cands):
    """Worker: launch each candidate once on a small input, filling Triton's on-disk cache."""
    q, k, v, do = _attention_inputs(1, 4, 512, D)
    for c in cands:
        A.CONFIGS[64 if D <= 64 else 128][kernel] = c
        try:
            o, lse = A.attention_forward(q, k, v)
            A.attention_backward(do, q, k, v, o, lse, None, None)
        except Exception:  # noqa: BLE001 - an invalid launch (too many resources) is skipped later
            pass
    torch.cuda.synchronize()


def _warm_cache(D, kernel, workers=12):
    cands = _candidates(kernel)
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        list(pool.map(_compile_some, [D] * workers, [kernel] * workers, [cands[i::workers] for i in range(workers)]))


def tune_attention(shapes, top):
    D = shapes[0][3]
    cfg = A.CONFIGS[64 if D <= 64 else 128]
    inputs = [_attention_inputs(*s) for s in shapes]
    refs = []
    for q, k, v, do in inputs:
        o, lse = A.attention_forward(q, k, v)
        refs.append((o, A.attention_backward(do, q, k, v, o, lse, None, None)))
    for kernel in ("fwd", "dkdv", "dq"):
        _warm_cache(D, kernel)
        current, rows = cfg[kernel], []
        for c in _candidates(kernel):
            cfg[kernel] = c
            times = []
            try:
                for (q, k, v, do), (o_ref, g_ref) in zip(inputs, refs):
                    o, lse = A.attention_forward(q, k, v)
                    out = (o,) if kernel == "fwd" else A.attention_backward(do, q, k, v, o_ref, lse, None, None)
                    want = (o_ref,) if kernel == "fwd" else g_ref
                    if any((a.float() - b.float()).abs().max() > 0.02 * b.float().abs().max() for a, b in zip(out, want)):
                        raise ValueError("wrong result")
                    if kernel == "fwd":
                        times.append(_graph_ms(lambda: A.attention_forward(q, k, v), []))
                    else:
                        times.append(_graph_ms(lambda: A.attention_backward(do, q, k, v, o_ref, lse, None, None), []))
            except Exception as e:  # noqa: BLE001
                print(f"  {kernel} {c}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                continue
            rows.append((math.exp(sum(map(math.log, times)) / len(times)), times, c))
        rows.sort()
        cur = next(r for r in rows if r[2] == current)
        print(f"\n{kernel} (BLOCK_M, BLOCK_N, warps, stages): geometric mean over the shapes, then each (us)")
        for g, times, c in rows[:top]:
            print(f"  {c}  {1000 * g:7.1f}  " + "  ".join(f"{1000 * t:7.1f}" for t in times)
                  + f"  {cur[0] / g:.2f}x current" + ("  (current)" if c == current else ""))
        cfg[kernel] = rows[0][2]  # the next kernel is tuned with this one's winner
    print(f"\nbest for head dim {D}: {cfg}")


CE_GRID = {"MAX_BLOCK": (2048, 4096, 8192, 16384), "CE_WARPS": (4, 8, 16, 32), "CE_L2_HINTS": (False, True)}


def tune_cross_entropy(K, n, V, top):
    """The CE kernel on a (K, n, V) bf16 chunk of logits (n rows per trial)."""
    z = torch.randn(K, n, V, device="cuda").to(torch.bfloat16)
    t = torch.randint(0, V, (K, n), device="cuda")
    loss = torch.empty(K, n, device="cuda")
    scales = torch.ones(K, device="cuda")
    copy = _copy_ms(2 * z.numel() * z.element_size())  # the chunk read once and written once
    base = {k: getattr(L, k) for k in CE_GRID}
    rows = []
    for cfg in _configs(CE_GRID):
        block = min(triton.next_power_of_2(V), cfg["MAX_BLOCK"])
        if block != cfg["MAX_BLOCK"] and cfg != base:
            continue  # the same launch as a smaller MAX_BLOCK already timed

        def run(cfg=cfg, block=block):
            L._cross_entropy_kernel[(K * n,)](
                z, z.stride(1), t, t.stride(0), loss, loss.stride(0), scales, n, V, 1.0 / n,
                HAS_GRAD=True, BLOCK_SIZE=block, L2_HINTS=cfg["CE_L2_HINTS"], num_warps=cfg["CE_WARPS"])
        try:
            rows.append((_graph_ms(run, []), cfg))
        except Exception as e:  # noqa: BLE001 - a launch the GPU cannot hold
            print(f"  {cfg}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
    rows.sort(key=lambda r: r[0])
    print(f"\nCE kernel on a ({K}, {n}, {V}) bf16 chunk: copy of as many bytes {1000 * copy:.1f} us")
    for ms, cfg in rows[:top]:
        print(f"  {1000 * ms:8.1f} us  {100 * copy / ms:5.1f}% of copy  {cfg}" + ("  (current)" if cfg == base else ""))
    cur = next(ms for ms, cfg in rows if cfg == base)
    print(f"  current {1000 * cur:.1f} us ({100 * copy / cur:.1f}%)")
    # the whole op: LM head, CE and both gradient matmuls, at N = 8 chunks of rows per trial
    h = torch.randn(K, 8 * n, 256, device="cuda").to(torch.bfloat16)
    w = torch.randn(K, V, 256, device="cuda").to(torch.bfloat16) * 0.05
    tt = torch.randint(0, V, (K, 8 * n), device="cuda")
    for name, cfg in (("current", base), ("best", rows[0][1])):
        _set_module(L, cfg)
        ms = _graph_ms(lambda: L.linear_cross_entropy_forward(h, w, tt, scales, True, chunk_logits=K * n * V), [])
        print(f"linear CE h {tuple(h.shape)}, W {tuple(w.shape)}, {name}: {ms:.2f} ms  {cfg}")
    _set_module(L, base)


def _set_module(module, cfg):
    for k, v in cfg.items():
        setattr(module, k, v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernel", choices=("rms_norm", "attention", "cross_entropy"))
    p.add_argument("--shapes", help="comma list; default: the reference trial's at K = 1 and 16 (rms_norm) "
                   "or 1 and 64 (attention), d_model 256 and 512; cross_entropy: the K = 1, 16 and 64 chunks")
    p.add_argument("--top", type=int, default=6, help="configurations printed per phase or kernel")
    args = p.parse_args(argv)
    print(torch.cuda.get_device_name())
    if args.kernel == "rms_norm":
        for s in (args.shapes or "1x8192x256,16x8192x256,1x8192x512,16x8192x512").split(","):
            tune_shape(*map(int, s.split("x")), args.top)
    elif args.kernel == "cross_entropy":
        for s in (args.shapes or "1x4096x16384,16x1024x16384,64x1024x16384").split(","):
            tune_cross_entropy(*map(int, s.split("x")), args.top)
    else:
        shapes = [tuple(map(int, s.split("x"))) for s in (args.shapes or "16x4x512x64,1024x4x512x64,16x8x512x64,512x8x512x64").split(",")]
        tune_attention(shapes, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
