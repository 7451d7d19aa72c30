"""The steps of a transfer plan (windtunnel/transfer.py `plan` runs them in this order).

Each step takes what the steps before it decided, writes its numbers to the Derivation (every
number with its formula and source: transfer.md's table) and returns what the next steps need:

    target_model     the target's shape with the winner's μP base hyperparameters; N
    batch_input      a given batch size, or the loss the batch-size law is read at
    token_budget     D: given, or tokens per parameter × N
    wanted_batch     the batch the laws ask for, in tokens
    base_lr          the proxy's lr × width, depth and horizon factors (windtunnel/transfer_lr.py)
    fit_batch        micro-batch per GPU (the memory model, windtunnel/memory.py) and accumulation
    lr_for_batch     the lr kept, or scaled with the batch (windtunnel/transfer_lr.py)
    wsd_schedule     total steps, warmup and decay fractions
    trainer_config   the target's TrialConfig: steps, checkpoints, the stable save, the data
    large_run_section  train.yaml's large_run section: run name and folder, micro-batch, accumulation
    mup_groups       the per-group init std, lr and weight decay, from parametrization.py
    wall_time        hours at the target's FLOP rate, and the Slurm time limit
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from windtunnel import memory
from windtunnel.config.trial import TrialConfig, to_dict, trial_from_dict
from windtunnel.data import data_vocab
from windtunnel.errors import ConfigError
from windtunnel.files import slug
from windtunnel.transfer_inputs import Laws, Winner

# The Slurm time limit: the estimate (which assumes target.mfu throughout) × 1.15, plus 15 minutes.
TIME_SLACK, TIME_EXTRA_HOURS = 1.15, 0.25


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


@dataclass
class Row:
    name: str
    value: Any
    formula: str
    source: str


@dataclass
class Derivation:
    """What the steps write as they go: every number with its formula and source, and warnings."""

    winner: Winner
    target: Any
    """The target (windtunnel.config.target.Target): its shape, cluster and run settings."""
    rows: list[Row] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lr_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    """By row name, the measured range of each number the lr is a product of: the proxy lr's tie range and
    the depth, horizon and batch factors' 95% intervals."""

    def row(self, name: str, value, formula: str, source: str):
        self.rows.append(Row(name, value, formula, source))
        return value

    @property
    def from_winner(self) -> str:
        w = self.winner
        return f"sweep {w.sweep}, {w.which} ({w.path})"

    @property
    def from_target(self) -> str:
        return f"target {self.target.name}"


@dataclass
class Batch:
    """How the batch is made: world × micro × accum sequences a step, and the memory that needs."""

    micro: int
    accum: int
    sequences: int
    tokens: int
    memory: dict


def meta_model(model_cfg, vocab: int):
    """The target model on the meta device: shapes, parameter roles and FLOPs, no memory."""
    import torch

    from windtunnel.model import Transformer

    with torch.device("meta"):
        return Transformer(model_cfg, vocab, population=1)


def target_model(d: Derivation) -> tuple[TrialConfig, int]:
    """The winner's trial at the target's shape (μP base hyperparameters copied unless the target
    gives them), and its parameter count N."""
    from windtunnel import parametrization as mup
    from windtunnel.model import count_params

    w, target = d.winner.trial, d.target
    if w.model.parametrization != "mup":
        d.warnings.append(f"the winner uses parametrization {w.model.parametrization!r}: its hyperparameters carry "
                          "no width-transfer guarantee (μP's do); they are copied as they are")
    m = to_dict(w.model)
    base = {}
    for name in ("init_std", "scale_emb", "scale_depth", "dim_model_base"):
        given = getattr(target, name)
        base[name] = given if given is not None else m[name]
        d.row(f"model.{name}", base[name],
              "given in the target" if given is not None else "= the winner's (μP: width-independent)",
              d.from_target if given is not None else d.from_winner)
    m.update(d_model=target.d_model, n_layers=target.n_layers, n_heads=target.n_heads, d_ff=target.d_ff,
             vocab_size=target.vocab_size, seq_len=target.seq_len, tie_embeddings=target.tie_embeddings,
             rope_theta=target.rope_theta, norm_eps=target.norm_eps, **base)
    if "head_dim" in m:  # the target's n_heads decides; a proxy's head_dim would override it
        m["head_dim"] = 0
    if m.get("kernels") == "torch":  # a CPU proxy's choice; the large run picks per device
        m["kernels"] = "auto"
    trial = trial_from_dict({**to_dict(w), "model": m})
    mc = trial.model
    N = d.row("N (parameters)", count_params(mc, target.vocab_size),
              "V·C·(1 if tied else 2) + L·(4·C² + 3·C·F + 2·C) + C", "windtunnel.model.count_params")
    d.row("m (width multiplier)", mup.width_mult(mc.d_model, mc.dim_model_base), "d_model / dim_model_base",
          "windtunnel.parametrization.width_mult")
    d.row("proxy m", mup.width_mult(w.model.d_model, w.model.dim_model_base), "proxy d_model / dim_model_base",
          d.from_winner)
    head, proxy_head = mc.d_model // mc.n_heads, w.model.d_model // w.model.n_heads
    if head != proxy_head:  # μP here widens by adding heads; attention's 1/sqrt(d_head) is not a μP rule
        d.warnings.append(f"the target's head dim ({head}) differs from the proxy's ({proxy_head}): μP's transfer "
                          "holds at a fixed head dim (widths grow by heads); sweep the proxy at the target's head dim")
    return trial, N


