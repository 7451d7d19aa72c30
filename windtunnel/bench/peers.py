"""What a user would run instead of windtunnel: one trial per process, several processes sharing a
GPU (what Ray's fractional GPUs give), eager or under torch.compile. Two models of the reference
shape: Hugging Face transformers' `LlamaForCausalLM` (SDPA attention) and the one-file nanoGPT-style
model (windtunnel/bench/nanogpt.py); both with bf16 autocast, fused AdamW, gradient clipping and
the trial's lr schedule, on the same data windows as the population.

`measure` gives population.py its peer rows. All processes of a run are started together and
stay up; each row is one common window of wall time in which its N processes all train (the
others idle), after their compile and warm-up, so the aggregate counts only steady-state steps
of processes that share the GPU for the whole window.

`Trial` is also the end-to-end peer's trial runner (windtunnel.bench.e2e).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import select
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from windtunnel import data as data_mod
from windtunnel import parametrization as mup
from windtunnel.config.trial import TrialConfig, to_dict, trial_from_dict
from windtunnel.model import flops_per_token
from windtunnel.schedule import lr_factor

PEERS = ("hf_llama", "nanogpt")
MODES = ("eager", "compile")


class HFLoss(nn.Module):
    """LlamaForCausalLM of the trial's shape; forward returns the mean cross-entropy like GPT's."""

    def __init__(self, cfg: TrialConfig, vocab: int):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        m = cfg.model
        self.model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=m.d_model, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads, max_position_embeddings=m.seq_len,
            rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings, use_cache=False,
            attn_implementation="sdpa"))

    def forward(self, idx, targets):
        logits = self.model(input_ids=idx).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def build(peer: str, cfg: TrialConfig, vocab: int) -> nn.Module:
    if peer == "nanogpt":
        from windtunnel.bench.nanogpt import GPT

        return GPT(cfg.model, vocab)
    if peer == "hf_llama":
        return HFLoss(cfg, vocab)
    raise ValueError(f"peer: must be one of {', '.join(PEERS)} (got {peer!r})")


def param_groups(model: nn.Module, cfg: TrialConfig) -> list[dict]:
    """AdamW groups by μP role (windtunnel/parametrization.py): nanoGPT-style models name theirs;
    elsewhere matrices are hidden and vectors are norms (nanoGPT's decay rule)."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        role = model.role(name) if hasattr(model, "role") else "hidden" if p.dim() >= 2 else "vector"
        r = mup.model_rule(role, cfg.model)
        g = groups.setdefault((r.lr_mult, r.wd_mult), {"params": [], "base_lr": cfg.optim.lr * r.lr_mult,
                                                       "lr": cfg.optim.lr * r.lr_mult,
                                                       "weight_decay": cfg.optim.weight_decay * r.wd_mult})
        g["params"].append(p)
    return list(groups.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trial:
    """One peer trial in this process: model, fused AdamW, the trial's data stream and schedule.
    `start` begins another trial of the same shape in place, so a compiled model is reused."""

    def __init__(self, peer: str, cfg: TrialConfig, device: torch.device | None = None):
        self.peer = peer
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.shards = data_mod.load(cfg.data)
        self.vocab = data_mod.model_vocab(cfg.model.vocab_size, cfg.data, self.shards.vocab_size)
        self.model = build(peer, cfg, self.vocab).to(self.device)
        self.forward = self.model
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" \
            else contextlib.nullcontext()
        self.val = torch.from_numpy(self.shards.eval_windows(cfg.train.eval_tokens, cfg.model.seq_len))
        self.start(cfg)

    def compile(self) -> None:
        self.forward = torch.compile(self.model)

    def start(self, cfg: TrialConfig) -> None:
        self.cfg = cfg
        if hasattr(self.model, "reset"):
            self.model.reset(cfg.model, torch.Generator().manual_seed(cfg.train.seed))
        o = cfg.optim
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg), betas=(o.beta1, o.beta2), eps=o.eps,
                                     fused=self.device.type == "cuda")
        self.rng = np.random.default_rng(cfg.train.data_seed if cfg.train.data_seed >= 0 else cfg.train.seed)
        self.tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
        self.total_steps = math.ceil(cfg.train.tokens / self.tokens_per_step)
        self.step_i = 0

    def step(self) -> torch.Tensor:
        c = self.cfg
        w = self.shards.train_windows(self.rng, c.train.batch_size, c.model.seq_len)
        w = torch.from_numpy(w).to(self.device, non_blocking=True)
        f = lr_factor(c.schedule, min(self.step_i, self.total_steps - 1), self.total_steps)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f
        with self.autocast:
            loss = self.forward(w[:, :-1], w[:, 1:])
        loss.backward()
        if c.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_i += 1
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over every token of the validation windows (Population.evaluate's yardstick)."""
        total = 0.0
        for w in self.val.split(self.cfg.train.batch_size):
            w = w.to(self.device)
            with self.autocast:
                total += float(self.forward(w[:, :-1], w[:, 1:])) * len(w)
        return total / len(self.val)

    def train(self) -> float:
        """Train to the budget; the final validation loss (nan if the training loss went non-finite)."""
        for _ in range(self.total_steps - self.step_i):
            loss = self.step()
        return self.evaluate() if math.isfinite(float(loss)) else float("nan")


# -- the benchmark's processes ----------------------------------------------------------------------

def _child(peer: str, cfg_json: str, warmup: int) -> int:
    """One peer process: commands on stdin, one JSON reply a line on the original stdout (anything
    a library prints goes to stderr)."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    trial = Trial(peer, trial_from_dict(json.loads(cfg_json)))

    def reply(**kw):
        out.write(json.dumps(kw) + "\n")
        out.flush()

    def warm(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            trial.step()
        sync(trial.device)
        return time.perf_counter() - t0

    reply(ready=warm(warmup))
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "compile":
            trial.compile()
            reply(seconds=warm(warmup))
        elif msg["cmd"] == "run":  # step until the window [t0, t1] is covered, stamping each step
            if trial.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times, steps = [time.time()], [0]
            while times[-1] < msg["t1"]:
                trial.step()
                sync(trial.device)
                times.append(time.time())
                steps.append(steps[-1] + 1)
            done = np.interp(msg["t1"], times, steps) - np.interp(msg["t0"], times, steps)
            reply(tokens=float(done * trial.tokens_per_step), late=times[0] > msg["t0"],
                  peak_gb=torch.cuda.max_memory_allocated() / 2**30 if trial.device.type == "cuda" else None)
        elif msg["cmd"] == "quit":
            return 0
    return 0


class Fleet:
    """n processes of one peer, started together; commands go to the processes lo..hi-1."""

    def __init__(self, peer: str, cfg: TrialConfig, n: int, warmup: int):
        self.peer = peer
        self.failed = ""
        # -P: the checkout's kernels/ must not shadow the `kernels` package transformers imports
        self.procs = [subprocess.Popen([sys.executable, "-P", "-m", "windtunnel.bench.peers", "--child", peer,
                                        "--config", json.dumps(to_dict(cfg)), "--warmup", str(warmup)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for _ in range(n)]

    def send(self, lo: int, hi: int, **msg) -> None:
        for p in self.procs[lo:hi]:
            p.stdin.write(json.dumps(msg) + "\n")
            p.stdin.flush()

    def replies(self, lo: int, hi: int, timeout: float) -> list[dict] | None:
        """One reply from each of the processes lo..hi-1; None, with `failed` saying why, once a
        process has ended or none replied within timeout seconds (the peer's later rows say so too)."""
        deadline, got = time.time() + timeout, {}
        while not self.failed and len(got) < hi - lo:
            waiting = {p.stdout: i for i, p in enumerate(self.procs[lo:hi], lo) if i not in got}
            ready, _, _ = select.select(list(waiting), [], [], max(0.0, deadline - time.time()))
            if not ready:
                self.failed = f"no reply within {timeout:.0f} s"
            for f in ready:
                line = f.readline()
                if not line:
                    self.failed = f"a process exited ({self.procs[waiting[f]].wait()})"
                    break
                got[waiting[f]] = json.loads(line)
        return None if self.failed else [got[i] for i in range(lo, hi)]

    def ask(self, lo: int, hi: int, timeout: float, **msg) -> list[dict] | None:
        if self.failed:
            return None
        self.send(lo, hi, **msg)
        return self.replies(lo, hi, timeout)

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def measure(cfg: TrialConfig, peers: list[str], modes: list[str], counts: list[int], window: float = 6.0,
            warmup: int = 5, timeout: float = 300.0, report=print) -> list[dict]:
    """Rows {name: PEER:MODE, trials: processes, tokens_per_s, tflops, peak_gb[, note]}. All
    processes start at once; eager rows come first, then every process compiles (the first of
    each peer alone, so the others find its kernels in Inductor's cache), then the compiled rows."""
    vocab = data_mod.model_vocab(cfg.model.vocab_size, cfg.data, data_mod.load(cfg.data).vocab_size)  # prepared once
    fpt = flops_per_token(cfg.model, vocab)
    n = max(counts)
    fleets = [Fleet(p, cfg, n, warmup) for p in peers]
    rows = []
    try:
        for f in fleets:
            f.replies(0, n, timeout)  # started, and warmed up eager
        for mode in modes:
            if mode == "compile":
                for lo, hi in ((0, 1), (1, n)):  # the first of each peer alone: the cold compile
                    for f in fleets:
                        if not f.failed:
                            f.send(lo, hi, cmd="compile")
                    for f in fleets:
                        f.replies(lo, hi, timeout)
            for f in fleets:
                for k in counts:
                    t0 = time.time() + 0.5  # time for the command to reach every process
                    got = f.ask(0, k, window + timeout, cmd="run", t0=t0, t1=t0 + window)
                    row = {"name": f"{f.peer}:{mode}", "trials": k, "tokens_per_s": None, "tflops": None,
                           "peak_gb": None}
                    if got is None:
                        row["note"] = f.failed
                    else:
                        tps = sum(g["tokens"] for g in got) / window
                        row.update(tokens_per_s=tps, tflops=tps * fpt / 1e12,
                                   peak_gb=max((g["peak_gb"] or 0) for g in got) or None)
                        if any(g["late"] for g in got):
                            row["note"] = "a process began after the window opened"
                    rows.append(row)
                    report(row)
    finally:
        for f in fleets:
            f.close()
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="one peer process of windtunnel.bench.population (internal)")
    p.add_argument("--child", choices=PEERS, required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args(argv)
    return _child(a.child, a.config, a.warmup)


if __name__ == "__main__":
    raise SystemExit(main())
