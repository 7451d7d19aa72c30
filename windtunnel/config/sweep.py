"""What a sweep is (sweeps/NAME.yaml): a trial config (the base), a search space (space.py) and
how to run it: sampler, pruner, executor, tracking, population, grid extension.

A sweep file is a Hydra config merged over conf/sweep.yaml (hydra.py composes it); it may pick
config groups (`defaults: [{override /model: proxy9m}]`) and set any trial field.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from windtunnel import credentials
from windtunnel.config.overrides import repo_dir
from windtunnel.config.space import grid_space, parse_search
from windtunnel.config.trial import SECTIONS, TrialConfig, check_choice, check_field, trial_from_dict
from windtunnel.errors import ConfigError
from windtunnel.files import check_folder

SAMPLERS = ("tpe", "gp", "cmaes", "random", "grid")
PRUNERS = ("median", "hyperband", "sha", "none")
EXECUTORS = ("local", "ray", "slurm")
SEED_MODES = ("per_trial", "common")


@dataclass(kw_only=True)
class SamplerConfig:
    type: str = "tpe"
    """tpe (multivariate, constant liar), gp, cmaes, random or grid."""
    seed: int = 0
    n_startup_trials: int = 10
    threads: int = 0
    """gp: CPU threads for its model fits in the driver (torch's intra-op threads); 0 = auto, a
    quarter of the cores, 1 to 4. The workers share those cores: on all of them a GP ask took
    longer than a bundle trains, on 4 well less (results/bench/driver.md)."""

    def __post_init__(self) -> None:
        check_choice("sampler.type", self.type, SAMPLERS)
        check_field(0 <= self.seed <= 2**32 - 1, "sampler.seed", "must be in [0, 2^32-1]", self.seed)  # numpy's seeds
        check_field(self.n_startup_trials >= 0, "sampler.n_startup_trials", "must be >= 0", self.n_startup_trials)
        check_field(self.threads >= 0, "sampler.threads", "must be >= 0 (0 = auto)", self.threads)


@dataclass(kw_only=True)
class PrunerConfig:
    type: str = "median"
    """median, hyperband, sha (successive halving) or none; fed with validation losses."""
    n_startup_trials: int = 5
    n_warmup_evals: int = 2
    """median: evaluations of a trial before it may be pruned."""
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        check_choice("pruner.type", self.type, PRUNERS)
        for name in ("n_startup_trials", "n_warmup_evals"):
            check_field(getattr(self, name) >= 0, f"pruner.{name}", "must be >= 0", getattr(self, name))
        check_field(self.reduction_factor >= 2, "pruner.reduction_factor", "must be >= 2", self.reduction_factor)


@dataclass(kw_only=True)
class ExecutorConfig:
    type: str = "local"
    workers: int = 0
    """Parallel bundles. 0: one per visible GPU, else cores / threads_per_worker."""
    threads_per_worker: int = 1
    retries: int = 1
    """A trial whose worker dies is re-run this many times, then failed."""
    trial_timeout_s: float = 0.0
    """A bundle running longer than this is killed and retried (0 = no deadline)."""
    standby: Any = "auto"
    """local: start each slot's next worker process while its bundle trains, so Python, torch and
    CUDA are loaded when the next bundle comes (auto: when GPUs are visible; true; false). Not on
    CPUs by default: there the early imports take cores from training (results/bench/README.md)."""
    # ray
    address: str = ""
    """ray: '' joins $RAY_ADDRESS when set, else starts a new local instance; auto, HOST:PORT or
    ray://HOST:PORT joins a cluster."""
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    """ray: fractional GPUs allowed (0.25 = four bundles share a GPU)."""
    # slurm (submitit)
    partition: str = ""
    time_min: int = 60
    cpus_per_job: int = 1
    gpus_per_job: int = 0
    mem_gb: float = 0.0
    account: str = ""
    qos: str = ""
    sbatch_extra: dict[str, Any] = field(default_factory=dict)
    """Extra sbatch flags, e.g. {constraint: h100}."""
    array_parallelism: int = 64
    max_requeues: int = 3
    checkpoint_every: int = 0
    """Tokens between resumable trial checkpoints (slurm default: a tenth of the budget)."""
    folder: str = ""
    """submitit's job folder ('' = <results>/<sweep>/slurm)."""
    poll_s: float = 3.0
    """slurm: seconds between `squeue` looks at the sweep's jobs (never sacct; submitit issue 1759)."""

    def __post_init__(self) -> None:
        check_choice("executor.type", self.type, EXECUTORS)
        check_field(self.standby in ("auto", True, False), "executor.standby", "must be auto, true or false", self.standby)
        for name in ("workers", "retries", "threads_per_worker", "time_min", "array_parallelism"):
            check_field(getattr(self, name) >= 0, f"executor.{name}", "must be >= 0", getattr(self, name))
        check_field(self.trial_timeout_s >= 0, "executor.trial_timeout_s", "must be a number >= 0 (0 = no deadline)",
                    self.trial_timeout_s)
        check_field(self.gpus_per_trial >= 0, "executor.gpus_per_trial", "must be >= 0", self.gpus_per_trial)
        check_field(self.cpus_per_trial > 0, "executor.cpus_per_trial", "must be > 0", self.cpus_per_trial)
        for name in ("max_requeues", "gpus_per_job", "mem_gb", "checkpoint_every"):
            check_field(getattr(self, name) >= 0, f"executor.{name}", "must be >= 0", getattr(self, name))
        check_field(self.cpus_per_job >= 1, "executor.cpus_per_job", "must be >= 1", self.cpus_per_job)
        check_field(isinstance(self.sbatch_extra, dict), "executor.sbatch_extra", "must be a mapping of sbatch flags",
               self.sbatch_extra)
        check_field(self.poll_s >= 1, "executor.poll_s", "must be >= 1 (squeue is shared by everyone)", self.poll_s)
        if self.type == "slurm":
            check_field(self.time_min >= 1, "executor.time_min", "must be >= 1 for slurm", self.time_min)


TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


@dataclass(kw_only=True)
class TrackingConfig:
    uri: str = ""
    """'' = a local MLflow store under the results dir (no server); http://HOST:PORT = a server."""
    enabled: bool = True

    def __post_init__(self) -> None:
        check_tracking_uri(self.uri, "tracking.uri")
        self.uri = credentials.take(self.uri)  # never stored or printed (windtunnel/credentials.py)


def check_tracking_uri(uri: str | None, name: str) -> None:
    # MLflow reads a bare word as a folder of its deprecated file store, which then refuses records
    scheme = uri.partition("://")[0].partition("+")[0] if uri and "://" in uri else None
    check_field(not uri or scheme in TRACKING_SCHEMES, name,
                "must be '' (a local store) or a URI: http(s)://HOST:PORT, sqlite:///PATH, postgresql://...",
                credentials.redact(uri) if uri else uri)


@dataclass(kw_only=True)
class PopulationConfig:
    size: Any = 1
    """Trials trained together on one device (an int, or auto: as many as fit in memory)."""

    def __post_init__(self) -> None:
        ok = self.size == "auto" or (isinstance(self.size, int) and self.size >= 1)
        check_field(ok, "population.size", "must be an integer >= 1 or auto", self.size)


@dataclass(kw_only=True)
class ExtendConfig:
    """Grow a grid sweep's axis (e.g. optim.lr) past an edge until each optimum is interior
    (windtunnel/grid_extend.py): once the grid is done, every group of the other grid axes whose
    lowest mean loss sits at its smallest or largest value gets the next point beyond, value ÷ or
    × factor, with each replicate (train.seed) of the grid; repeated until none is on an edge."""

    param: str = ""
    """The grid axis to extend ('' = off), or several, comma-separated: optim.lr,model.init_std (each
    grown past the edge of the group's best cell over all of them)."""
    factor: float = 2.0
    max_steps: int = 4
    """New points per side and group at most: past them the optimum is reported as on the edge."""

    def __post_init__(self) -> None:
        check_field(math.isfinite(self.factor) and self.factor > 1, "extend.factor", "must be a number > 1", self.factor)
        check_field(self.max_steps >= 1, "extend.max_steps", "must be >= 1", self.max_steps)


@dataclass(kw_only=True)
class SweepConfig(TrialConfig):
    name: str = ""
    description: str = ""
    search: dict[str, Any] = field(default_factory=dict)
    objective: str = "final_val_loss"
    """Minimised: the validation loss at the end of the token budget."""
    seeds: str = "per_trial"
    """per_trial: each trial draws its init and data seeds from train.seed and its number
    (trial_seeds), so its loss carries its own noise, as a replicate's would; common: every trial
    trains with train.seed and train.data_seed (common random numbers: one draw of the noise for
    all, so trials differ by their parameters alone, and a winner may be that draw's favourite).
    A search space that sets train.seed or train.data_seed (replicates as a grid axis) keeps those."""
    n_trials: int = 20
    storage: str = ""
    """'' = an Optuna journal file <results_dir>/<name>/study.journal; or any Optuna storage URL
    (sqlite:///..., postgresql://...) or a path ending in .journal."""
    results_dir: str = "results"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    extend: ExtendConfig = field(default_factory=ExtendConfig)

    def __post_init__(self) -> None:
        # the sweep's folder under results_dir and its study name: one plain path component
        check_field(bool(re.fullmatch(r"[A-Za-z0-9._-]+", self.name)) and self.name not in (".", ".."), "name",
                    "must be one plain folder name: letters, digits, '.', '_', '-' (not '.' or '..')", self.name)
        check_field(self.n_trials >= 1, "n_trials", "must be >= 1", self.n_trials)
        check_choice("objective", self.objective, ("final_val_loss",))
        check_choice("seeds", self.seeds, SEED_MODES)
        _check_storage(self.storage)
        check_folder("results_dir", Path(self.results_dir).expanduser() / self.name)  # before the sweep writes

    @property
    def trial(self) -> TrialConfig:
        return TrialConfig(**{k: getattr(self, k) for k in SECTIONS})


def trial_seeds(seed: int, index: int, stream: int = 0) -> tuple[int, int]:
    """(init seed, data seed) of trial `index` of a sweep whose train.seed is `seed`: independent
    streams (numpy's SeedSequence), one per (seed, stream, index). Stream 0 is the sweep's trials,
    1 the replicates of `windtunnel confirm`, so a confirmation never reuses a search's draw."""
    import numpy as np

    init, data = np.random.SeedSequence([seed, stream, index]).generate_state(2)
    return int(init), int(data)


STORAGE_FORMS = ("'' (a journal file in the sweep's folder), a path ending in .journal, sqlite:///PATH "
                 "(its folder must exist), or a database URL whose driver is installed (postgresql://...)")


def _check_storage(url: str) -> None:
    """Checked before the sweep writes anything: a bare word became a journal file of that name
    in the cwd, and a URL Optuna cannot open was a page of SQLAlchemy traceback."""
    if not url or url.endswith(".journal"):
        if url:  # a file in the way of its folder was "File exists", after the sweep's folder was made
            check_folder("storage", Path(url).expanduser().parent)
        return
    check_field("://" in url, "storage", f"must be {STORAGE_FORMS}", url)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError, ImportError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"storage: {url!r} cannot be opened ({reason}); allowed: {STORAGE_FORMS}") from None
    if parsed.get_backend_name() == "sqlite":  # a file the workers share; in memory they could not
        db = parsed.database or ""
        check_field(db not in ("", ":memory:") and Path(db).expanduser().resolve().parent.is_dir(), "storage",
                    "sqlite:///PATH must name a file in an existing folder", url)