def batch_input(d: Derivation, laws: Laws) -> tuple[float | None, float | None]:
    """(the batch in tokens if given, the target's loss if given): the batch-size law needs a loss,
    which without --loss comes from the scaling law at the token budget (wanted_batch)."""
    if laws.batch_size is not None:
        return d.row("batch size (tokens, wanted)", float(laws.batch_size), "given (--batch-size)", "command line"), None
    if laws.batch_size_law is None:
        raise ConfigError("batch size: give --batch-size TOKENS or --batch-size-law FILE.json "
                          "(`windtunnel fit batch-size --json`)")
    if laws.loss is not None:
        return None, d.row("target loss L", laws.loss, "given (--loss)", "command line")
    if laws.scaling_law is None and laws.tokens is None:
        raise ConfigError("--batch-size-law: needs the target's loss: give --loss L or --scaling-law FILE.json")
    return None, None


def token_budget(d: Derivation, laws: Laws, N: int) -> int:
    """D: --tokens, or tokens per parameter (given, or compute-optimal at N under the scaling law) × N."""
    if laws.tokens is not None:
        return d.row("D (tokens)", laws.tokens, "given (--tokens)", "command line")
    sl, span = laws.scaling_law, ""
    if laws.tokens_per_param is not None:
        r = d.row("tokens per parameter", laws.tokens_per_param, "given (--tokens-per-param)", "command line")
    elif sl is not None and all(sl.get(k, 0) > 0 for k in ("A", "B", "alpha", "beta")):
        from windtunnel.fits import optimal_tokens, optimal_tokens_interval

        ci = optimal_tokens_interval(sl, N)
        r = d.row("tokens per parameter", optimal_tokens(sl, N) / N,
                  f"D_opt(N) / N = (beta·B / (alpha·A))^(1/beta) · N^(alpha/beta - 1) = "
                  f"({fmt(sl['beta'])}·{fmt(sl['B'])} / ({fmt(sl['alpha'])}·{fmt(sl['A'])}))^(1/{fmt(sl['beta'])}) "
                  f"· N^({fmt(sl['alpha'])}/{fmt(sl['beta'])} - 1): compute-optimal at the target's N"
                  + (f"; the fit's bootstrap refits give 95% interval {ci[0]:.3g}–{ci[1]:.3g}" if ci else
                     "; no interval (fit it with --bootstrap K)"), sl["source"])
        n_max = (sl.get("N_range") or [None, None])[1]
        if n_max and N > 2 * n_max:  # the law's N term was measured only below n_max
            d.warnings.append(f"the scaling law was fitted on models up to {n_max:.3g} parameters; the target's "
                              f"{N:.3g} is {N / n_max:.1f}x that, so its token budget is an extrapolation")
        if ci:
            span = f"; 95% interval {ci[0] * N:.3g}–{ci[1] * N:.3g}"
            if ci[1] > 10 * ci[0]:
                d.warnings.append(f"the scaling law does not pin the target's token budget: tokens per parameter "
                                  f"{ci[0]:.3g}–{ci[1]:.3g} (95%, the fit's refits at the target's N); give --tokens")
    else:
        raise ConfigError("token budget: give --tokens N, --tokens-per-param R or --scaling-law FILE.json "
                          "(`windtunnel fit scaling-law --json`)")
    return d.row("D (tokens)", int(round(r * N)), "tokens per parameter × N" + span, "above")


