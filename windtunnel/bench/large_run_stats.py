"""Throughput of a `windtunnel train` run from its loss.jsonl: tokens/s per GPU (of a training step,
and of the wall clock with evaluations and checkpoint saves), model TFLOP/s and MFU (of a training
step) against the GPU's dense bf16 peak, peak memory; and where the run resumed.

    python -m windtunnel.bench.large_run_stats RUN_DIR/loss.jsonl --config train.yaml [--peak-tflops 989]
        [--baseline ONE_GPU_RUN/loss.jsonl]

With --baseline (the same config's run on fewer GPUs, usually one), the scaling efficiency:
tokens/s per GPU here over tokens/s per GPU there.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from windtunnel.config.large_run import load_config
from windtunnel.model import flops_per_token


def throughput(log: Path, skip: int) -> dict:
    """Over the last launch in log (its first `skip` steps left out): tokens/s per GPU of a training
    step (the median step's time, so evaluations and checkpoint saves are left out) and of the wall
    clock (with them); and the run's steps, launches, resume point, peak memory and final loss."""
    import statistics

    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r and "seconds" in r]
    if len(steps) < 2:
        raise SystemExit(f"{log}: fewer than two step records")
    # a launch restarts its clock: split where seconds go down
    launches, cur = [], []
    for r in steps:
        if cur and r["seconds"] < cur[-1]["seconds"]:
            launches.append(cur)
            cur = []
        cur.append(r)
    launches.append(cur)
    last = launches[-1][skip:] if len(launches[-1]) > skip + 1 else launches[-1]
    world = last[-1].get("world", 1)
    step_s = statistics.median(b["seconds"] - a["seconds"] for a, b in zip(last, last[1:]))
    wall = (last[-1]["tokens"] - last[0]["tokens"]) / (last[-1]["seconds"] - last[0]["seconds"])
    return {"world": world, "steps": steps[-1]["step"], "launches": len(launches),
            "resumed_at_step": launches[-1][0]["step"] - 1 if len(launches) > 1 else None,
            "step_seconds": step_s, "tokens_per_s_per_gpu": (last[1]["tokens"] - last[0]["tokens"]) / step_s / world,
            "wall_tokens_per_s_per_gpu": wall / world,
            "max_mem_gb": max(r.get("max_mem_gb", 0) for r in steps), "final_loss": steps[-1]["loss"]}

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log")
    p.add_argument("--config", required=True)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 per GPU (H100 SXM: 989)")
    p.add_argument("--skip", type=int, default=10, help="first steps of each launch left out (warm-up)")
    p.add_argument("--baseline", help="loss.jsonl of the same config on fewer GPUs: adds scaling_efficiency")
    args = p.parse_args(argv)
    cfg, _ = load_config(yaml.safe_load(Path(args.config).read_text()))
    flops = flops_per_token(cfg.model, cfg.model.vocab_size)
    out = throughput(Path(args.log), args.skip)
    out["model_tflops_per_gpu"] = out["tokens_per_s_per_gpu"] * flops / 1e12
    out["mfu"] = out["tokens_per_s_per_gpu"] * flops / (args.peak_tflops * 1e12)
    if args.baseline:
        base = throughput(Path(args.baseline), args.skip)
        out["baseline"] = {k: base[k] for k in ("world", "tokens_per_s_per_gpu", "wall_tokens_per_s_per_gpu", "max_mem_gb")}
        out["scaling_efficiency"] = out["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
