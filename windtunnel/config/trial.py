"""Typed configuration of one trial. Plain dataclasses: the core never imports Hydra.

The CLI composes Hydra configs (hydra.py) and converts them once into these classes; every
check lives in `__post_init__` and raises `ConfigError` with one line naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from windtunnel.errors import ConfigError
from windtunnel.parametrization import DEPTH_SCALINGS

PARAMETRIZATIONS = ("sp", "mup")
KERNELS = ("auto", "torch", "triton")
SCHEDULES = ("wsd", "cosine", "constant")
DECAY_SHAPES = ("exp", "linear", "cosine", "1-sqrt")
TOKENIZERS = ("byte", "bpe")
VAL_SPLITS = ("tail", "spread")


def check_field(ok: bool, path: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{path}: {rule} (got {value!r})")


def check_choice(path: str, value: Any, allowed: tuple) -> None:
    check_field(value in allowed, path, f"must be one of {', '.join(allowed)}", value)


TYPE_WORDS = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
              "list[int]": "a list of integers"}


def coerce(path: str, value: Any, annotation: str) -> Any:
    """value as the field annotated `annotation` ('int', 'float | None', 'list[int]', ...) holds it,
    or ConfigError naming `path`. Whole numbers pass for ints (2e6, or 256.0 from a table); a bool
    is no number (`lr: true` is a typo); scalars pass for strings (a partition named 123)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    kind = next(k for k in kinds if k != "None")
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind in ("int", "float") and isinstance(value, numbers.Real) and not isinstance(value, bool):
        if kind == "float":
            return float(value)
        if isinstance(value, numbers.Integral) or float(value).is_integer():
            return int(value)
    if kind == "list[int]" and isinstance(value, (list, tuple)):
        try:
            return [coerce(path, v, "int") for v in value]
        except ConfigError:
            pass
    if kind == "str" and not isinstance(value, (dict, list, tuple)):
        return "" if value is None else str(value)
    raise ConfigError(f"{path}: must be {TYPE_WORDS[kind]} (got {value!r})")


