"""Transfer: the proxy's winning hyperparameters, rescaled to a target shape, made launchable.

    load_winner(path)            a sweep's best.yaml (or RESULTS_DIR/SWEEP holding one)
    load_target(name, overrides) conf/target/<name>.yaml or a YAML path, plus KEY=VALUE
                                    (windtunnel/config/target.py)
    plan(winner, target, laws)   -> Plan: the target's TrialConfig, the large-run section, and
                                    every number with its formula and source (`rows`)

What transfers and how (MiniCPM, arXiv 2404.06395; μTransfer, arXiv 2203.03466):
- μP's *base* hyperparameters (lr, init_std, scale_emb, scale_depth, dim_model_base, weight
  decay, betas) are width-independent: they are copied from the winner. The per-group values
  the target actually uses (hidden lr = lr / m, hidden init std = init_std / sqrt(m), residual
  scale = scale_depth / sqrt(n_layers), logit scale = 1 / m, with m = d_model / dim_model_base)
  come from windtunnel/parametrization.py, the functions the trainers call; nothing here knows
  a μP formula.
- Batch size (tokens per step): a given `batch_size` wins; else MiniCPM's law bs = a / L^b
  (`windtunnel fit batch-size --json`) at the target's loss L, which is a given `loss` or
  L(N, D) of a scaling-law fit (`windtunnel fit scaling-law|wsd --json`) at the target's N and D.
- Token budget D: a given `tokens` wins; else tokens_per_param · N, where tokens_per_param is
  given or, from a scaling-law fit, the one that makes the target's N compute-optimal (not the
  fit's D_opt/N_opt at the proxies' compute: the ratio grows with N when alpha > beta). N counts
  all parameters (embeddings included), as the trial runner reports them (TrialResult.params).
- WSD: the winner's warmup fraction (or the target's `warmup`), a stable phase, and a decay of
  `decay` (default 10%) of the steps, the winner's decay shape; the last stable state is saved
  (train.save_at) so it can be branched into other decays.
- Parallelism: FSDP over all nodes × gpus_per_node GPUs (one data-parallel group). The
  micro-batch is the largest power of two whose memory fits (`memory`), gradient accumulation
  makes up the rest of the batch. Memory model (windtunnel/memory.py, the sweep's too), bytes per GPU:
      states      16 · N / world         fp32 weights, grads, Adam m and v, all sharded
      gathered    2 · (2 · P_block + P_root)   bf16 all-gathered block + the prefetched next one,
                                         and the root (embedding, final norm) kept gathered
      activations micro · T · L · 2 · (9·C + 4·F) + 8·V · min(micro · T, 8192)   bf16 tensors
                                         autograd keeps per token and layer (norm in/out ×2, qkv ×3,
                                         attention out, residual ×2, out-proj input; gate, up, silu,
                                         product), plus fp32 logits and their gradient for one
                                         chunk of the fused cross-entropy
      overhead    2 GiB                  CUDA context, NCCL buffers, allocator slack
  against memory_fraction · gpu_memory_gb.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from windtunnel.config.overrides import load_yaml
from windtunnel.config.target import Target
from windtunnel.config.trial import TrialConfig, to_dict, trial_from_dict
from windtunnel.data import data_vocab
from windtunnel import memory
from windtunnel.errors import ConfigError
from windtunnel.files import slug
from windtunnel.memory import GIB, OVERHEAD_BYTES  # noqa: F401  (export.py and tests import them here)

LR_BATCH_SCALINGS = ("none", "sqrt")


def fmt(x: Any) -> str:
    """How every number is written in transfer.md (tests look numbers up with this)."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x == int(x) and abs(x) < 1e15:
            return str(int(x))
        return f"{x:.6g}"
    return str(x)


# --------------------------------------------------------------------------- winner and laws


@dataclass
class Winner:
    trial: TrialConfig
    sweep: str
    number: int | None
    value: float | None
    path: str


