"""Where a population's training step spends its time: phase times (synchronised) and the
top GPU kernels from torch.profiler.

    python -m windtunnel.bench.profile_step [--d-model 256] [--k 64] [--steps 3] [--ops]

--ops adds the PyTorch operators (with their input shapes) that launched the most GPU time:
where the "elementwise" and "copy" kernels come from. A line after the split gives this GPU's
device-to-device copy bandwidth: the rate windtunnel.bench.step_budget holds the
bandwidth-bound passes to.
"""
from __future__ import annotations

import argparse
import time

import torch

from windtunnel.bench.population import reference_trial
from windtunnel.config.trial import with_overrides
from windtunnel.optim import clip_scale_per_trial
from windtunnel.trainer import Population


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ops", action="store_true", help="also list the operators by GPU time, with input shapes")
    args = p.parse_args(argv)
    cfg = reference_trial(args.d_model)
    # eager launches: the phases need synchronising between them (a CUDA graph runs the same kernels)
    pop = Population([with_overrides(cfg, {"train.seed": k, "train.cuda_graph": False}) for k in range(args.k)])
    for _ in range(3):
        pop.train_step(pop.lr_factors())
    torch.cuda.synchronize()
    phases = {"data": 0.0, "forward": 0.0, "backward": 0.0, "clip": 0.0, "optimizer": 0.0}

    def lap(name, t0):
        torch.cuda.synchronize()
        phases[name] += time.perf_counter() - t0
        return time.perf_counter()

    for _ in range(args.steps):
        t = time.perf_counter()
        w = pop._batch()
        t = lap("data", t)
        with pop.autocast:
            loss = pop.model(w[..., :-1], w[..., 1:])
        t = lap("forward", t)
        loss.sum().backward()
        t = lap("backward", t)
        scale = clip_scale_per_trial(pop.opt.params, 1.0)
        t = lap("clip", t)
        pop.opt.step(torch.ones(args.k, device=pop.device), scale)
        for q in pop.opt.params:
            q.grad = None
        lap("optimizer", t)
    total = sum(phases.values())
    for k, v in phases.items():
        print(f"{k:<10} {1000 * v / args.steps:8.1f} ms  {100 * v / total:5.1f}%")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            pop.train_step(pop.lr_factors())
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    groups: dict[str, float] = {}
    for e in prof.key_averages():
        name = e.key.lower()
        group = next((g for g, keys in CATEGORIES if any(k in name for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + getattr(e, "self_device_time_total", 0.0) / 1000 / args.steps
    total = sum(groups.values())
    for g, ms in sorted(groups.items(), key=lambda x: -x[1]):
        print(f"{g:<12} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
    print(f"copy bandwidth: {copy_gbs(pop.device):.0f} GB/s (read + write)")
    if args.ops:
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            for _ in range(args.steps):
                pop.train_step(pop.lr_factors())
            torch.cuda.synchronize()
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cuda_time_total", row_limit=70, max_name_column_width=40, max_shapes_column_width=80))
    return 0


def copy_gbs(device: torch.device, gib: int = 1, repeats: int = 20) -> float:
    """Bytes read + written per second by a device-to-device copy of `gib` GiB, median of repeats."""
    src = torch.empty(gib * 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / sorted(times[2:])[repeats // 2] / 1e9


# GPU kernels by what they do, matched on their names (first match wins)
CATEGORIES = [("attention", ("_attn", "attention", "flash")), ("cross-entropy", ("cross_entropy",)),
              ("rms_norm", ("rms_norm",)), ("swiglu", ("swiglu",)), ("adamw", ("adamw",)),
              ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas")),
              ("copy", ("copy", "memcpy", "memset", "cat")), ("reduce", ("reduce", "norm")),
              ("elementwise", ("elementwise", "vectorized", "unrolled"))]


if __name__ == "__main__":
    raise SystemExit(main())
