"""Throughput of a `windtunnel train` run from its loss.jsonl: tokens/s per GPU, model TFLOP/s,
MFU against the GPU's dense bf16 peak, peak memory; and where the run resumed.

    python -m windtunnel.bench.large_run_stats RUN_DIR/loss.jsonl --config train.yaml [--peak-tflops 989]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from windtunnel.large_run import load_config
from windtunnel.model import flops_per_token


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log")
    p.add_argument("--config", required=True)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 per GPU (H100 SXM: 989)")
    p.add_argument("--skip", type=int, default=10, help="first steps of each launch left out (warm-up)")
    args = p.parse_args(argv)
    cfg, _ = load_config(yaml.safe_load(Path(args.config).read_text()))
    flops = flops_per_token(cfg.model, cfg.model.vocab_size)
    recs = [json.loads(line) for line in Path(args.log).read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r and "seconds" in r]
    # a launch restarts its clock: split where seconds go down
    launches, cur = [], []
    for r in steps:
        if cur and r["seconds"] < cur[-1]["seconds"]:
            launches.append(cur)
            cur = []
        cur.append(r)
    launches.append(cur)
    last = launches[-1][args.skip:] or launches[-1]
    world = last[-1].get("world", 1)
    tps = (last[-1]["tokens"] - last[0]["tokens"]) / (last[-1]["seconds"] - last[0]["seconds"])
    out = {"steps": steps[-1]["step"], "launches": len(launches),
           "resumed_at_step": launches[-1][0]["step"] - 1 if len(launches) > 1 else None,
           "tokens_per_s_per_gpu": tps / world, "model_tflops_per_gpu": tps / world * flops / 1e12,
           "mfu": tps / world * flops / (args.peak_tflops * 1e12),
           "max_mem_gb": max(r.get("max_mem_gb", 0) for r in steps), "final_loss": steps[-1]["loss"]}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