def load_winner(path: str) -> Winner:
    """A sweep's best.yaml ({"sweep", "number", "value", "trial"}) or a folder holding one."""
    p = Path(path)
    if p.is_dir():
        if not (p / "best.yaml").is_file():
            raise ConfigError(_no_winner(p, path))
        p = p / "best.yaml"
    elif not p.exists():
        raise ConfigError(f"{path}: no such file or folder (expected RESULTS_DIR/SWEEP after a sweep, or a best.yaml path)")
    d = load_yaml(p)
    trial = d.get("trial", d)
    if not isinstance(trial, dict):
        raise ConfigError(f"{p}: 'trial' must be a mapping (a TrialConfig as nested dicts)")
    try:
        cfg = trial_from_dict(trial)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    number = d.get("number")
    value = d.get("value")
    return Winner(cfg, str(d.get("sweep") or p.parent.name), None if number is None else int(number),
                  None if value is None else float(value), str(p))


def _no_winner(p: Path, path: str) -> str:
    """Why a folder has no best.yaml: a sweep none of whose trials completed (it said 'not a sweep
    folder'), or no sweep at all."""
    if not (p / "study.journal").exists() and not (p / "trials.csv").is_file():
        return f"{path}: no best.yaml in this folder (expected RESULTS_DIR/SWEEP after a sweep, or a best.yaml path)"
    states = {}
    if (p / "trials.csv").is_file():
        import csv

        with open(p / "trials.csv", newline="") as f:
            for row in csv.DictReader(f):
                states[row.get("state", "?")] = states.get(row.get("state", "?"), 0) + 1
    counts = ", ".join(f"{n} {'failed' if s == 'FAIL' else s.lower()}" for s, n in sorted(states.items()))
    return (f"{path}: no trial of this sweep has completed{f' ({counts})' if counts else ''}, so it has no winner "
            f"(best.yaml) to transfer; trials.csv says why they failed, or let the sweep run on")


def load_law(path: str, kind: str) -> dict:
    """A fit's --json output: kind 'batch-size' and 'horizon' need a, b; 'scaling-law' needs E, A, B,
    alpha, beta (a `fit wsd --json` file is read through its 'scaling_law')."""
    need = {"batch-size": ("a", "b"), "horizon": ("a", "b"), "scaling-law": ("E", "A", "B", "alpha", "beta")}[kind]
    opt = f"--{kind}-law" if kind != "scaling-law" else "--scaling-law"
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{opt}: {path}: no such file (the output of `windtunnel fit {kind} --json`)")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{opt}: {path}: not JSON ({e})") from None
    if kind == "scaling-law" and isinstance(d, dict) and isinstance(d.get("scaling_law"), dict):
        d = d["scaling_law"]
    if not isinstance(d, dict):
        raise ConfigError(f"{opt}: {path}: must hold a JSON object with keys {', '.join(need)}")
    for k in need:
        v = d.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ConfigError(f"{opt}: {path}: key {k!r} must be a finite number (got {v!r})")
    return {**d, "source": str(p)}


