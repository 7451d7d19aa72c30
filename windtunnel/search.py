"""Optuna: the study a sweep owns, its samplers and pruners, and the search space as
distributions. The driver (windtunnel/sweep.py) is the only caller of ask and tell; workers
only report intermediate values (windtunnel/worker.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
from optuna.storages import JournalStorage

from windtunnel.config.trial import RUN_ONLY, changed_settings, settings
from windtunnel.data import identity_changes
from windtunnel.errors import ConfigError
from windtunnel.journal import JournalFile
from windtunnel.config.space import Param, grid_space, parse_search
from windtunnel.config.sweep import PrunerConfig, SamplerConfig, SweepConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_url(cfg: SweepConfig, sweep_dir: Path) -> str:
    """The study's storage: a journal file by default (scripts/bench: cheaper than SQLite at
    1,000 trials, and safe for several processes on one shared filesystem)."""
    return cfg.storage or str(sweep_dir / "study.journal")


def open_storage(url: str):
    if url.endswith(".journal") or "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFile(url))
    return url


def distribution(p: Param) -> optuna.distributions.BaseDistribution:
    if p.type == "float":
        return optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    if p.type == "int":
        return optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    if p.type == "categorical":
        return optuna.distributions.CategoricalDistribution(list(p.choices))
    raise ValueError(f"no distribution for a {p.type} param")


def distributions(cfg: SweepConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    out = {n: distribution(p) for n, p in parse_search(cfg.search, cfg.trial).items() if p.type != "fixed"}
    from windtunnel.grid_extend import extended, widened

    for name in extended(cfg):  # room for the points grid_extend adds past the grid's ends
        d = out[name]
        out[name] = optuna.distributions.FloatDistribution(*widened(d.low, d.high, cfg), log=d.log)
    return out


def fixed_params(cfg: SweepConfig) -> dict:
    return {n: p.value for n, p in parse_search(cfg.search, cfg.trial).items() if p.type == "fixed"}


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler calls study.stop() once the grid is covered, which only works inside
    study.optimize; the driver stops at n_trials itself."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(s: SamplerConfig, cfg: SweepConfig, seed: int | None = None) -> optuna.samplers.BaseSampler:
    seed = s.seed if seed is None else seed
    if s.type == "tpe":
        # constant_liar: running trials count as observations, so parallel asks spread out
        return optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=seed,
                                          n_startup_trials=s.n_startup_trials)
    if s.type == "gp":
        import torch  # GPSampler fits its model with torch

        torch.set_num_threads(s.threads or max(1, min(4, (os.cpu_count() or 1) // 4)))
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials)
    if s.type == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=s.n_startup_trials)
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.type == "grid":
        # the study's own seed, never a resume's: GridSampler shuffles its points by the seed and
        # stores only their index, so a reseeded one ran some points twice and others never
        return _GridSampler(grid_space(parse_search(cfg.search, cfg.trial)), seed=s.seed)
    raise ConfigError(f"sampler.type: must be one of tpe, gp, cmaes, random, grid (got {s.type!r})")


def make_pruner(p: PrunerConfig) -> optuna.pruners.BasePruner:
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_evals)
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(reduction_factor=p.reduction_factor)
    if p.type == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def space_fingerprint(cfg: SweepConfig) -> str:
    """The search space a study was created with (its sampler may change on a resume)."""
    return json.dumps({"search": cfg.search}, sort_keys=True, default=str)


def trial_settings(cfg: SweepConfig) -> dict:
    """The fixed trial settings every result of the study was measured under: the trial config
    less what the search space sets and what only changes how a trial runs."""
    searched = set(parse_search(cfg.search, cfg.trial))
    return {k: v for k, v in settings(cfg.trial).items() if k not in searched and k not in RUN_ONLY}


def space_changes(before: dict, now: dict) -> list[str]:
    """'search.PARAM.FIELD old -> new', 'search.PARAM added' or 'removed', for each difference."""
    out = [f"search.{n} {'added' if n in now else 'removed'}" for n in sorted(set(before) ^ set(now))]
    for n in sorted(set(before) & set(now)):
        b, a = before[n], now[n]
        if not (isinstance(b, dict) and isinstance(a, dict)):
            out += [f"search.{n} {b!r} -> {a!r}"] if a != b else []
            continue
        shown = lambda d, k: repr(d[k]) if k in d else "unset"  # noqa: E731
        out += [f"search.{n}.{k} {shown(b, k)} -> {shown(a, k)}"
                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out


def _check_resumed(study: optuna.Study, cfg: SweepConfig) -> None:
    """A resumed study keeps its search space and trial settings: results measured under other
    settings (a wider model, a longer budget) would be ranked as one (Optuna issues 2199, 2328).
    Its sampler may change: Optuna keeps no sampler state in the storage, the next one reads the
    same trials."""
    stored = study.user_attrs.get("space")
    now = space_fingerprint(cfg)
    if stored is None:
        study.set_user_attr("space", now)
    else:
        changed = space_changes(json.loads(stored)["search"], json.loads(now)["search"])
        if changed:
            raise ConfigError(f"{changed[0].split()[0]}: study {cfg.name!r} searched another space "
                              f"({'; '.join(changed)}); set it back, or use a new name= or results_dir=")
    # a study made before trials had their own seeds ran every trial with train.seed: common
    seeds = study.user_attrs.get("seeds", "common" if study.get_trials(deepcopy=False) else cfg.seeds)
    if seeds != cfg.seeds:
        raise ConfigError(f"seeds: study {cfg.name!r} ran its trials with seeds={seeds} (now {cfg.seeds}); "
                          f"set seeds={seeds} to resume it, or use a new name= or results_dir=")
    if "seeds" not in study.user_attrs:
        study.set_user_attr("seeds", seeds)
    now, before = trial_settings(cfg), study.user_attrs.get("trial_settings")
    if before is None:
        study.set_user_attr("trial_settings", now)
        return
    changed = changed_settings(before, now)
    if changed:
        raise ConfigError(f"{changed[0].split()[0]}: study {cfg.name!r} ran its trials with other settings "
                          f"({'; '.join(changed)}); set them back, or use a new name= or results_dir=")


def check_data(study: optuna.Study, name: str, data: dict | None) -> None:
    """The study's first data identity (windtunnel.data.identity) is kept; data that differs is
    refused: the same data.source path on a fresh machine may hold tokens prepared from other text.
    Asked by the driver where it can read the data, and of every result a worker returns."""
    if not data:
        return
    before = study.user_attrs.get("data")
    if before is None:
        study.set_user_attr("data", data)
        return
    changed = identity_changes(before, data)
    if changed:
        raise ConfigError(f"data.source: study {name!r} trained its trials on other tokens "
                          f"({'; '.join(changed)}); point it at that data, or use a new name= or results_dir=")


def open_study(cfg: SweepConfig, sweep_dir: Path) -> optuna.Study:
    """Create the study, or load it and check it is resumed with its space and trial settings."""
    study = optuna.create_study(study_name=cfg.name, storage=open_storage(storage_url(cfg, sweep_dir)),
                                sampler=make_sampler(cfg.sampler, cfg), pruner=make_pruner(cfg.pruner),
                                direction="minimize", load_if_exists=True)
    n = len(study.get_trials(deepcopy=False))
    if n:  # resumed: a sampler seeded as the first run's would draw its random points again
        study.sampler = make_sampler(cfg.sampler, cfg, seed=cfg.sampler.seed + n)
    _check_resumed(study, cfg)
    return study