def wanted_batch(d: Derivation, laws: Laws, given: float | None, L: float | None, N: int, D: int) -> float:
    """The batch in tokens: the given one, or MiniCPM's law a / L^b at the target's loss (given, or
    L(N, D) of the scaling law)."""
    if given is None:
        if L is None:
            sl = laws.scaling_law
            if sl is None:
                raise ConfigError("--batch-size-law: needs the target's loss: give --loss L or --scaling-law FILE.json")
            from windtunnel.fits import loss_interval, predict_loss

            ci = loss_interval(sl, N, D)
            L = d.row("target loss L", float(predict_loss(sl, N, D)),
                      f"E + A/N^alpha + B/D^beta = {fmt(sl['E'])} + {fmt(sl['A'])}/N^{fmt(sl['alpha'])} "
                      f"+ {fmt(sl['B'])}/D^{fmt(sl['beta'])}"
                      + (f"; the fit's bootstrap refits give 95% interval {fmt(ci[0])}–{fmt(ci[1])}" if ci else ""),
                      sl["source"])
        from windtunnel.fits import batch_size_interval

        bl = laws.batch_size_law
        ci = batch_size_interval(bl, L)
        given = d.row("batch size (tokens, wanted)", bl["a"] / L ** bl["b"],
                      f"a / L^b = {fmt(bl['a'])} / L^{fmt(bl['b'])} (MiniCPM's law)"
                      + (f"; the law's bootstrap refits give 95% interval {ci[0]:.3g}–{ci[1]:.3g} at this L" if ci else ""),
                      bl["source"])
    d.row("batch size (sequences, wanted)", given / d.target.seq_len, "tokens / seq_len", "above")
    return given


def fit_batch(d: Derivation, model_cfg, wanted_tokens: float) -> Batch:
    """FSDP over every GPU: the largest power-of-two micro-batch whose memory (windtunnel/memory.py)
    fits, gradient accumulation making up the rest of the wanted batch."""
    target, T = d.target, d.target.seq_len
    world = d.row("GPUs (world size)", target.world, "nodes × gpus_per_node", d.from_target)
    budget = target.memory_fraction * target.gpu_memory_gb * memory.GIB

    def need(micro: int) -> memory.Estimate:
        return memory.estimate(model_cfg, target.vocab_size, micro * T, world=world, fsdp=True)

    if need(1).total > budget:
        one, gib = need(1), lambda x: fmt(x / memory.GIB)  # noqa: E731
        raise ConfigError(f"target.gpu_memory_gb: {gib(one.total)} GiB per GPU needed at micro-batch 1 "
                          f"(states {gib(one.states)}, activations {gib(one.activations)}) but "
                          f"{fmt(target.memory_fraction)} × {fmt(target.gpu_memory_gb)} GiB available: "
                          f"add GPUs (nodes=, gpus_per_node=) or shorten seq_len (got {fmt(target.gpu_memory_gb)})")
    per_gpu = max(1.0, wanted_tokens / T / world)
    micro = 1
    while micro * 2 <= per_gpu and need(micro * 2).total <= budget:
        micro *= 2
    accum = max(1, round(per_gpu / micro))
    d.row("micro-batch (sequences per GPU)", micro,
          "largest power of two <= wanted sequences / GPUs whose memory fits", "memory model")
    d.row("gradient accumulation", accum, "round(wanted sequences / (GPUs × micro-batch)), >= 1", "above")
    seqs = d.row("batch size (sequences)", world * micro * accum, "GPUs × micro-batch × accumulation", "above")
    tokens = d.row("batch size (tokens)", seqs * T, "sequences × seq_len", "above")
    if abs(tokens / wanted_tokens - 1) > 0.25:
        d.warnings.append(f"the batch ({fmt(tokens)} tokens) is {fmt(tokens / wanted_tokens)}× the wanted "
                          f"{fmt(wanted_tokens)}: the GPU count sets the smallest batch (GPUs × 1 × seq_len)")
    at = need(micro)
    d.row("memory per GPU (GiB)", at.total / memory.GIB, "states + gathered + activations + overhead", "memory model")
    mem = {part: getattr(at, part) for part in memory.PARTS} | {"total": at.total, "budget": budget}
    return Batch(micro=micro, accum=accum, sequences=seqs, tokens=tokens, memory=mem)