def _base_lr(w: TrialConfig, target: Target, laws: Laws, D: int, row, src_w: str) -> float:
    """The target's base lr and its rows: the proxy's lr, then its width, depth and horizon factors."""
    if target.lr is not None:
        return row("optim.lr (base)", target.lr, "given in the target (no factor applied)", f"target {target.name}")
    proxy = row("proxy lr", w.optim.lr, "the winner's μP base lr", src_w)
    row("lr width factor", 1.0, "1: μP's base lr is width-independent (hidden matrices get lr / m, below)",
        "windtunnel.parametrization.rule")
    row("lr depth factor", 1.0, "1: scale_depth / sqrt(n_layers) is meant to keep it; how far it drifts is "
        "measured by `windtunnel fit lr-transfer` on sweeps/lr_depth.yaml (no correction applied)", "docs/laws.md")
    if laws.horizon_law is not None:
        from windtunnel.fits import horizon_factor

        hl, T0 = laws.horizon_law, w.train.tokens
        why = f"(D / proxy tokens)^-b = ({fmt(D)} / {fmt(T0)})^-{fmt(hl['b'])} (lr*(T) = a · T^-b)"
        b_ci = (hl.get("ci") or {}).get("b")
        if b_ci and None not in b_ci:  # the factor's own interval, and how far past the fit's data it reaches
            lo, hi = sorted(horizon_factor({"b": b}, T0, D) for b in b_ci)
            why += f"; b's 95% interval gives {fmt(lo)}–{fmt(hi)}"
        measured = [p["tokens"] for p in hl.get("points", []) if "tokens" in p]
        if measured and D > max(measured):
            why += f"; extrapolated {fmt(D / max(measured))}× past the longest measured run ({fmt(max(measured))} tokens)"
        f = row("lr horizon factor", horizon_factor(hl, T0, D), why, hl["source"])
    else:
        f = row("lr horizon factor", 1.0, "1: off (give --horizon-law FILE.json from `windtunnel fit horizon --json`)",
                "command line")
    return row("optim.lr (base)", proxy * f, "proxy lr × width × depth × horizon factors", "above")


@dataclass
class Laws:
    """Inputs of the batch size and the token budget; a given value always beats a fit."""

    batch_size: int | None = None
    """Tokens per step, given."""
    batch_size_law: dict | None = None
    loss: float | None = None
    """The target's loss, given (for the batch-size law)."""
    scaling_law: dict | None = None
    tokens: int | None = None
    tokens_per_param: float | None = None
    lr_batch_scaling: str = "none"
    """none (MiniCPM: μP's lr is kept) or sqrt (PanGu-π Pro: lr × sqrt(batch / proxy batch))."""
    horizon_law: dict | None = None
    """lr*(T) = a · T^-b (`windtunnel fit horizon --json`): the lr × (D / proxy tokens)^-b; None: off."""

    def __post_init__(self) -> None:
        for name, opt in (("batch_size", "--batch-size"), ("tokens", "--tokens")):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{opt}: must be > 0 (got {v})")
        for name, opt in (("loss", "--loss"), ("tokens_per_param", "--tokens-per-param")):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{opt}: must be a finite number > 0 (got {v})")
        if self.lr_batch_scaling not in LR_BATCH_SCALINGS:
            raise ConfigError(f"--lr-batch-scaling: must be one of {', '.join(LR_BATCH_SCALINGS)} "
                              f"(got {self.lr_batch_scaling!r})")


# --------------------------------------------------------------------------- the plan


@dataclass
class Row:
    name: str
    value: Any
    formula: str
    source: str


@dataclass
class Plan:
    trial: TrialConfig
    large_run: dict
    target: Target
    winner: Winner
    rows: list[Row] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)
    """One per μP role: role, init_std, lr, weight_decay (what the target's trainer uses)."""
    memory: dict = field(default_factory=dict)
    """Bytes per GPU at the chosen micro-batch: states, gathered, activations, overhead, total, budget."""
    warnings: list[str] = field(default_factory=list)
    slurm_time: str = ""

    def value(self, name: str) -> Any:
        for r in self.rows:
            if r.name == name:
                return r.value
        raise KeyError(name)

    def train_yaml(self) -> dict:
        return {**to_dict(self.trial), "large_run": dict(self.large_run)}


def _meta_model(model_cfg, vocab: int):
    """The target model on the meta device: shapes, parameter roles and FLOPs, no memory."""
    import torch

    from windtunnel.model import Transformer

    with torch.device("meta"):
        return Transformer(model_cfg, vocab, population=1)


def duration(hours: float) -> str:
    """A time as a person reads it: 31 s, 12 min, 3.2 h, 4.5 days (it printed 'time≈0.00846886 h')."""
    s = hours * 3600
    if s < 90:
        return f"{max(s, 1):.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _hms(hours: float) -> str:
    s = int(math.ceil(hours * 3600 / 60) * 60)
    return f"{s // 3600}:{s % 3600 // 60:02d}:00"