def sweep_file(spec: str) -> Path:
    """SWEEP is a name in sweeps/ or a path to a YAML file."""
    p = Path(spec)
    if p.suffix in (".yaml", ".yml") or "/" in spec:
        if not p.is_file():
            raise ConfigError(f"{spec}: no such sweep file")
        return p
    p = repo_dir("sweeps") / f"{spec}.yaml"
    if not p.is_file():
        names = sorted(f.stem for f in repo_dir("sweeps").glob("*.yaml"))
        raise ConfigError(f"{spec}: no such sweep (allowed: {', '.join(names)}, or a path to a YAML file)")
    return p


SWEEP_SECTIONS = {"sampler": SamplerConfig, "pruner": PrunerConfig, "executor": ExecutorConfig,
                  "tracking": TrackingConfig, "population": PopulationConfig, "extend": ExtendConfig}


def sweep_from_dict(d: dict) -> SweepConfig:
    """Build and validate a SweepConfig from nested dicts (the composed Hydra config)."""
    trial = trial_from_dict({k: d.get(k, {}) for k in SECTIONS})
    parts: dict[str, Any] = {k: getattr(trial, k) for k in SECTIONS}
    for name, cls in SWEEP_SECTIONS.items():
        values = dict(d.get(name) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        bad = set(values) - known
        if bad:
            raise ConfigError(f"{name}.{sorted(bad)[0]}: unknown key (allowed: {', '.join(sorted(known))})")
        parts[name] = cls(**values)
    top = {f.name for f in dataclasses.fields(SweepConfig)} - set(SECTIONS) - set(SWEEP_SECTIONS)
    bad = set(d) - top - set(SECTIONS) - set(SWEEP_SECTIONS) - {"defaults"}
    if bad:
        raise ConfigError(f"{sorted(bad)[0]}: unknown key (allowed: {', '.join(sorted(top | set(SECTIONS) | set(SWEEP_SECTIONS)))})")
    parts.update({k: d[k] for k in top if k in d})
    cfg = SweepConfig(**parts)
    parse_search(cfg.search, cfg.trial)  # validates the space against the trial config
    if cfg.sampler.type == "grid":
        grid_space(parse_search(cfg.search, cfg.trial))
    for name in (n.strip() for n in cfg.extend.param.split(",") if n.strip()):
        grid = grid_space(parse_search(cfg.search, cfg.trial)) if cfg.sampler.type == "grid" else {}
        p = parse_search(cfg.search, cfg.trial).get(name)
        check_field(name in grid and p.type == "float" and not p.step and min(grid[name]) > 0, "extend.param",
                    "must name float axes given by values > 0 of a grid sweep (sampler.type grid), comma-separated",
                    cfg.extend.param)
    return cfg


def doubtful(cfg: SweepConfig) -> list[str]:
    """Settings that are allowed but probably not meant, each a one-line warning."""
    import os

    out = []
    t, m = cfg.train, cfg.model
    steps = t.tokens / max(1, t.batch_size * m.seq_len)
    if steps > 1e7:  # the quickstart's trials are ~800 steps
        out.append(f"train.tokens: {t.tokens:.3g} tokens is {steps:.3g} steps a trial; at 1,000 steps a second "
                   f"one trial takes {steps / 1e3 / 86400:,.0f} days")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = cfg.executor.workers * max(1, cfg.executor.threads_per_worker)
    if cfg.executor.type == "local" and busy > cores:
        out.append(f"executor.workers: {cfg.executor.workers} workers × {max(1, cfg.executor.threads_per_worker)} "
                   f"threads on {cores} CPU cores: they take turns, and each trial runs slower (0 = one per core)")
    data_params = sorted(n for n in (cfg.search or {}) if n.startswith("data."))
    if data_params:
        from windtunnel.data import default_cache_dir

        where = cfg.data.cache_dir or default_cache_dir()
        out.append(f"search.{data_params[0]}: each value searched prepares its own dataset in {where}, which "
                   "nothing removes: delete what you no longer need when the sweep is done")
    return out
