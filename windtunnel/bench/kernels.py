"""Benchmark: each Triton kernel and the training step against PyTorch, eager and compiled.

The kernels' rows live beside them (windtunnel/kernels/bench.py); the rows that need the model
and the trainer (a training step of the model, the trainer's whole step) live here, above the
kernels' layer. Writes kernels.md (table, command, machine) and kernels.json (one row each).

    python -m windtunnel.bench.kernels [--out results/bench] [--no-compile] [--only rms_norm,...]

How rows are timed and what GB/s and TFLOP/s count: windtunnel/kernels/bench.py's docstring.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

from windtunnel.files import write_json, write_text
from windtunnel.kernels.bench import (HEAD_DIM, LAYERS, ROWS, SEQ_LEN, SEQS, VOCAB, _device_name, bench_attention,
                                      bench_linear_ce, bench_rms_norm, bench_swiglu, record)


def bench_train_step(d, K):
    try:
        from windtunnel.config.trial import ModelConfig
        from windtunnel.model import Transformer
    except ImportError as e:
        print(f"train step skipped: {e}", flush=True)
        return
    idx = torch.randint(0, VOCAB, (K, SEQS, SEQ_LEN), device="cuda")
    tgt = torch.randint(0, VOCAB, (K, SEQS, SEQ_LEN), device="cuda")
    for kernels in ("triton", "torch"):
        gc.collect()
        torch.cuda.empty_cache()  # the eager K=16, d=512 step needs ~66 GB of the 80
        cfg = ModelConfig(d_model=d, n_layers=LAYERS, n_heads=d // HEAD_DIM, seq_len=SEQ_LEN, vocab_size=VOCAB,
                          kernels=kernels)
        model = Transformer(cfg, VOCAB, population=K)
        gen = torch.Generator().manual_seed(0)
        for k in range(K):
            model.init_trial(k, cfg, gen)
        model = model.cuda()
        params = list(model.parameters())
        flops = model.flops_per_token() * K * SEQS * SEQ_LEN

        def step():  # the autocast cache off, so the step can be captured in a CUDA graph
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = model(idx, tgt)
            loss.sum().backward()

        shape = f"K={K} x {SEQS}x{SEQ_LEN} tokens, d {d}, {LAYERS} layers, fwd+bwd, bf16 autocast"
        record("train step", f"kernels={kernels}" + (" (eager)" if kernels == "torch" else ""), shape, step,
               params, flops=flops, peak=True, graph=K == 1)  # a graph of K=16 would not fit twice
        del model, params


def bench_trainer_step(d, steps=30):
    """The whole training step of one reference trial as the trainer runs it (data, forward,
    backward, clipping, AdamW; host included, synchronised once at the end), against eager
    PyTorch: PyTorch's ops, no graph."""
    try:
        from windtunnel.bench.population import reference_trial
        from windtunnel.config.trial import with_overrides
        from windtunnel.trainer import Population
    except ImportError as e:
        print(f"trainer step skipped: {e}", flush=True)
        return
    shape = f"K=1 x {SEQS}x{SEQ_LEN} tokens, d {d}, {LAYERS} layers, data+fwd+bwd+clip+AdamW"
    flops = None
    for impl, kernels, graph in (("eager PyTorch", "torch", False), ("triton", "triton", False),
                                 ("triton + CUDA graph", "triton", True)):
        row = {"kernel": "trainer step", "impl": impl, "shape": shape, "device": _device_name()}
        try:
            pop = Population([with_overrides(reference_trial(d, kernels=kernels), {"train.cuda_graph": graph})])
            flops = pop.model.flops_per_token() * pop.tokens_per_step
            for _ in range(5):  # warm-up: autotuning, the graph's recording
                pop.train_step(pop.lr_factors())
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                pop.train_step(pop.lr_factors())
            torch.cuda.synchronize()
            row["ms"] = round(1000 * (time.perf_counter() - t0) / steps, 4)
            row["tflops"] = round(flops / row["ms"] / 1e9, 1)
            del pop
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        gc.collect()
        torch.cuda.empty_cache()
        ROWS.append(row)
        print(json.dumps(row), flush=True)


def _ratio(kernel, shape_sub, a, b, key="ms"):
    def get(impl):
        for r in ROWS:
            if r["kernel"] == kernel and r["impl"] == impl and shape_sub in r["shape"] and key in r:
                return r[key]
    x, y = get(a), get(b)
    return None if x is None or y is None else x / y


