"""Aggregate training throughput on one GPU: a population of K stacked trials against the ways
one would otherwise fill a GPU with tiny trials. The reference trial: d_model 256 or 512,
8 layers, vocab 16384, seq 512, 16 sequences per step per trial.

    python -m windtunnel.bench.population [--d-models 256,512] [--ks 1,4,16,32,64] [--out results/bench]

Rows (name): `population` (the project's trainer, Triton kernels, K trials), `eager` (one
trial, PyTorch ops), `compile` (one trial, PyTorch ops under torch.compile), `processes`
(N processes sharing the GPU, one trial each: what Ray's fractional GPUs give).
Model TFLOP/s = tokens/s × (6 × matmul params with the LM head + causal attention).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from windtunnel.bench import write_results
from windtunnel.config.trial import (DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, TrialConfig,
                               with_overrides)
from windtunnel.provenance import device_name
from windtunnel.trainer import Population


def reference_trial(d_model: int, kernels: str = "auto", compile: bool = False, cuda_graph: bool = True) -> TrialConfig:
    return TrialConfig(
        model=ModelConfig(d_model=d_model, n_layers=8, head_dim=64, seq_len=512, vocab_size=16384, kernels=kernels),
        data=DataConfig(max_bytes=4_000_000),  # byte-level text; the model's vocab stays 16384
        optim=OptimConfig(lr=0.01), schedule=ScheduleConfig(kind="constant", warmup=0.0),
        train=TrainConfig(tokens=10**9, batch_size=16, device="cuda", compile=compile, cuda_graph=cuda_graph))


def throughput(cfg: TrialConfig, K: int, steps: int, warmup: int = 3, barrier: Path | None = None) -> dict:
    """Aggregate tokens/s and model TFLOP/s of K trials trained together."""
    cfgs = [with_overrides(cfg, {"optim.lr": cfg.optim.lr * (1 + 0.01 * k), "train.seed": k}) for k in range(K)]
    pop = Population(cfgs)
    for _ in range(warmup):
        pop.train_step(pop.lr_factors())
    torch.cuda.synchronize()
    if barrier is not None:  # processes sharing the GPU start timing together
        (barrier.parent / f"ready-{os.getpid()}").touch()
        while not barrier.exists():
            time.sleep(0.01)
    t0 = time.perf_counter()
    for _ in range(steps):
        pop.train_step(pop.lr_factors())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = K * steps * pop.tokens_per_step
    tps = tokens / seconds
    return {"tokens_per_s": tps, "tflops": tps * pop.model.flops_per_token() / 1e12,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30}


def _processes(d_model: int, n: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        barrier = Path(tmp) / "go"
        procs = [subprocess.Popen([sys.executable, "-m", "windtunnel.bench.population", "--child", str(d_model),
                                   "--steps", str(steps), "--barrier", str(barrier)], stdout=subprocess.PIPE)
                 for _ in range(n)]
        while len(list(Path(tmp).glob("ready-*"))) < n and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        barrier.touch()
        outs = [json.loads(p.communicate()[0].decode().strip().splitlines()[-1]) for p in procs]
    return {"tokens_per_s": sum(o["tokens_per_s"] for o in outs), "tflops": sum(o["tflops"] for o in outs),
            "peak_gb": max(o["peak_gb"] for o in outs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-models", default="256,512")
    p.add_argument("--ks", default="1,4,16,32,64")
    p.add_argument("--processes", default="4,8")
    p.add_argument("--baselines", default="eager,compile", help="one-trial baselines: comma list of eager, compile")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", help="folder for population.json and population.md")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    baselines = set(filter(None, args.baselines.split(",")))
    if baselines - {"eager", "compile"}:
        p.error(f"--baselines: {', '.join(sorted(baselines - {'eager', 'compile'}))} unknown; allowed: eager, compile")
    if not torch.cuda.is_available():  # one line, as kernels/bench.py says it
        sys.exit("bench: needs a CUDA GPU")
    if args.child:
        print(json.dumps(throughput(reference_trial(args.child), 1, args.steps, barrier=Path(args.barrier))))
        return 0
    dev = device_name(torch.device("cuda"))
    rows = []

    def table() -> str:
        fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
        lines = ["| name | d_model | trials | tokens/s | model TFLOP/s | peak GB |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['d_model']} | {r['trials']} | {fmt(r['tokens_per_s'], ',.0f')} | "
                  f"{fmt(r['tflops'], '.1f')} | {fmt(r['peak_gb'], '.1f')} |" for r in rows]
        return "\n".join(lines)

    def add(name, d, k, fn):
        try:
            r = fn()
        except torch.cuda.OutOfMemoryError:
            r = {"tokens_per_s": None, "tflops": None, "peak_gb": None, "note": "out of memory"}
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        rows.append({"name": name, "d_model": d, "trials": k, **r, "device": dev})
        print(json.dumps(rows[-1]), flush=True)
        if args.out:  # after every row: a run cut short keeps what it measured
            write_results(args.out, "population", rows,
                "# Population training throughput (one GPU)\n\n"
                f"Command: `python -m windtunnel.bench.population --d-models {args.d_models} --ks {args.ks} "
                f"--processes {args.processes} --baselines {args.baselines} --steps {args.steps} --out {args.out}`\nDevice: {dev}\n\n"
                + table() + "\n")

    for d in (int(x) for x in args.d_models.split(",")):
        if "eager" in baselines:
            add("eager", d, 1, lambda: throughput(reference_trial(d, kernels="torch", cuda_graph=False), 1, args.steps))
        if "compile" in baselines:
            add("compile", d, 1, lambda: throughput(reference_trial(d, kernels="torch", compile=True), 1, args.steps))
        for n in (int(x) for x in args.processes.split(",") if x):
            add("processes", d, n, lambda: _processes(d, n, args.steps))
        for k in (int(x) for x in args.ks.split(",") if x):
            add("population", d, k, lambda: throughput(reference_trial(d), k, args.steps))
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
