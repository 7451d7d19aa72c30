"""What a large run's train.yaml holds (written by `windtunnel transfer`, windtunnel/export.py): a
trial config (model, data, optim, schedule, train) plus a `large_run` section, with SECTION.KEY=VALUE
overrides from `windtunnel train`'s command line.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from windtunnel import credentials
from windtunnel.config.overrides import apply, load_yaml
from windtunnel.config.trial import TrialConfig, section_from_dict, trial_from_dict
from windtunnel.errors import ConfigError


@dataclass(kw_only=True)
class LargeRunConfig:
    run_name: str = "run"
    run_dir: str = ""
    """Loss log, MLflow run id; '' = runs/<run_name>. Relative to the config file's folder."""
    micro_batch: int = 1
    """Sequences per GPU per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    tracking_uri: str = ""
    """MLflow tracking URI; '' = no MLflow."""
    experiment: str = "windtunnel-large-runs"
    log_every: int = 1
    """Steps between MLflow metric points (loss.jsonl gets every step)."""
    source_sweep: str = ""
    """The sweep whose winner this run was transferred from (an MLflow tag; `windtunnel transfer` sets it)."""
    source_trial: int = -1
    """That winner's trial number (-1: unknown)."""
    steps: int = 0
    """Steps this launch trains, counted from where it starts or resumes; then it saves and stops
    (the next launch resumes there). 0 = to the end."""
    stop_after_steps: int = 0
    """Stop (without saving) at this absolute step, as a crash would (for tests); 0 = run to the end.
    At or below the step a resumed run is at, it is refused: large_run.steps counts from there."""
    keep_last: int = 2
    """step-* checkpoints kept (stable saves are always kept)."""

    def __post_init__(self) -> None:
        for name in ("micro_batch", "grad_accum", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"large_run.{name}: must be >= 1 (got {getattr(self, name)!r})")
        for name in ("steps", "stop_after_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"large_run.{name}: must be >= 0 (got {getattr(self, name)!r})")
        self.tracking_uri = credentials.take(self.tracking_uri)  # MLflow reads them from its environment


def load_config(d: dict) -> tuple[TrialConfig, LargeRunConfig]:
    d = dict(d)
    run = section_from_dict("large_run", LargeRunConfig, d.pop("large_run", None))
    return trial_from_dict(d), run


# a path, a name or a URI keeps its text as typed: YAML would read `run_dir=2024` as a number
RAW = ("large_run.run_name", "large_run.run_dir", "large_run.tracking_uri")


def read(config: str | Path, overrides: list[str] = ()) -> dict:
    """A train.yaml as nested dicts, with SECTION.KEY=VALUE overrides set (load_config checks it)."""
    d = load_yaml(config)
    if "trial" in d and "large_run" not in d:  # a sweep's best.yaml: one trial's config, no run
        raise ConfigError(f"{config}: a sweep's winner, not a large run's config: `windtunnel transfer` makes one "
                          f"(train.yaml); `windtunnel trial --config {shlex.quote(str(config))}` re-runs the trial")
    return apply(d, overrides, raw=RAW, example="large_run.steps=10")