def write(out_dir, argv, started):
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "kernels.json"), ROWS)
    cols = ["kernel", "impl", "shape", "ms", "ms_graph", "gbps", "tflops", "peak_mem_gb", "error"]
    lines = [
        "# Kernel benchmark", "",
        f"Command: `python -m windtunnel.bench.kernels {' '.join(argv)}`  ",
        f"Machine: {_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
        f"CUDA {torch.version.cuda}; {time.strftime('%Y-%m-%d', time.gmtime(started))}, {time.time() - started:.0f} s  ",
        "Forward + backward, median of triton.testing.do_bench: ms with eager launches (host included), "
        "ms_graph as a replayed CUDA graph (GPU time; GB/s and TFLOP/s use it when present). GB/s: the op's fewest "
        "bytes (inputs read once, outputs written once, fwd + bwd) over its time; copy rows move as many bytes as "
        "the rms_norm or swiglu rows after them. "
        "TFLOP/s: attention 7·B·H·T²·D (causal), linear CE 6·K·N·V·C, train step model.flops_per_token(). "
        "peak_mem_gb: allocated above the inputs during one fwd + bwd.", "",
        "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
    ]
    for r in ROWS:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    lines += ["", "## Goals (ratios from this run)", ""]
    for d in (256, 512):
        for K in (1, 16):
            tag = f"({K * SEQS}, {d // HEAD_DIM}, {SEQ_LEN}"
            for a, b in (("triton", "sdpa flash"), ("triton, rope fused", "sdpa flash, rope compiled")):
                for key in ("ms_graph", "ms"):
                    r = _ratio("attention", tag, a, b, key)
                    if r:
                        lines.append(f"- attention d={d} K={K}: {a} / {b} {key} = {r:.2f} (goal <= 1)")
            for kern, sub in (("rms_norm", f"x ({K}, {SEQS * SEQ_LEN}, {d})"), ("rms_norm fwd", f"x ({K}, {SEQS * SEQ_LEN}, {d})"),
                              ("rms_norm bwd", f"x ({K}, {SEQS * SEQ_LEN}, {d})"), ("rms_norm+residual", f"x ({K}, {SEQS * SEQ_LEN}, {d})"),
                              ("swiglu", f"({K}, {SEQS * SEQ_LEN}, {64 * -(-8 * d // (3 * 64))})")):
                tr = next((x for x in ROWS if x["kernel"] == kern and x["impl"] == "triton" and sub in x["shape"] and "gbps" in x), None)
                if tr:
                    idx = ROWS.index(tr)
                    cp = next((x for x in reversed(ROWS[:idx]) if x["kernel"] == "copy"), None)
                    if cp:
                        lines.append(f"- {kern} d={d} K={K}: {tr['gbps']} GB/s = {tr['gbps'] / cp['gbps']:.0%} of copy (goal >= 85%)")
                    pair = next((x for x in ROWS[idx:] if x["impl"] == "torch, 2 launches" and "gbps" in x), None)
                    if kern == "rms_norm" and pair:
                        lines.append(f"- rms_norm d={d} K={K}: fwd + bwd = {tr['gbps'] / pair['gbps']:.0%} of two copies "
                                     "moving the forward's then the backward's bytes in one graph")
            sub = f"h ({K}, {SEQS * SEQ_LEN}, {d})"
            t, te, m = (_ratio("linear_cross_entropy", sub, "triton (fused)", "eager (unfused)", key)
                        for key in ("ms_graph", "ms", "peak_mem_gb"))
            if t and te and m:
                lines.append(f"- linear CE d={d} K={K}: time {t:.2f}x unfused as graphs, {te:.2f}x eager (goal <= 1.1), "
                             f"peak memory {m:.0%} (goal <= 25%)")
    for d in (256, 512):
        for K in (1, 16):
            rows = {x["impl"]: x for x in ROWS if x["kernel"] == "train step" and x["shape"].startswith(f"K={K} x") and f"d {d}," in x["shape"]}
            a, b = rows.get("kernels=triton"), rows.get("kernels=torch (eager)")
            if a and b and "ms" in a and "ms" in b:
                line = f"- train step d={d} K={K}: eager / triton = {b['ms'] / a['ms']:.2f}x (goal >= 1.5)"
                if "ms_graph" in a and "ms_graph" in b:
                    line += f"; both as CUDA graphs {b['ms_graph'] / a['ms_graph']:.2f}x"
                lines.append(line)
    for d in (256, 512):
        t = _ratio("trainer step", f"d {d},", "eager PyTorch", "triton + CUDA graph")
        t0 = _ratio("trainer step", f"d {d},", "eager PyTorch", "triton")
        if t:
            lines.append(f"- trainer step d={d} K=1 (data+fwd+bwd+clip+AdamW, host included): eager PyTorch / "
                         f"Triton + CUDA graph = {t:.2f}x (goal >= 1.5)" + (f"; Triton without the graph {t0:.2f}x" if t0 else ""))
    write_text(os.path.join(out_dir, "kernels.md"), "\n".join(lines) + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/bench")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (slow to compile)")
    p.add_argument("--only", default="", help="comma list of: rms_norm, swiglu, attention, linear_ce, train_step, trainer_step")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench: needs a CUDA GPU")
    torch.manual_seed(0)
    started = time.time()
    only = set(filter(None, args.only.split(",")))
    try:
        for d in (256, 512):
            for K in (1, 16):
                for name, fn in (("rms_norm", lambda: bench_rms_norm(d, K, not args.no_compile)),
                                 ("swiglu", lambda: bench_swiglu(d, K, not args.no_compile)),
                                 ("attention", lambda: bench_attention(d, K)),
                                 ("linear_ce", lambda: bench_linear_ce(d, K, not args.no_compile)),
                                 ("train_step", lambda: bench_train_step(d, K)),
                                 ("trainer_step", lambda: bench_trainer_step(d) if K == 1 else None)):
                    if not only or name in only:
                        fn()
                        torch.cuda.empty_cache()
                write(args.out, argv, started)  # partial results survive a time limit
    finally:
        write(args.out, argv, started)
    print(open(os.path.join(args.out, "kernels.md")).read())
    from windtunnel.kernels import linear_cross_entropy as lce
    print("linear CE grad_weight accumulation: bf16 x bf16 -> fp32 baddbmm" if lce._MIXED_BADDBMM[0]
          else "linear CE grad_weight accumulation: fallback (low-precision temp)")


if __name__ == "__main__":
    main()
