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
  micro-batch is the largest power of two whose memory fits memory_fraction · gpu_memory_gb
  under windtunnel/memory.py's model (the sweep's and the trainers' too); gradient accumulation
  makes up the rest of the batch.

Each of these is a step of its own (windtunnel/transfer_steps.py; the lr's factors in
windtunnel/transfer_lr.py); the inputs besides the target are read by windtunnel/transfer_inputs.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from windtunnel import transfer_lr, transfer_steps as steps
from windtunnel.config.target import Target
from windtunnel.config.trial import TrialConfig, to_dict
from windtunnel.transfer_inputs import Laws, Winner, load_depth_law, load_law, load_winner  # noqa: F401  (the command's inputs)
from windtunnel.transfer_steps import Row, duration, fmt  # noqa: F401  (export and the command write with them)


# --------------------------------------------------------------------------- the plan


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


def _hms(hours: float) -> str:
    """Slurm's --time, H:MM:00, rounded up to the minute."""
    s = int(math.ceil(hours * 3600 / 60) * 60)
    return f"{s // 3600}:{s % 3600 // 60:02d}:00"


def plan(winner: Winner, target: Target, laws: Laws) -> Plan:
    """The steps of windtunnel/transfer_steps.py in order; the batch-size law reads the loss at
    the token budget, and the lr may follow the batch the GPUs can make."""
    d = steps.Derivation(winner, target)
    trial0, N = steps.target_model(d)
    model = steps.meta_model(trial0.model, target.vocab_size)
    given_batch, loss = steps.batch_input(d, laws)
    D = steps.token_budget(d, laws, N)
    wanted = steps.wanted_batch(d, laws, given_batch, loss, N, D)
    lr = transfer_lr.base_lr(d, laws, D)
    batch = steps.fit_batch(d, trial0.model, wanted)
    lr = transfer_lr.lr_for_batch(d, laws, lr, batch.tokens)
    total_steps, schedule = steps.wsd_schedule(d, laws, D, batch.tokens)
    trial = steps.trainer_config(d, laws, trial0, lr, schedule, total_steps, batch)
    groups = steps.mup_groups(d, model, trial)
    hours = steps.wall_time(d, model, trial)
    return Plan(trial=trial, large_run=steps.large_run_section(d, batch), target=target, winner=winner, rows=d.rows, groups=groups,
                memory=batch.memory, warnings=d.warnings, slurm_time=_hms(hours))
