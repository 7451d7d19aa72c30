"""The trial runner: trains one trial, or a population of K same-shape trials at once.

A population stacks K trials on a leading axis (windtunnel/model.py). Each trial keeps its own
init seed, data stream, hyperparameters, schedule, loss and status; the only things shared are
shapes and kernels. A trial that diverges or is pruned leaves the stack: weights, optimizer
state and multipliers are compacted to the live trials, so it frees its compute at once.

On CUDA the whole step (forward, backward, clipping, AdamW) is recorded once as a CUDA graph
and replayed: a one-trial step launches hundreds of small kernels, and the host launching them
would otherwise set the pace. A change of the stack's shape (a trial leaving) records it anew.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from windtunnel import checkpoints, memory
from windtunnel import data as data_mod
from windtunnel.config.trial import RUN_ONLY, TrialConfig, changed_settings, settings, to_dict
from windtunnel.errors import ConfigError
from windtunnel.files import make_folder
from windtunnel.model import Transformer, count_params
from windtunnel.optim import PopulationAdamW, clip_scale_per_trial
from windtunnel.schedule import branch_steps, lr_factor, phase_steps

# Fields that may differ between trials of one population; everything else must match.
PER_TRIAL = {
    "model": ("scale_emb", "scale_depth", "depth_scaling", "init_std", "dim_model_base", "parametrization"),
    "optim": ("lr", "weight_decay"),
    "schedule": ("kind", "warmup", "decay", "decay_shape", "final_lr_frac"),
    "train": ("seed", "data_seed", "diverge_loss", "checkpoint_dir", "init_from"),
}


def bundle_key(cfg: TrialConfig) -> str:
    """Trials with equal keys can train as one population."""
    d = to_dict(cfg)
    for section, names in PER_TRIAL.items():
        for name in names:
            d[section].pop(name)
    return json.dumps(d, sort_keys=True)


@dataclass
class TrialResult:
    status: str
    """ok | diverged | pruned | failed"""
    final_val_loss: float | None
    curve: list[dict] = field(default_factory=list)
    """One point per evaluation: {"step", "tokens", "lr", "train_loss", "val_loss"}."""
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    reason: str = ""
    params: int = 0
    branches: list[dict] = field(default_factory=list)
    """WSD branches: {"decay_from", "tokens", "final_val_loss"} per decay (train.branch_at)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name} asked for, but no CUDA device is visible (allowed: auto, cpu)")
    return torch.device(name)




def _init_threads(device: torch.device) -> int:
    """CPU threads to draw the initial weights with: all of a GPU worker's cores (idle until its
    GPU starts), a CPU worker's own budget (threads_per_worker, which its training keeps to)."""
    if device.type == "cpu":
        return torch.get_num_threads()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _init_trials(model: Transformer, cfgs: list[TrialConfig], threads: int) -> None:
    """Each trial's slice from its own seed, drawn on the CPU (the same weights on any device).
    The trials are drawn in parallel threads (each its own generator and slice, so the weights
    do not depend on the thread count): 64 trials of the 10M proxy are 680M draws, several
    seconds of GPU idle per bundle on one thread."""
    def init(k: int) -> None:
        model.init_trial(k, cfgs[k].model, torch.Generator().manual_seed(cfgs[k].train.seed))
    with ThreadPoolExecutor(max(1, min(threads, len(cfgs)))) as pool:
        list(pool.map(init, range(len(cfgs))))  # list(): re-raises a thread's exception here


