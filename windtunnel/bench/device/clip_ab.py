"""A/B of the per-trial gradient clipping in the population trainer, alternating in one process.

old: sum(grad.float().pow(2).flatten(1).sum(1)), which writes a squared copy of every gradient;
new: windtunnel.optim.clip_scale_per_trial (torch.linalg.vector_norm, one read of each gradient).
Prints: d_model K variant model-TFLOP/s peak-GB.

    bash windtunnel/bench/device/gpu.sh py windtunnel/bench/device/clip_ab.py   # summary: results/bench/README.md
"""
import torch

import windtunnel.trainer as trainer
from windtunnel.bench.population import reference_trial, throughput
from windtunnel.optim import clip_scale_per_trial as new


@torch.no_grad()
def old(params, max_norm):
    norm = sum(p.grad.float().pow(2).flatten(1).sum(1) for p in params).sqrt()
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


print(f"# {torch.cuda.get_device_name()}; columns: d_model K variant model-TFLOP/s peak-GB", flush=True)
for d_model, K in ((256, 64), (256, 16), (512, 16)):
    for _ in range(2):
        for name, fn in (("old", old), ("new", new)):
            trainer.clip_scale_per_trial = fn
            torch.cuda.reset_peak_memory_stats()
            r = throughput(reference_trial(d_model), K, steps=10)
            print(d_model, K, name, f"{r['tflops']:.1f}", f"{r['peak_gb']:.1f}", flush=True)
            torch.cuda.empty_cache()
