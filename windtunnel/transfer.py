"""Transfer: the proxy's winning hyperparameters, rescaled to a target shape, made launchable.

    load_winner(path)            a sweep's best.yaml (or RESULTS_DIR/SWEEP holding one)
    load_target(name, overrides) conf/target/<name>.yaml or a YAML path, plus KEY=VALUE
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

Each of these is a step of its own (windtunnel/transfer_steps.py); the inputs besides the target
are read by windtunnel/transfer_inputs.py.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from windtunnel import transfer_steps as steps
from windtunnel.config import TrialConfig, section_from_dict, to_dict
from windtunnel.errors import ConfigError
from windtunnel.transfer_inputs import Laws, Winner, load_law, load_winner  # noqa: F401  (the command's inputs)
from windtunnel.transfer_steps import Row, duration, fmt  # noqa: F401  (export and the command write with them)


# --------------------------------------------------------------------------- target


@dataclass(kw_only=True)
class Target:
    """A target shape and the cluster it runs on (conf/target/*.yaml; KEY=VALUE overrides)."""

    name: str = "target"
    # -- shape (Llama/MiniCPM decoder, windtunnel/model.py)
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int = 0
    """SwiGLU hidden size; 0 = 8/3·d_model rounded up to 64."""
    vocab_size: int
    seq_len: int = 4096
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # -- μP base hyperparameters: None = the winner's (they are width-independent under μP)
    lr: float | None = None
    init_std: float | None = None
    scale_emb: float | None = None
    scale_depth: float | None = None
    dim_model_base: int | None = None
    # -- schedule
    warmup: float | None = None
    """Fraction of the steps warming up; None = the winner's fraction."""
    decay: float = 0.1
    """WSD decay fraction (MiniCPM: ~10%)."""
    # -- cluster
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    memory_fraction: float = 0.9
    """Share of the GPU memory the plan may use."""
    gpu_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989), for the wall-time estimate."""
    mfu: float = 0.4
    """Assumed model FLOPs utilisation, for the wall-time estimate."""
    max_hours: float = 48.0
    """Cap on the Slurm time limit; the run resumes from its checkpoint in the next job."""
    partition: str = ""
    cpus_per_task: int = 0
    """Slurm --cpus-per-task; 0 = not set."""
    device: str = "auto"
    # -- run
    run_name: str = ""
    """'' = <target name>-<sweep>-<trial number>."""
    checkpoint_every: int = 0
    """Tokens between resumable checkpoints; 0 = 50 per run."""
    tracking_uri: str = ""
    """MLflow tracking URI for the large run ('' = no MLflow)."""
    data_source: str = ""
    """The large run's data (a shard folder, text, 'stdlib'); '' = the winner's."""
    seed: int | None = None

    def __post_init__(self) -> None:
        def check(ok, name, rule):
            if not ok:
                raise ConfigError(f"target.{name}: {rule} (got {getattr(self, name)!r})")

        for name in ("d_model", "n_layers", "n_heads", "vocab_size", "seq_len", "nodes", "gpus_per_node"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check(self.d_ff >= 0, "d_ff", "must be >= 0 (0 = 8/3·d_model)")
        check(self.d_model % self.n_heads == 0, "d_model", f"must be divisible by target.n_heads={self.n_heads}")
        for name in ("gpu_memory_gb", "gpu_tflops", "max_hours"):
            check(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "must be a finite number > 0")
        for name in ("memory_fraction", "mfu"):
            check(0 < getattr(self, name) <= 1, name, "must be in (0, 1]")
        check(0 <= self.decay <= 1, "decay", "must be in [0, 1]")
        check(self.warmup is None or 0 <= self.warmup < 1, "warmup", "must be in [0, 1)")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = 50 per run)")
        check(self.cpus_per_task >= 0, "cpus_per_task", "must be >= 0")
        check(re.fullmatch(r"[A-Za-z0-9._-]*", self.partition) is not None, "partition",
              "may hold only letters, digits and . _ -")
        for name in ("lr", "init_std", "scale_emb", "scale_depth", "dim_model_base"):
            v = getattr(self, name)
            check(v is None or (math.isfinite(v) and v > 0), name, "must be a finite number > 0 (or absent)")
        from windtunnel import credentials

        self.tracking_uri = credentials.take(self.tracking_uri)  # the exported files never hold a password

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def target_from_dict(d: dict) -> Target:
    fields = dataclasses.fields(Target)
    missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing and not set(d) - {f.name for f in fields}:  # an unknown key is the likelier mistake
        raise ConfigError(f"target.{missing[0]}: required (the target YAML must set it)")
    return section_from_dict("target", Target, d)


def load_target(target: str, overrides: list[str] = ()) -> Target:
    """TARGET is a name in conf/target/ or a YAML path; overrides are KEY=VALUE target fields."""
    from windtunnel.configure import load_yaml, parse_value, repo_dir, target_names

    p = Path(target)
    if not (p.suffix in (".yaml", ".yml") or p.is_file()):
        p = repo_dir("conf") / "target" / f"{target}.yaml"
        if not p.is_file():
            raise ConfigError(f"--target: unknown target {target!r} (allowed: {', '.join(target_names())}, or a YAML path)")
    if not p.is_file():
        raise ConfigError(f"--target: {target}: no such file (allowed: {', '.join(target_names())}, or a YAML path)")
    d = load_yaml(p)
    d.setdefault("name", p.stem)
    str_fields = {f.name for f in dataclasses.fields(Target) if str(f.type) == "str"}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r}: target overrides are KEY=VALUE (e.g. nodes=4)")
        # strings stay as typed (a run name is never YAML-parsed); other fields are parsed
        d[key] = value if key in str_fields else parse_value(value)
    return target_from_dict(d)


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
    lr = steps.base_lr(d, laws, D)
    batch = steps.fit_batch(d, trial0.model, wanted)
    lr = steps.lr_for_batch(d, laws, lr, batch.tokens)
    total_steps, schedule = steps.wsd_schedule(d, laws, D, batch.tokens)
    trial = steps.trainer_config(d, laws, trial0, lr, schedule, total_steps, batch)
    groups = steps.mup_groups(d, model, trial)
    hours = steps.wall_time(d, model, trial)
    return Plan(trial=trial, large_run=steps.large_run_section(d, batch), target=target, winner=winner, rows=d.rows, groups=groups,
                memory=batch.memory, warnings=d.warnings, slurm_time=_hms(hours))
