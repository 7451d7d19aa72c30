"""Aggregate training throughput on one GPU: a population of K stacked trials against the ways
one would otherwise fill a GPU with tiny trials. The reference trial: d_model 256 or 512,
8 layers, vocab 16384, seq 512, 16 sequences per step per trial.

    python -m windtunnel.bench.population [--d-models 256,512] [--ks 1,4,16,32,64] [--out results/bench]

Rows (name): `population` (the project's trainer, Triton kernels, K trials), `eager` (one
trial, the project's PyTorch ops), `compile` (the same under torch.compile), `processes`
(N processes sharing the GPU, each the project's trainer on one trial), and the peers a user
would pick instead (windtunnel.bench.peers): `hf_llama:MODE` (transformers' LlamaForCausalLM)
and `nanogpt:MODE` (windtunnel/bench/nanogpt.py), MODE eager or compile, one trial per process
and N processes sharing the GPU. The last column is each population row against the strongest
peer row of its d_model, the headline.
Model TFLOP/s = tokens/s × (6 × matmul params with the LM head + causal attention).
With only peer rows asked (--ks, --processes and --baselines empty) it also runs on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from windtunnel.bench import write_results
from windtunnel.bench.peers import MODES, PEERS, measure
from windtunnel.config.trial import (DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, TrialConfig,
                                     with_overrides)
from windtunnel.provenance import device_name
from windtunnel.trainer import Population


def reference_trial(d_model: int, kernels: str = "auto", compile: bool = False, cuda_graph: bool = True, *,
                    n_layers: int = 8, seq_len: int = 512, vocab: int = 16384, batch: int = 16,
                    device: str = "cuda") -> TrialConfig:
    return TrialConfig(
        model=ModelConfig(d_model=d_model, n_layers=n_layers, head_dim=64, seq_len=seq_len, vocab_size=vocab,
                          kernels=kernels),
        data=DataConfig(max_bytes=4_000_000),  # byte-level text; the model's vocab stays 16384
        optim=OptimConfig(lr=0.01), schedule=ScheduleConfig(kind="constant", warmup=0.0),
        train=TrainConfig(tokens=10**9, batch_size=batch, device=device, compile=compile, cuda_graph=cuda_graph))


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
    p.add_argument("--peers", default="", help="comma list of hf_llama, nanogpt (windtunnel.bench.peers)")
    p.add_argument("--peer-modes", default="eager,compile", help="comma list of eager, compile")
    p.add_argument("--peer-procs", default="1,4,8", help="processes sharing the GPU, one peer trial each")
    p.add_argument("--window", type=float, default=6.0, help="seconds of each peer row's common timing window")
    p.add_argument("--shape", default="8,512,16384,16",
                   help="n_layers,seq_len,vocab,batch of the reference trial (a smaller one for a CPU check)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", help="folder for population.json and population.md")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    baselines = set(filter(None, args.baselines.split(",")))
    if baselines - {"eager", "compile"}:
        p.error(f"--baselines: {', '.join(sorted(baselines - {'eager', 'compile'}))} unknown; allowed: eager, compile")
    peers, modes = _choices(p, "--peers", args.peers, PEERS), _choices(p, "--peer-modes", args.peer_modes, MODES)
    try:
        procs = [int(x) for x in args.peer_procs.split(",") if x]
        n_layers, seq_len, vocab, batch = (int(x) for x in args.shape.split(","))
        if min(procs + [n_layers, seq_len, vocab, batch]) < 1:
            raise ValueError
    except ValueError:
        p.error("--peer-procs and --shape: comma lists of integers >= 1 (--shape: n_layers,seq_len,vocab,batch)")
    if peers and not procs:
        p.error("--peer-procs: at least one process count with --peers")
    shape = {"n_layers": n_layers, "seq_len": seq_len, "vocab": vocab, "batch": batch}
    own_rows = args.ks.strip(",") or args.processes.strip(",") or baselines
    if not torch.cuda.is_available() and (own_rows or not peers):  # one line, as kernels/bench.py says it
        sys.exit("bench: needs a CUDA GPU")
    if args.child:
        print(json.dumps(throughput(reference_trial(args.child), 1, args.steps, barrier=Path(args.barrier))))
        return 0
    # a time limit's SIGTERM unwinds, so the peers' processes are stopped (peers.measure's finally)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cuda = torch.cuda.is_available()
    dev = device_name(torch.device("cuda" if cuda else "cpu"))
    rows = []

    def table() -> str:
        fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
        lines = ["| name | d_model | trials | tokens/s | model TFLOP/s | peak GB | × strongest peer |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['name']}{f' ({note})' if (note := r.get('note')) else ''} | {r['d_model']} | {r['trials']} | "
                  f"{fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['tflops'], '.1f')} | {fmt(r['peak_gb'], '.1f')} | "
                  f"{fmt(vs_peer(r), '.2f')} |" for r in rows]
        return "\n".join(lines + headline(rows))

    def add(name, d, k, fn):
        try:
            r = fn()
        except torch.cuda.OutOfMemoryError:
            r = {"tokens_per_s": None, "tflops": None, "peak_gb": None, "note": "out of memory"}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rows.append({"name": name, "d_model": d, "trials": k, **r, "device": dev})
        print(json.dumps(rows[-1]), flush=True)
        if args.out:  # after every row: a run cut short keeps what it measured
            write_results(args.out, "population", rows,
                "# Population training throughput (one GPU)\n\n"
                f"Command: `python -m windtunnel.bench.population {' '.join(argv if argv is not None else sys.argv[1:])}`"
                f"\nDevice: {dev}\n\n" + table() + "\n")

    def vs_peer(r) -> float | None:
        best = strongest_peer(rows, r["d_model"])
        return r["tflops"] / best["tflops"] if r["name"] == "population" and r["tflops"] and best else None

    for d in (int(x) for x in args.d_models.split(",")):
        if "eager" in baselines:
            add("eager", d, 1, lambda: throughput(reference_trial(d, kernels="torch", cuda_graph=False, **shape), 1,
                                                  args.steps))
        if "compile" in baselines:
            add("compile", d, 1, lambda: throughput(reference_trial(d, kernels="torch", compile=True, **shape), 1,
                                                    args.steps))
        for n in (int(x) for x in args.processes.split(",") if x):
            add("processes", d, n, lambda: _processes(d, n, args.steps))
        for k in (int(x) for x in args.ks.split(",") if x):
            add("population", d, k, lambda: throughput(reference_trial(d, **shape), k, args.steps))
        if peers:  # last: a run stopped by its time limit has kept the population rows; each row kept as it comes
            measure(reference_trial(d, kernels="torch", device="cuda" if cuda else "cpu", **shape), peers,
                    modes if cuda else ["eager"], procs, window=args.window,
                    report=lambda r: add(r["name"], d, r["trials"],
                                         lambda: {k: v for k, v in r.items() if k not in ("name", "trials")}))
    print(table())
    return 0


def _choices(p, flag: str, value: str, allowed: tuple) -> list[str]:
    got = [x for x in value.split(",") if x]
    if set(got) - set(allowed):
        p.error(f"{flag}: {', '.join(sorted(set(got) - set(allowed)))} unknown; allowed: {', '.join(allowed)}")
    return got


def strongest_peer(rows: list[dict], d_model: int) -> dict | None:
    """The fastest peer row (hf_llama:*, nanogpt:*) of this d_model: what the headline compares to."""
    peers = [r for r in rows if r["d_model"] == d_model and r["name"].split(":")[0] in PEERS and r["tflops"]]
    return max(peers, key=lambda r: r["tflops"], default=None)


def headline(rows: list[dict]) -> list[str]:
    """One line per d_model: its fastest population row against the strongest peer."""
    out = []
    for d in dict.fromkeys(r["d_model"] for r in rows):
        best = strongest_peer(rows, d)
        pops = [r for r in rows if r["d_model"] == d and r["name"] == "population" and r["tflops"]]
        if best and pops:
            top = max(pops, key=lambda r: r["tflops"])
            out.append(f"\nd_model {d}: population K = {top['trials']} {top['tflops']:.1f} model TFLOP/s = "
                       f"**{top['tflops'] / best['tflops']:.2f}×** the strongest peer, {best['name']} with "
                       f"{best['trials']} process(es) ({best['tflops']:.1f}).")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