def wsd_schedule(d: Derivation, laws: Laws, D: int, batch_tokens: int) -> tuple[int, dict]:
    """(total steps, the schedule section): WSD with the winner's warmup fraction (or the target's)
    and decay shape, and the target's decay fraction."""
    target = d.target
    if D < batch_tokens:  # ceil(D / batch) would make it one step, silently
        given = "--tokens" if laws.tokens is not None else "--tokens-per-param" if laws.tokens_per_param is not None \
            else "--scaling-law (its tokens per parameter)"
        raise ConfigError(f"{given}: a token budget of {D:,} is under one step's batch of {batch_tokens:,} tokens "
                          f"(allowed: >= {batch_tokens:,})")
    steps = d.row("total steps", math.ceil(D / batch_tokens), "ceil(D / batch tokens)", "above")
    sched = to_dict(d.winner.trial.schedule)
    warm = target.warmup if target.warmup is not None else sched["warmup"]
    sched.update(kind="wsd", warmup=warm, decay=target.decay)
    if sched["warmup"] + sched["decay"] > 1:
        raise ConfigError(f"target.warmup: warmup + decay must be <= 1 (got {fmt(warm)} + {fmt(target.decay)})")
    given = target.warmup is not None
    d.row("schedule.warmup (fraction)", warm, "given in the target" if given else "= the winner's",
          d.from_target if given else d.from_winner)
    d.row("schedule.decay (fraction)", target.decay, "target.decay (MiniCPM: ~10%)", d.from_target)
    return steps, sched


def run_name(d: Derivation) -> str:
    """target.run_name, or <target>-<sweep>-<trial number>."""
    w = d.winner
    return d.target.run_name or f"{d.target.name}-{w.sweep}-{w.number if w.number is not None else 'best'}"


def run_dir(d: Derivation) -> str:
    """Where the run keeps its loss log and checkpoints, relative to train.yaml's folder."""
    return f"runs/{slug(run_name(d))}"