def plan(winner: Winner, target: Target, laws: Laws) -> Plan:
    from windtunnel import parametrization as mup
    from windtunnel.model import count_params
    from windtunnel.schedule import phase_steps

    w = winner.trial
    src_w = f"sweep {winner.sweep}, trial {winner.number} ({winner.path})"
    rows: list[Row] = []
    warnings: list[str] = []

    def row(name, value, formula, source):
        rows.append(Row(name, value, formula, source))
        return value

    if w.model.parametrization != "mup":
        warnings.append(f"the winner uses parametrization {w.model.parametrization!r}: its hyperparameters carry "
                        "no width-transfer guarantee (μP's do); they are copied as they are")

    # -- model: the target's shape with the winner's μP base hyperparameters
    m = to_dict(w.model)
    base = {}
    for name in ("init_std", "scale_emb", "scale_depth", "dim_model_base"):
        given = getattr(target, name)
        base[name] = given if given is not None else m[name]
        row(f"model.{name}", base[name], "given in the target" if given is not None else "= the winner's (μP: width-independent)",
            f"target {target.name}" if given is not None else src_w)
    m.update(d_model=target.d_model, n_layers=target.n_layers, n_heads=target.n_heads, d_ff=target.d_ff,
             vocab_size=target.vocab_size, seq_len=target.seq_len, tie_embeddings=target.tie_embeddings,
             rope_theta=target.rope_theta, norm_eps=target.norm_eps, **base)
    if "head_dim" in m:  # the target's n_heads decides; a proxy's head_dim would override it
        m["head_dim"] = 0
    if m.get("kernels") == "torch":  # a CPU proxy's choice; the large run picks per device
        m["kernels"] = "auto"
    d = to_dict(w)
    d["model"] = m
    trial0 = trial_from_dict(d)
    mc = trial0.model
    N = row("N (parameters)", count_params(mc, target.vocab_size),
            "V·C·(1 if tied else 2) + L·(4·C² + 3·C·F + 2·C) + C", "windtunnel.model.count_params")
    row("m (width multiplier)", mup.width_mult(mc.d_model, mc.dim_model_base), "d_model / dim_model_base",
                "windtunnel.parametrization.width_mult")
    row("proxy m", mup.width_mult(w.model.d_model, w.model.dim_model_base), "proxy d_model / dim_model_base", src_w)
    head, proxy_head = mc.d_model // mc.n_heads, w.model.d_model // w.model.n_heads
    if head != proxy_head:  # μP here widens by adding heads; attention's 1/sqrt(d_head) is not a μP rule
        warnings.append(f"the target's head dim ({head}) differs from the proxy's ({proxy_head}): μP's transfer "
                        "holds at a fixed head dim (widths grow by heads); sweep the proxy at the target's head dim")

    # -- per-group values through parametrization.py
    model = _meta_model(mc, target.vocab_size)
    roles = sorted(set(model.param_roles().values()), key=mup.ROLES.index)

    # -- batch size (tokens per step)
    T = target.seq_len
    if laws.batch_size is not None:
        bs_opt = row("batch size (tokens, wanted)", float(laws.batch_size), "given (--batch-size)", "command line")
    elif laws.batch_size_law is not None:
        if laws.loss is not None:
            L = row("target loss L", laws.loss, "given (--loss)", "command line")
        elif laws.scaling_law is not None or laws.tokens is not None:
            L = None  # needs D: computed below, after the token budget
        else:
            raise ConfigError("--batch-size-law: needs the target's loss: give --loss L or --scaling-law FILE.json")
        bs_opt = None
    else:
        raise ConfigError("batch size: give --batch-size TOKENS or --batch-size-law FILE.json "
                          "(`windtunnel fit batch-size --json`)")

    # -- token budget
    if laws.tokens is not None:
        D = row("D (tokens)", laws.tokens, "given (--tokens)", "command line")
    else:
        if laws.tokens_per_param is not None:
            r = row("tokens per parameter", laws.tokens_per_param, "given (--tokens-per-param)", "command line")
        elif laws.scaling_law is not None and all(laws.scaling_law.get(k, 0) > 0 for k in ("A", "B", "alpha", "beta")):
            from windtunnel.fits import optimal_tokens

            sl = laws.scaling_law
            r = row("tokens per parameter", optimal_tokens(sl, N) / N,
                    f"D_opt(N) / N = (beta·B / (alpha·A))^(1/beta) · N^(alpha/beta - 1) = "
                    f"({fmt(sl['beta'])}·{fmt(sl['B'])} / ({fmt(sl['alpha'])}·{fmt(sl['A'])}))^(1/{fmt(sl['beta'])}) "
                    f"· N^({fmt(sl['alpha'])}/{fmt(sl['beta'])} - 1): compute-optimal at the target's N", sl["source"])
        else:
            raise ConfigError("token budget: give --tokens N, --tokens-per-param R or --scaling-law FILE.json "
                              "(`windtunnel fit scaling-law --json`)")
        D = row("D (tokens)", int(round(r * N)), "tokens per parameter × N", "above")

    if bs_opt is None:
        if L is None:
            if laws.scaling_law is None:
                raise ConfigError("--batch-size-law: needs the target's loss: give --loss L or --scaling-law FILE.json")
            from windtunnel.fits import predict_loss

            sl = laws.scaling_law
            L = row("target loss L", float(predict_loss(sl, N, D)),
                    f"E + A/N^alpha + B/D^beta = {fmt(sl['E'])} + {fmt(sl['A'])}/N^{fmt(sl['alpha'])} "
                    f"+ {fmt(sl['B'])}/D^{fmt(sl['beta'])}", sl["source"])
        bl = laws.batch_size_law
        bs_opt = row("batch size (tokens, wanted)", bl["a"] / L ** bl["b"],
                     f"a / L^b = {fmt(bl['a'])} / L^{fmt(bl['b'])} (MiniCPM's law)", bl["source"])
    seqs_wanted = row("batch size (sequences, wanted)", bs_opt / T, "tokens / seq_len", "above")

    # -- the base lr: the proxy's, × width, depth and horizon factors (each its own row)
    lr = _base_lr(w, target, laws, D, row, src_w)

    # -- parallelism and memory
    world = row("GPUs (world size)", target.world, "nodes × gpus_per_node", f"target {target.name}")
    budget = target.memory_fraction * target.gpu_memory_gb * GIB

    def need(micro: int) -> float:  # windtunnel/memory.py: the sweep's and the trainer's model too
        return memory.estimate(mc, target.vocab_size, micro * T, world=world, fsdp=True).total

    if need(1) > budget:
        one = memory.estimate(mc, target.vocab_size, T, world=world, fsdp=True)
        raise ConfigError(f"target.gpu_memory_gb: {fmt(need(1) / GIB)} GiB per GPU needed at micro-batch 1 "
                          f"(states {fmt(one.states / GIB)}, activations {fmt(one.activations / GIB)}) but "
                          f"{fmt(target.memory_fraction)} × {fmt(target.gpu_memory_gb)} GiB available: "
                          f"add GPUs (nodes=, gpus_per_node=) or shorten seq_len (got {fmt(target.gpu_memory_gb)})")
    per_gpu = max(1.0, seqs_wanted / world)
    micro = 1
    while micro * 2 <= per_gpu and need(micro * 2) <= budget:
        micro *= 2
    accum = max(1, round(per_gpu / micro))
    row("micro-batch (sequences per GPU)", micro,
        "largest power of two <= wanted sequences / GPUs whose memory fits", "memory model")
    row("gradient accumulation", accum, "round(wanted sequences / (GPUs × micro-batch)), >= 1", "above")
    seqs = row("batch size (sequences)", world * micro * accum, "GPUs × micro-batch × accumulation", "above")
    bs_tokens = row("batch size (tokens)", seqs * T, "sequences × seq_len", "above")
    if abs(bs_tokens / bs_opt - 1) > 0.25:
        warnings.append(f"the batch ({fmt(bs_tokens)} tokens) is {fmt(bs_tokens / bs_opt)}× the wanted "
                        f"{fmt(bs_opt)}: the GPU count sets the smallest batch (GPUs × 1 × seq_len)")
    at = memory.estimate(mc, target.vocab_size, micro * T, world=world, fsdp=True)
    mem = {"states": at.states, "gathered": at.gathered, "activations": at.activations,
           "overhead": at.overhead, "total": at.total, "budget": budget}
    row("memory per GPU (GiB)", need(micro) / GIB, "states + gathered + activations + overhead", "memory model")

    # -- lr and the batch
    proxy_bs = w.train.batch_size * w.model.seq_len
    row("proxy batch size (tokens)", proxy_bs, "proxy batch_size × seq_len", src_w)
    if laws.lr_batch_scaling == "sqrt":
        lr = row("optim.lr", lr * math.sqrt(bs_tokens / proxy_bs),
                 "base lr × sqrt(batch tokens / proxy batch tokens) (PanGu-π Pro)", "--lr-batch-scaling sqrt")
    else:
        row("optim.lr", lr, "base lr, kept (MiniCPM: μP's lr does not follow the batch)", "--lr-batch-scaling none")

    # -- schedule
    if D < bs_tokens:  # ceil(D / batch) would make it one step, silently
        given = "--tokens" if laws.tokens is not None else "--tokens-per-param" if laws.tokens_per_param is not None \
            else "--scaling-law (its tokens per parameter)"
        raise ConfigError(f"{given}: a token budget of {D:,} is under one step's batch of {bs_tokens:,} tokens "
                          f"(allowed: >= {bs_tokens:,})")
    steps = row("total steps", math.ceil(D / bs_tokens), "ceil(D / batch tokens)", "above")
    sched = to_dict(w.schedule)
    warm = target.warmup if target.warmup is not None else sched["warmup"]
    sched.update(kind="wsd", warmup=warm, decay=target.decay)
    if sched["warmup"] + sched["decay"] > 1:
        raise ConfigError(f"target.warmup: warmup + decay must be <= 1 (got {fmt(warm)} + {fmt(target.decay)})")
    row("schedule.warmup (fraction)", warm, "given in the target" if target.warmup is not None else "= the winner's",
        f"target {target.name}" if target.warmup is not None else src_w)
    row("schedule.decay (fraction)", target.decay, "target.decay (MiniCPM: ~10%)", f"target {target.name}")

    # -- trainer config
    seed = target.seed if target.seed is not None else w.train.seed
    run_name = target.run_name or f"{target.name}-{winner.sweep}-{winner.number if winner.number is not None else 'best'}"
    run_dir = f"runs/{slug(run_name)}"
    ckpt_tokens = target.checkpoint_every or max(bs_tokens, (steps // 50) * bs_tokens)
    d = to_dict(trial0)
    d["optim"]["lr"] = lr
    d["schedule"] = sched
    trial_sched = trial_from_dict({**d, "schedule": sched}).schedule
    warm_steps, decay_start = phase_steps(trial_sched, steps)
    row("warmup steps", warm_steps, "round(warmup × total steps)", "windtunnel.schedule.phase_steps")
    row("stable steps", decay_start - warm_steps, "decay start − warmup steps", "windtunnel.schedule.phase_steps")
    row("decay steps", steps - decay_start, "total − round(decay × total)", "windtunnel.schedule.phase_steps")
    row("decay shape", sched["decay_shape"], "= the winner's", src_w)
    stable_save = decay_start * bs_tokens
    d["train"].update(tokens=int(steps * bs_tokens), batch_size=int(seqs), seed=seed, device=target.device,
                      checkpoint_dir=f"{run_dir}/checkpoints", checkpoint_every=int(ckpt_tokens),
                      save_at=[int(stable_save)] if 0 < stable_save < steps * bs_tokens else [],
                      init_from="", eval_every=0, diverge_loss=0.0)
    if target.data_source:
        d["data"]["source"] = target.data_source
    trial = trial_from_dict(d)
    proxy_vocab = w.model.vocab_size or data_vocab(w.data)
    if laws.scaling_law is not None and proxy_vocab and proxy_vocab != target.vocab_size:
        warnings.append(f"the scaling law counts all parameters, embeddings included, fitted at the proxies' vocabulary "
                        f"({proxy_vocab}); the target's is {target.vocab_size}, so its N carries "
                        f"{fmt(target.vocab_size / proxy_vocab)}x the embedding the law saw: read L and D as estimates")
    vocab = data_vocab(trial.data)
    if vocab and target.vocab_size and target.vocab_size < vocab:  # the run would stop at its start
        raise ConfigError(f"target.vocab_size: {target.vocab_size} is smaller than the data's vocabulary ({vocab}, "
                          f"data.source {trial.data.source}): set vocab_size={vocab}, or give other data (data_source=PATH)")
    row("train.tokens", trial.train.tokens, "total steps × batch tokens", "above")
    row("checkpoint every (tokens)", int(ckpt_tokens), "target.checkpoint_every, or ~1/50 of the run in whole steps",
        f"target {target.name}")
    row("stable save (tokens)", int(stable_save), "decay start step × batch tokens: the last stable state",
        "windtunnel.schedule.phase_steps")

    # -- per-group values and forward multipliers, from parametrization.py
    groups = []
    for role in roles:
        r = mup.model_rule(role, trial.model)
        groups.append({"role": role, "init_std": r.init_std, "lr": lr * r.lr_mult,
                       "weight_decay": trial.optim.weight_decay * r.wd_mult})
        row(f"{role}: init std", r.init_std, "parametrization.rule(role).init_std (0 = ones)",
            "windtunnel.parametrization.model_rule")
        row(f"{role}: lr", lr * r.lr_mult, "optim.lr × parametrization.rule(role).lr_mult",
            "windtunnel.parametrization.model_rule")
        row(f"{role}: weight decay", trial.optim.weight_decay * r.wd_mult,
            "optim.weight_decay × rule(role).wd_mult", "windtunnel.parametrization.model_rule")
    mult = mup.model_multipliers(trial.model)
    row("embedding multiplier", mult.embedding, "scale_emb (sp: 1)", "windtunnel.parametrization.model_multipliers")
    row("residual multiplier", mult.residual, "scale_depth / sqrt(n_layers) (sp: 1)",
        "windtunnel.parametrization.model_multipliers")
    row("logit multiplier", mult.logit, "1 / m = dim_model_base / d_model (sp: 1)",
        "windtunnel.parametrization.model_multipliers")

    # -- wall time
    fpt = row("FLOPs per token", float(model.flops_per_token()), "6 × matmul params + 6·L·C·T (PaLM)",
              "windtunnel.model.Transformer.flops_per_token")
    hours = row("estimated hours", trial.train.tokens * fpt / (world * target.gpu_tflops * 1e12 * target.mfu) / 3600,
                "tokens × FLOPs per token / (GPUs × gpu_tflops × mfu)", f"target {target.name}")
    slurm_hours = min(target.max_hours, hours * 1.15 + 0.25)
    if hours * 1.15 + 0.25 > target.max_hours:
        warnings.append(f"the run needs ~{duration(hours)} but one job gets {duration(target.max_hours)}: resubmit "
                        "launch.sbatch, it resumes from the latest checkpoint")

    large_run = {"run_name": run_name, "run_dir": run_dir, "micro_batch": micro, "grad_accum": accum,
                 "tracking_uri": target.tracking_uri, "log_every": 1, "steps": 0, "stop_after_steps": 0, "keep_last": 2,
                 "source_sweep": winner.sweep, "source_trial": -1 if winner.number is None else int(winner.number)}
    p = Plan(trial=trial, large_run=large_run, target=target, winner=winner, rows=rows, groups=groups,
             memory=mem, warnings=warnings, slurm_time=_hms(slurm_hours))
    return p