class Population:
    """K trials of one shape trained together. `Population([cfg]).run()[0]` is one trial."""

    def __init__(self, cfgs: list[TrialConfig], device: str | torch.device | None = None):
        if not cfgs:
            raise ValueError("a population needs at least one trial")
        key = bundle_key(cfgs[0])
        for c in cfgs[1:]:
            if bundle_key(c) != key:
                raise ConfigError("population: trials differ in a shape-changing field; bundle them separately")
        self.cfgs, self.K = cfgs, len(cfgs)
        c0 = cfgs[0]
        self.device = torch.device(device) if device is not None else resolve_device(c0.train.device)
        self.shards = data_mod.load(c0.data)
        vocab = data_mod.model_vocab(c0.model.vocab_size, c0.data, self.shards.vocab_size)
        memory.check(c0.model, vocab, c0.train.batch_size * c0.model.seq_len, self.device, population=self.K,
                     what="this trial" if self.K == 1 else "this population")  # before it is built
        self.model = Transformer(c0.model, vocab, population=self.K)
        _init_trials(self.model, cfgs, _init_threads(self.device))
        self.model.to(self.device)
        self.opt = PopulationAdamW(self.model, cfgs)
        self.rngs = [np.random.default_rng(c.train.data_seed if c.train.data_seed >= 0 else c.train.seed)
                     for c in cfgs]
        self.tokens_per_step = c0.train.batch_size * c0.model.seq_len
        self.total_steps = math.ceil(c0.train.tokens / self.tokens_per_step)
        every = c0.train.eval_every or c0.train.tokens // 10
        self.eval_interval = max(1, round(every / self.tokens_per_step))
        self.step = 0
        self.live = list(range(self.K))  # slot i of the stack holds trial live[i]
        self.status = ["ok"] * self.K
        self.reasons = [""] * self.K
        self.curves: list[list[dict]] = [[] for _ in range(self.K)]
        self.val = torch.from_numpy(self.shards.eval_windows(c0.train.eval_tokens, c0.model.seq_len))
        self.ln_vocab = math.log(vocab)
        self.diverge_at: list[float | None] = [c.train.diverge_loss or None for c in cfgs]
        # no autocast cache: a cached cast made inside a graph capture would outlive it
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) \
            if self.device.type == "cuda" else torch.autocast("cpu", enabled=False)
        self.forward = torch.compile(self.model) if c0.train.compile else self.model
        self.use_graph = c0.train.cuda_graph and not c0.train.compile and self.device.type == "cuda"
        self.graph = None  # (torch.cuda.CUDAGraph, static batch, static factors, static loss)
        self.eager_steps = 0  # eager steps since the stack last changed shape (the graph's warm-up)
        if c0.train.init_from:
            self._load(Path(c0.train.init_from), branch=True)

    # -- state ----------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "rngs": [r.bit_generator.state for r in self.rngs], "live": self.live,
                "status": self.status, "reasons": self.reasons, "curves": self.curves,
                "configs": [to_dict(c) for c in self.cfgs]}

    def _load(self, path: Path, branch: bool = False) -> None:
        """Resume from a checkpoint of this population, or (branch) start from a saved state of
        one trial or of this population, keeping this run's own schedule."""
        where = "train.init_from" if branch else "train.checkpoint_dir"
        if not path.exists():
            raise ConfigError(f"{where}: no such file {path}")
        if path.is_dir():
            raise ConfigError(f"{where}: {path} is a folder; a saved state file is needed (stable-TOKENS.pt, "
                              "or a checkpoint's latest.pt)")
        try:  # any other file was a pickle or zip traceback; weights_only: a crafted pickle runs nothing
            s = checkpoints.load_verified(path, where, map_location=self.device)
        except ConfigError:
            raise
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            s, reason = None, (str(e).strip().splitlines() or [type(e).__name__])[0]
        else:
            reason = "it holds no trainer state"
        if not isinstance(s, dict) or not {"configs", "rngs", "model", "opt"} <= s.keys():
            raise ConfigError(f"{where}: {path} is not a state saved by windtunnel's trainer ({reason})")
        if not branch:  # resuming: the saved trials must be these (another trial's state would pass as its own)
            changed = [f"trial {k}: {c}" for k, (a, b) in enumerate(zip(s["configs"], self.cfgs))
                       for c in changed_settings(*(settings(x) for x in (a, b)))
                       if c.split()[0] not in (*RUN_ONLY, "train.init_from", "train.save_at")]
            if changed or len(s["configs"]) != len(self.cfgs):
                raise ConfigError(f"train.checkpoint_dir: {path.parent} holds {len(s['configs'])} trial(s) trained "
                                  f"with other settings ({'; '.join(changed[:4]) or f'{len(self.cfgs)} trial(s) now'}); "
                                  "use another checkpoint_dir, or set them back to resume")
        n = len(s["rngs"])
        if n not in (1, self.K):
            raise ConfigError(f"train.init_from: {path} holds {n} trials; this population has {self.K}")
        pick = (lambda xs: [xs[0]] * self.K) if n == 1 else (lambda xs: list(xs))
        if n == self.K and s["live"] != self.live:  # the saved stack had lost trials: match its shape
            self._compact([self.live.index(t) for t in s["live"]])
        with torch.no_grad():
            own = self.model.state_dict()
            for name, t in s["model"].items():
                # branches keep their own μP multipliers (buffers); weights come from the state
                if branch and name.endswith("_mult"):
                    continue
                own[name].copy_(t.expand_as(own[name]))
        self.opt.load_state_dict(s["opt"])
        for r, st in zip(self.rngs, pick(s["rngs"])):
            r.bit_generator.state = st
        self.step = s["step"]
        self.status = pick(s["status"])
        self.reasons = pick(s["reasons"])
        self.curves = [[dict(p) for p in c] for c in pick(s["curves"])]

    @torch.no_grad()
    def _compact(self, keep: list[int]) -> None:
        """Keep only these slots of the stack: parameters, multipliers, optimizer state."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        for p in self.model.parameters():
            p.data = p.data[idx].contiguous()
            p.grad = None
        for mod in self.model.modules():
            for name, buf in mod._buffers.items():
                if buf is not None:
                    mod._buffers[name] = buf[idx].contiguous()
        self.model.K = len(keep)
        self.opt.compact(idx)
        self.live = [self.live[i] for i in keep]
        self.graph, self.eager_steps = None, 0

    def release(self) -> None:
        """Free the CUDA graph's private pool and the gradients now, not when this process exits:
        the next bundle's worker may already wait for this GPU's memory (worker._free_device_memory)."""
        if self.graph is not None:
            self.graph[0].reset()
        self.graph = None
        for p in self.model.parameters():
            p.grad = None

    def _remove(self, trials: dict[int, tuple[str, str]]) -> None:
        """Trials that diverged or were pruned leave the stack: {trial: (status, reason)}."""
        for k, (status, reason) in trials.items():
            self.status[k], self.reasons[k] = status, reason
        if trials:
            self._compact([i for i, t in enumerate(self.live) if t not in trials])

    # -- data and evaluation ----------------------------------------------------------------
    def _batch(self) -> torch.Tensor:
        """Each live trial's next windows from its own data stream: (K, B, T + 1) on the device."""
        c0 = self.cfgs[0]
        w = np.stack([self.shards.train_windows(self.rngs[k], c0.train.batch_size, c0.model.seq_len)
                      for k in self.live])
        return torch.from_numpy(w).to(self.device, non_blocking=True)

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """Validation loss of each live slot: the mean over every token of self.val, whatever the
        batch size it is cut into (a short last chunk weighs by its windows, not as a whole chunk)."""
        B, K = self.cfgs[0].train.batch_size, len(self.live)
        total = torch.zeros(K, device=self.device, dtype=torch.float64)
        for w in self.val.split(B):
            w = w.to(self.device).unsqueeze(0).expand(K, -1, -1)
            with self.autocast:
                total += self.forward(w[..., :-1], w[..., 1:]).double() * w.shape[1]
        return (total / len(self.val)).tolist()

    # -- the loop -------------------------------------------------------------------------------
    def lr_factors(self) -> list[float]:
        """Each live slot's schedule factor at this step."""
        return [lr_factor(self.cfgs[k].schedule, self.step, self.total_steps) for k in self.live]

    def _step(self, windows: torch.Tensor, factors: torch.Tensor, free_grads: bool = False) -> torch.Tensor:
        """Forward, backward, clipping and AdamW: device work only, so a CUDA graph can hold it
        (a recorded step keeps its gradient buffers; an eager one frees them)."""
        with self.autocast:
            loss = self.forward(windows[..., :-1], windows[..., 1:])  # (live,)
        loss.sum().backward()  # each trial's loss reaches only its own slice of the stack
        self.opt.step(factors, clip_scale_per_trial(self.opt.params, self.cfgs[0].optim.grad_clip))
        if free_grads:
            for p in self.opt.params:
                p.grad = None
        return loss.detach()

    def train_step(self, factors: list[float]) -> torch.Tensor:
        """One optimizer step of every live trial; returns their losses (on the device)."""
        windows = self._batch()
        factors = torch.tensor(factors, dtype=torch.float32).to(self.device, non_blocking=True)
        self.step += 1
        if self.graph is not None:
            graph, static_windows, static_factors, static_loss = self.graph
            static_windows.copy_(windows)
            static_factors.copy_(factors)
            graph.replay()
            return static_loss.clone()
        if not self.use_graph:
            return self._step(windows, factors, free_grads=True)
        # Warm-up steps run on a side stream (PyTorch's rule before capture); the third step
        # is recorded, then replayed to take it.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            if self.eager_steps < 2:
                loss = self._step(windows, factors, free_grads=True)
            else:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()  # the warm-up's freed blocks; the graph has its own pool
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    static_loss = self._step(windows, factors)
                self.graph = (graph, windows, factors, static_loss)
                graph.replay()
                loss = static_loss.clone()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.eager_steps += 1
        return loss

    def run(self, on_eval: Callable[[int, int, float], bool] | None = None, progress: bool = False,
            on_checkpoint: Callable[[int], None] | None = None) -> list[TrialResult]:
        """Train to the token budget. on_eval(k, tokens, val_loss) -> True prunes trial k."""
        c0 = self.cfgs[0]
        ckpt_dir = Path(c0.train.checkpoint_dir) if c0.train.checkpoint_dir else None
        latest = ckpt_dir / "latest.pt" if ckpt_dir else None
        if latest is not None and (latest.exists() or checkpoints.previous(latest).exists()):
            self._load(latest if latest.exists() else checkpoints.previous(latest))
        ckpt_interval = max(1, round(c0.train.checkpoint_every / self.tokens_per_step)) \
            if c0.train.checkpoint_every else 0
        save_steps = {math.ceil(t / self.tokens_per_step): t for t in c0.train.save_at}
        if ckpt_dir is not None and (ckpt_interval or save_steps):  # refused now, not at the first save
            make_folder("train.checkpoint_dir", ckpt_dir)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        start, start_step, losses = time.perf_counter(), self.step, []
        while self.step < self.total_steps and self.live:
            factors = self.lr_factors()
            losses.append(self.train_step(factors))
            if None in self.diverge_at:  # default bound: 1.5 × the larger of chance and the first loss
                for k, f in zip(self.live, losses[-1].float().tolist()):
                    self.diverge_at[k] = self.diverge_at[k] or 1.5 * max(self.ln_vocab, f if math.isfinite(f) else 0.0)
            if bar is not None:
                bar.update(1)
            if self.step % self.eval_interval == 0 or self.step == self.total_steps:
                self._record(torch.stack(losses).float().mean(0).tolist(), factors, on_eval)
                losses = []
                if bar is not None:
                    bar.set_postfix(val=min((c[-1]["val_loss"] for c in self.curves if c), default=float("nan")))
            if self.step in save_steps and ckpt_dir is not None:
                checkpoints.save(self._state(), ckpt_dir / f"stable-{save_steps[self.step]}.pt")
            if ckpt_interval and self.step % ckpt_interval == 0 and latest is not None:
                checkpoints.save(self._state(), latest, keep_previous=True)  # a damaged latest falls back
                if on_checkpoint:
                    on_checkpoint(self.step)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        done = (self.step - start_step) * self.tokens_per_step
        results = []
        for k in range(self.K):
            curve = self.curves[k]
            final = curve[-1]["val_loss"] if curve and self.status[k] == "ok" else None
            results.append(TrialResult(
                status=self.status[k], final_val_loss=final, curve=curve,
                tokens=curve[-1]["tokens"] if curve else 0, seconds=seconds,
                tokens_per_s=done / seconds if seconds > 0 else 0.0, reason=self.reasons[k],
                params=count_params(c0.model, self.model.vocab_size)))
        return results

    def _record(self, train_losses: list[float], factors: list[float], on_eval) -> None:
        """An evaluation: curve points, divergence, the pruner; then leavers leave the stack."""
        tokens = self.step * self.tokens_per_step
        val = self.evaluate()
        leaving = {}
        for slot, k in enumerate(self.live):
            tl, vl = train_losses[slot], val[slot]
            self.curves[k].append({"step": self.step, "tokens": tokens, "lr": self.cfgs[k].optim.lr * factors[slot],
                                   "train_loss": tl, "val_loss": vl})
            if not (math.isfinite(tl) and math.isfinite(vl)) or tl > self.diverge_at[k]:
                leaving[k] = ("diverged", f"loss {tl:.4g} at {tokens} tokens (bound {self.diverge_at[k]:.4g})")
            # at the budget's end the pruner still hears the loss, but pruning would save nothing
            # and throw away a finished trial's result
            elif on_eval is not None and on_eval(k, tokens, vl) and self.step < self.total_steps:
                leaving[k] = ("pruned", f"pruned at {tokens} tokens (val loss {vl:.4f})")
        self._remove(leaving)