@dataclass(kw_only=True)
class ModelConfig:
    """A Llama/MiniCPM-style decoder: RMSNorm, RoPE, SwiGLU, no biases."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 0
    """> 0 sets n_heads = d_model / head_dim, so width sweeps grow by adding heads."""
    d_ff: int = 0
    """SwiGLU hidden size; 0 = 8/3·d_model rounded up to a multiple of 64 (Llama)."""
    vocab_size: int = 0
    """0 = the tokenizer's vocabulary, read from the data manifest."""
    seq_len: int = 128
    tie_embeddings: bool = True
    """MiniCPM ties the LM head to the embedding."""
    parametrization: str = "mup"
    """sp: one init std and one lr for all; mup: MiniCPM's μP (windtunnel/parametrization.py)."""
    scale_emb: float = 12.0
    """μP: multiplies the embedding output (MiniCPM: 12)."""
    scale_depth: float = 1.4
    """μP: each residual branch is scaled by scale_depth/sqrt(n_layers) (MiniCPM: 1.4)."""
    depth_scaling: str = "sqrt"
    """μP: sqrt divides scale_depth by sqrt(n_layers) (MiniCPM); none leaves it out (a control)."""
    dim_model_base: int = 256
    """μP: the width at which μP and sp coincide (MiniCPM: 256)."""
    init_std: float = 0.1
    """Init std of matrices at width dim_model_base (MiniCPM: 0.1; sp: used for all matrices)."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    kernels: str = "auto"
    """auto: Triton on CUDA, PyTorch references on CPU."""

    def __post_init__(self) -> None:
        if self.head_dim:
            check_field(self.head_dim > 0 and self.d_model % self.head_dim == 0, "model.head_dim",
                   f"must divide model.d_model={self.d_model}", self.head_dim)
            self.n_heads = self.d_model // self.head_dim
        for name in ("d_model", "n_layers", "n_heads", "seq_len", "dim_model_base"):
            check_field(getattr(self, name) > 0, f"model.{name}", "must be > 0", getattr(self, name))
        check_field(self.d_ff >= 0, "model.d_ff", "must be >= 0 (0 = 8/3·d_model)", self.d_ff)
        check_field(self.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = from the data)", self.vocab_size)
        check_field(self.d_model % self.n_heads == 0, "model.d_model",
               f"must be divisible by model.n_heads={self.n_heads}", self.d_model)
        check_field((self.d_model // self.n_heads) % 2 == 0, "model.n_heads",
               f"must leave an even head dim (RoPE rotates pairs; model.d_model={self.d_model} / n_heads "
               f"= {self.d_model // self.n_heads})", self.n_heads)
        check_choice("model.parametrization", self.parametrization, PARAMETRIZATIONS)
        check_choice("model.depth_scaling", self.depth_scaling, DEPTH_SCALINGS)
        check_choice("model.kernels", self.kernels, KERNELS)
        for name in ("scale_emb", "scale_depth", "init_std", "rope_theta", "norm_eps"):
            v = getattr(self, name)
            check_field(math.isfinite(v) and v > 0, f"model.{name}", "must be a finite number > 0", v)

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 64 * math.ceil(8 * self.d_model / 3 / 64)



@dataclass(kw_only=True)
class DataConfig:
    source: str = "stdlib"
    """'stdlib' (this Python's own standard-library sources: real text, no download), a text
    file or folder, or a folder of prepared shards (holding manifest.json)."""
    tokenizer: str = "byte"
    vocab_size: int = 4096
    """BPE only: the vocabulary to train (byte-level is always 256)."""
    max_bytes: int = 8_000_000
    """Cap on the text read from source (stdlib holds ~30 MB)."""
    val_fraction: float = 0.02
    """The fraction of the tokens held out as the fixed validation split."""
    val_split: str = "spread"
    """Where it lies: 'spread' (the last tokens of each of up to 64 equal strata: a corpus laid out one
    source after another is measured on all of them) or 'tail' (the corpus's last tokens: one source).
    A stored config without the field ran on the tail, and reads back so (ADDED_SINCE)."""
    cache_dir: str = ""
    """Where prepared shards are kept; '' = ~/.cache/windtunnel/data."""

    def __post_init__(self) -> None:
        check_choice("data.tokenizer", self.tokenizer, TOKENIZERS)
        check_field(257 <= self.vocab_size <= 2**32 - 1, "data.vocab_size", "must be in [257, 2^32-1]", self.vocab_size)
        check_field(self.max_bytes > 0, "data.max_bytes", "must be > 0", self.max_bytes)
        check_field(0 < self.val_fraction < 0.5, "data.val_fraction", "must be in (0, 0.5)", self.val_fraction)
        check_choice("data.val_split", self.val_split, VAL_SPLITS)


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW. μP's per-group lr multipliers come from windtunnel/parametrization.py."""

    lr: float = 0.01
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip each trial's global gradient norm; 0 = off."""

    def __post_init__(self) -> None:
        check_field(math.isfinite(self.lr) and self.lr > 0, "optim.lr", "must be a finite number > 0", self.lr)
        check_field(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        for name in ("beta1", "beta2"):
            check_field(0 <= getattr(self, name) < 1, f"optim.{name}", "must be in [0, 1)", getattr(self, name))
        check_field(self.eps > 0, "optim.eps", "must be > 0", self.eps)
        check_field(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)", self.grad_clip)


@dataclass(kw_only=True)
class ScheduleConfig:
    """Learning-rate factor over the run (windtunnel/schedule.py)."""

    kind: str = "wsd"
    warmup: float = 0.02
    """Fraction of the steps spent warming up linearly."""
    decay: float = 0.1
    """WSD: fraction of the steps in the final decay (MiniCPM: ~10%)."""
    decay_shape: str = "exp"
    final_lr_frac: float = 0.01
    """lr at the end of the decay, as a fraction of the peak."""

    def __post_init__(self) -> None:
        check_choice("schedule.kind", self.kind, SCHEDULES)
        check_choice("schedule.decay_shape", self.decay_shape, DECAY_SHAPES)
        check_field(0 <= self.warmup < 1, "schedule.warmup", "must be in [0, 1)", self.warmup)
        check_field(0 <= self.decay <= 1, "schedule.decay", "must be in [0, 1]", self.decay)
        check_field(self.warmup + (self.decay if self.kind == "wsd" else 0) <= 1, "schedule.warmup",
               "warmup + decay must be <= 1", self.warmup)
        check_field(0 < self.final_lr_frac <= 1, "schedule.final_lr_frac", "must be in (0, 1]", self.final_lr_frac)


@dataclass(kw_only=True)
class TrainConfig:
    tokens: int = 1_000_000
    """Token budget of the trial."""
    batch_size: int = 16
    """Sequences per step (tokens per step = batch_size · model.seq_len)."""
    eval_every: int = 0
    """Tokens between validation evaluations; 0 = 10 evaluations per run."""
    eval_tokens: int = 8192
    """Validation tokens per evaluation: the first ceil(eval_tokens / model.seq_len) windows of the
    validation split, the same for every batch size, population size and world size."""
    seed: int = 0
    """Initialisation seed; the data order uses data_seed (-1 = the same as seed)."""
    data_seed: int = -1
    device: str = "auto"
    """auto: cuda if available, else cpu."""
    diverge_loss: float = 0.0
    """A train loss above this stops the trial as diverged; 0 = 1.5 × max(ln(vocab), first loss)."""
    checkpoint_dir: str = ""
    """Where resumable state is written; a run finding state there resumes from it."""
    checkpoint_every: int = 0
    """Tokens between resumable checkpoints (0 = none)."""
    save_at: list[int] = field(default_factory=list)
    """Token counts at which to save the (stable-phase) state for later decay branches."""
    init_from: str = ""
    """A saved state (save_at or checkpoint) to branch from: weights, optimizer, data order."""
    branch_at: list[int] = field(default_factory=list)
    """WSD branches: token counts where decays start. The trial runs the stable phase once,
    saving its state at each, then decays `schedule.decay` of each branch's length from it."""
    compile: bool = False
    """torch.compile the model (PyTorch's kernels fused by Inductor instead of the Triton set)."""
    cuda_graph: bool = True
    """On CUDA without compile: record the training step once as a CUDA graph and replay it, so
    small trials are not bound by the host launching kernels."""

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_size", "eval_tokens"):
            check_field(getattr(self, name) > 0, f"train.{name}", "must be > 0", getattr(self, name))
        for name in ("eval_every", "checkpoint_every"):
            check_field(getattr(self, name) >= 0, f"train.{name}", "must be >= 0", getattr(self, name))
        check_field(self.seed >= 0, "train.seed", "must be >= 0", self.seed)  # numpy's data streams take no sign
        check_field(self.data_seed >= -1, "train.data_seed", "must be >= 0, or -1 for train.seed's", self.data_seed)
        check_field(self.diverge_loss >= 0, "train.diverge_loss",
                    "must be >= 0 (0 = 1.5 × max(ln(vocab), first loss))", self.diverge_loss)
        check_field(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "train.device",
               "must be auto, cpu, cuda or cuda:N", self.device)
        for name in ("save_at", "branch_at"):
            for t in getattr(self, name):
                check_field(0 < t <= self.tokens, f"train.{name}", f"token counts must be in (0, train.tokens={self.tokens}]", t)


@dataclass(kw_only=True)
class TrialConfig:
    """Everything one trial needs; stored with its result so it can be re-run exactly."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        step = self.train.batch_size * self.model.seq_len
        # less would still train one whole step: every smaller budget the same trial
        check_field(self.train.tokens >= step, "train.tokens",
                    f"must be at least one step, train.batch_size × model.seq_len = {step} tokens", self.train.tokens)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
            "schedule": ScheduleConfig, "train": TrainConfig}


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# Trial settings that change how a trial runs, or where its files are, not what it computes: a
# resumed sweep or run may change them (any other change makes its results, or its next steps,
# something else). Paths are free because folders move between machines; the data in them may not.
# eval_every moves only where the pruner and the divergence check look, not what is trained.
RUN_ONLY = ("model.kernels", "train.device", "train.compile", "train.cuda_graph", "train.checkpoint_dir",
            "train.checkpoint_every", "train.eval_every", "data.source", "data.cache_dir")
# What a relaunch of a large run may change beside RUN_ONLY: its evaluation, its save points, its
# branch origin (used only before the first checkpoint) and diverge_loss (the large run ignores it).
RELAUNCH_FREE = {*RUN_ONLY, "train.eval_tokens", "train.save_at", "train.init_from", "train.diverge_loss"}


def settings(cfg: TrialConfig | dict) -> dict:
    """{'section.field': value} of a trial config (or its to_dict), as JSON stores it."""
    d = json.loads(json.dumps(cfg if isinstance(cfg, dict) else to_dict(cfg), default=str))
    return {f"{sec}.{k}": v for sec, fields in d.items() for k, v in fields.items()}


# Fields added since studies, checkpoints and plans were first stored, and how those ran before
# the field existed: a stored config without one is compared as this value.
ADDED_SINCE = {"data.val_split": "tail"}


def changed_settings(before: dict, now: dict, keys=None) -> list[str]:
    """'key old -> new' for each setting (of keys, default all) that differs between the two. A
    key only one side has is no change (a field added or removed since `before` was stored),
    unless ADDED_SINCE says how `before` ran without it."""
    before = {**{k: v for k, v in ADDED_SINCE.items() if k in now}, **before}
    keys = sorted(now) if keys is None else sorted(keys)
    return [f"{k} {before[k]!r} -> {now[k]!r}" for k in keys if k in before and k in now and before[k] != now[k]]


def relaunch_changes(stored: dict, cfg: TrialConfig) -> list[str]:
    """What cfg changes of the settings a large run's checkpoint was trained with (stored: its
    config), beside RELAUNCH_FREE: a run resumed under them would train on as something else.
    Asked by the launch (large_run) and by `transfer --out` (export) before it writes over a run."""
    now = settings(cfg)
    return changed_settings(settings(stored), now, [k for k in now if k not in RELAUNCH_FREE])


def field_type(key: str) -> str | None:
    """The annotated type of a dotted trial field ('model.d_model' -> 'int'); None if no such field."""
    section, _, name = key.partition(".")
    cls = SECTIONS.get(section)
    return next((f.type for f in dataclasses.fields(cls) if f.name == name), None) if cls else None


def section_from_dict(name: str, cls: type, values: dict | None) -> Any:
    """cls(**values), after the checks its __post_init__ assumes: known keys, values of the
    annotated types (coerced: see `coerce`); each failure is one line naming `name.key`."""
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{name}: must be a mapping of keys to values (got {values!r})")
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bad = sorted(set(values) - set(fields))
    if bad:
        raise ConfigError(f"{name}.{bad[0]}: unknown key (allowed: {', '.join(sorted(fields))})")
    return cls(**{key: coerce(f"{name}.{key}", value, fields[key].type) for key, value in values.items()})


def trial_from_dict(d: dict) -> TrialConfig:
    """Build a TrialConfig from nested dicts; an unknown key or a value of the wrong type is one
    line naming the field (`section_from_dict`)."""
    unknown = set(d) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section (allowed: {', '.join(SECTIONS)})")
    d = _legacy_eval(_added_since(d))
    return TrialConfig(**{name: section_from_dict(name, cls, d.get(name)) for name, cls in SECTIONS.items()})


def _added_since(d: dict) -> dict:
    """A config stored before a field of ADDED_SINCE existed ran as that field's value there."""
    for key, was in ADDED_SINCE.items():
        section, _, name = key.partition(".")
        if isinstance(d.get(section), dict) and name not in d[section]:
            d = {**d, section: {**d[section], name: was}}
    return d


def _legacy_eval(d: dict) -> dict:
    """Configs stored before train.eval_tokens held train.eval_batches: their runs evaluated on
    eval_batches × batch_size windows, which is the eval_tokens they are read back with."""
    train = d.get("train")
    if not isinstance(train, dict) or "eval_batches" not in train:
        return d
    train = dict(train)
    n = train.pop("eval_batches")
    if "eval_tokens" not in train:
        model = d.get("model") if isinstance(d.get("model"), dict) else {}
        train["eval_tokens"] = n * train.get("batch_size", TrainConfig.batch_size) * model.get("seq_len", ModelConfig.seq_len)
    return {**d, "train": train}


def with_overrides(cfg: TrialConfig, overrides: dict[str, Any]) -> TrialConfig:
    """A copy with dotted keys replaced ('optim.lr': 0.02), re-validated."""
    d = to_dict(cfg)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in d or name not in d[section]:
            raise ConfigError(f"{key}: unknown key")
        d[section][name] = value
    return trial_from_dict(d)
