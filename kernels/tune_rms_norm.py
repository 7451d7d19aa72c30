"""Tune RMSNorm's launch constants on a GPU: forward and backward timed apart, each against a
device-to-device copy of as many bytes, then the best pair fwd + bwd as the benchmark times it.

    python -m windtunnel.kernels.tune_rms_norm [--shapes 1x8192x256,16x8192x256,...]

Shapes are K x rows x C (x (K, rows, C) bf16, weight (K, C) fp32). Every time is a replayed CUDA
graph (the GPU's own time, L2 flushed), as in windtunnel.kernels.bench. Prints, per shape, each
phase's best configurations as % of copy bandwidth; the module constants in rms_norm.py are the
ones to set from it. Plain RMSNorm only: the fused form runs the same kernels with more bytes.
"""
from __future__ import annotations

import argparse
import itertools

import torch

from . import rms_norm as R
from .bench import _bench, _graph_ms

FWD_GRID = {"FWD_TILE": (1024, 2048, 4096, 8192), "FWD_ELEMS_PER_THREAD": (8, 16, 32)}
BWD_GRID = {"BWD_TILE": (1024, 2048, 4096), "BWD_ELEMS_PER_THREAD": (8, 16, 32),
            "BWD_PROGRAMS_PER_SM": (1, 2, 4), "BWD_STAGES": (2, 3, 4)}


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
    for k, v in cfg.items():
        setattr(R, k, v)


def tune_shape(K, N, C, top):
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1x8192x256,16x8192x256,1x8192x512,16x8192x512")
    p.add_argument("--top", type=int, default=6, help="configurations printed per phase")
    args = p.parse_args(argv)
    print(torch.cuda.get_device_name())
    for s in args.shapes.split(","):
        tune_shape(*map(int, s.split("x")), args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