def train_trial(cfg: TrialConfig, **kwargs) -> TrialResult:
    if cfg.train.branch_at:
        return train_branches(cfg, **kwargs)
    return Population([cfg]).run(**kwargs)[0]


def branch_configs(cfg: TrialConfig) -> tuple[TrialConfig, dict[int, TrialConfig]]:
    """train.branch_at's runs: the stable phase up to the last branch point, saving its state
    at each, and {branch point: the decay run from its state}."""
    from windtunnel.config.trial import with_overrides

    if not cfg.train.checkpoint_dir:
        raise ConfigError("train.checkpoint_dir: must be set to hold the stable states of train.branch_at")
    if cfg.schedule.kind != "wsd" or not 0 < cfg.schedule.decay < 1:
        raise ConfigError("train.branch_at: needs schedule.kind wsd with schedule.decay in (0, 1)")
    # in steps, as Population counts them: each state is saved at ceil(s / tokens per step), and
    # its branch is the WSD run whose decay starts at exactly that step
    tps = cfg.train.batch_size * cfg.model.seq_len
    points = sorted(set(cfg.train.branch_at))
    saved = [math.ceil(s / tps) for s in points]
    for (a, sa), (b, sb) in zip(zip(points, saved), zip(points[1:], saved[1:])):
        if sa == sb:  # one state per step: the second stable-{s}.pt would never be written
            raise ConfigError(f"train.branch_at: {a} and {b} tokens fall in the same step ({sa}, at {tps} "
                              f"tokens per step); keep one of them")
    lengths = [branch_steps(cfg.schedule, n) for n in saved]
    # the stable run warms up exactly as the longest branch does, run on its own
    warmup_steps = phase_steps(cfg.schedule, lengths[-1])[0]
    if warmup_steps > saved[0] or lengths[0] == saved[0]:
        raise ConfigError(f"train.branch_at: {points[0]} tokens is too early: its branch would start within the "
                          f"warmup or have no decay step ({tps} tokens per step)")
    stable = with_overrides(cfg, {"schedule.decay": 0.0, "schedule.warmup": warmup_steps / saved[-1],
                                  "train.tokens": points[-1], "train.save_at": points, "train.branch_at": []})
    branches = {}
    for s, n in zip(points, lengths):
        branches[s] = with_overrides(cfg, {"train.tokens": n * tps, "train.branch_at": [], "train.save_at": [],
                                           "train.init_from": str(Path(cfg.train.checkpoint_dir) / f"stable-{s}.pt"),
                                           "train.checkpoint_dir": str(Path(cfg.train.checkpoint_dir) / f"branch-{s}")})
    return stable, branches


def train_branches(cfg: TrialConfig, **kwargs) -> TrialResult:
    """WSD's data scaling from one run: the stable phase once, then from its state at each
    branch point a decay over `schedule.decay` of that branch's length (branch_configs)."""
    stable, branches = branch_configs(cfg)
    stable_result = Population([stable]).run(**kwargs)[0]
    if stable_result.status != "ok":
        return stable_result
    rows, last, seconds = [], stable_result, stable_result.seconds
    for s, branch in branches.items():
        last = Population([branch]).run(**kwargs)[0]
        seconds += last.seconds
        rows.append({"decay_from": s, "tokens": last.tokens, "final_val_loss": last.final_val_loss,
                     "status": last.status})
    return dataclasses.replace(last, branches=rows, seconds=seconds)