def trainer_config(d: Derivation, laws: Laws, trial0: TrialConfig, lr: float, sched: dict, steps: int,
                   batch: Batch) -> TrialConfig:
    """The target's TrialConfig: the lr, the schedule, the budget in whole steps, checkpoints about
    every 1/50 of the run, and the last stable state saved (to branch other decays from)."""
    from windtunnel.schedule import phase_steps

    target, w, bs = d.target, d.winner.trial, batch.tokens
    ckpt_tokens = target.checkpoint_every or max(bs, (steps // 50) * bs)
    cfg = to_dict(trial0)
    cfg["optim"]["lr"] = lr
    cfg["schedule"] = sched
    warm_steps, decay_start = phase_steps(trial_from_dict(cfg).schedule, steps)
    d.row("warmup steps", warm_steps, "round(warmup × total steps)", "windtunnel.schedule.phase_steps")
    d.row("stable steps", decay_start - warm_steps, "decay start − warmup steps", "windtunnel.schedule.phase_steps")
    d.row("decay steps", steps - decay_start, "total − round(decay × total)", "windtunnel.schedule.phase_steps")
    d.row("decay shape", sched["decay_shape"], "= the winner's", d.from_winner)
    stable_save = decay_start * bs
    cfg["train"].update(tokens=int(steps * bs), batch_size=int(batch.sequences),
                        seed=target.seed if target.seed is not None else w.train.seed, device=target.device,
                        checkpoint_dir=f"{run_dir(d)}/checkpoints", checkpoint_every=int(ckpt_tokens),
                        save_at=[int(stable_save)] if 0 < stable_save < steps * bs else [],
                        init_from="", eval_every=0, diverge_loss=0.0)
    if target.data_source:
        cfg["data"]["source"] = target.data_source
        if target.data_source != w.data.source:  # the largest error the validations found (docs/laws.md)
            d.warnings.append(f"the proxy's lr was searched on data.source {w.data.source}; the target trains on "
                              f"{target.data_source}: if that is other text, its optimal lr may differ (the corpus "
                              "was the validations' largest lr error: docs/laws.md); search the proxy on the target's data")
    trial = trial_from_dict(cfg)
    proxy_vocab = w.model.vocab_size or data_vocab(w.data)
    if laws.scaling_law is not None and proxy_vocab and proxy_vocab != target.vocab_size:
        d.warnings.append(f"the scaling law counts all parameters, embeddings included, fitted at the proxies' "
                          f"vocabulary ({proxy_vocab}); the target's is {target.vocab_size}, so its N carries "
                          f"{fmt(target.vocab_size / proxy_vocab)}x the embedding the law saw: read L and D as estimates")
    vocab = data_vocab(trial.data)
    if vocab and target.vocab_size and target.vocab_size < vocab:  # the run would stop at its start
        raise ConfigError(f"target.vocab_size: {target.vocab_size} is smaller than the data's vocabulary ({vocab}, "
                          f"data.source {trial.data.source}): set vocab_size={vocab}, or give other data (data_source=PATH)")
    d.row("train.tokens", trial.train.tokens, "total steps × batch tokens", "above")
    d.row("checkpoint every (tokens)", int(ckpt_tokens), "target.checkpoint_every, or ~1/50 of the run in whole steps",
          d.from_target)
    d.row("stable save (tokens)", int(stable_save), "decay start step × batch tokens: the last stable state",
          "windtunnel.schedule.phase_steps")
    return trial


def large_run_section(d: Derivation, batch: Batch) -> dict:
    """train.yaml's large_run section: the run's name and folder, how a step is made of
    micro-batches, the MLflow server, and the sweep and trial it was transferred from."""
    w = d.winner
    return {"run_name": run_name(d), "run_dir": run_dir(d), "micro_batch": batch.micro, "grad_accum": batch.accum,
            "tracking_uri": d.target.tracking_uri, "log_every": 1, "steps": 0, "stop_after_steps": 0, "keep_last": 2,
            "source_sweep": w.sweep, "source_trial": -1 if w.number is None else int(w.number)}


def mup_groups(d: Derivation, model, trial: TrialConfig) -> list[dict]:
    """One per μP role of the model: the init std, lr and weight decay parametrization.py gives it,
    and the forward multipliers: what the target's trainer will use, computed by the same rules."""
    from windtunnel import parametrization as mup

    lr, src = trial.optim.lr, "windtunnel.parametrization.model_rule"
    groups = []
    for role in sorted(set(model.param_roles().values()), key=mup.ROLES.index):
        r = mup.model_rule(role, trial.model)
        groups.append({"role": role, "init_std": r.init_std, "lr": lr * r.lr_mult,
                       "weight_decay": trial.optim.weight_decay * r.wd_mult})
        d.row(f"{role}: init std", r.init_std, "parametrization.rule(role).init_std (0 = ones)", src)
        d.row(f"{role}: lr", lr * r.lr_mult, "optim.lr × parametrization.rule(role).lr_mult", src)
        d.row(f"{role}: weight decay", trial.optim.weight_decay * r.wd_mult,
              "optim.weight_decay × rule(role).wd_mult", src)
    mult, src = mup.model_multipliers(trial.model), "windtunnel.parametrization.model_multipliers"
    d.row("embedding multiplier", mult.embedding, "scale_emb (sp: 1)", src)
    d.row("residual multiplier", mult.residual, "scale_depth / sqrt(n_layers) (sp: 1)", src)
    d.row("logit multiplier", mult.logit, "1 / m = dim_model_base / d_model (sp: 1)", src)
    return groups


def wall_time(d: Derivation, model, trial: TrialConfig) -> float:
    """Hours for the Slurm time limit: the estimate at the target's FLOP rate with some slack,
    capped at target.max_hours (a longer run resumes in the next job)."""
    target = d.target
    fpt = d.row("FLOPs per token", float(model.flops_per_token()), "6 × matmul params + 6·L·C·T (PaLM)",
                "windtunnel.model.Transformer.flops_per_token")
    hours = d.row("estimated hours",
                  trial.train.tokens * fpt / (target.world * target.gpu_tflops * 1e12 * target.mfu) / 3600,
                  "tokens × FLOPs per token / (GPUs × gpu_tflops × mfu)", d.from_target)
    limit = hours * TIME_SLACK + TIME_EXTRA_HOURS
    if limit > target.max_hours:
        d.warnings.append(f"the run needs ~{duration(hours)} but one job gets {duration(target.max_hours)}: resubmit "
                          "launch.sbatch, it resumes from the latest checkpoint")
    return min(target.max_hours, limit)


def duration(hours: float) -> str:
    """A time as a person reads it: 31 s, 12 min, 3.2 h, 4.5 days (it printed 'time≈0.00846886 h')."""
    s = hours * 3600
    if s < 90:
        return f"{max(s, 1):.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"
