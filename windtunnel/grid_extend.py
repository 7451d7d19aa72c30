"""A grid sweep's axes grown past their edges until each optimum is interior (SweepConfig.extend).

An optimum on a grid's edge is only a bound: the batch-size protocol of issue 23 tunes the lr per
batch size on a small grid and must not leave a batch size's best lr at the grid's end. Once the
grid is finished, the driver asks `edge_points` for new trials: for every group (one value of
each other grid axis but the replicates, train.seed and train.data_seed), the mean loss of each
value of the axis over the group's finished trials, a diverged trial counting as +inf; where the
lowest sits at the smallest (largest) value tried, the next value below (above), one per
replicate of the grid. The driver enqueues them and asks again when they are done, so a sweep
resumed after a stop goes on where it was; a group stops growing after max_steps new values a
side (the fits then report its optimum as on the edge).
"""
from __future__ import annotations

import itertools
import math

import optuna

from windtunnel.config.space import grid_space, parse_search
from windtunnel.config.sweep import SweepConfig

REPLICATES = ("train.seed", "train.data_seed")
MARK = "extension"
"""User attribute of a trial the driver adds past n_trials (its side: 'low' or 'high', or 'missing':
a grid point missing_points found); the driver counts them."""


def _params(t: optuna.trial.FrozenTrial) -> dict:
    """A trial's parameters, also while it waits in the queue (then only its enqueued ones)."""
    return t.params or dict(t.system_attrs.get("fixed_params", {}))


def _loss(t: optuna.trial.FrozenTrial) -> float | None:
    """Its final loss; +inf if it diverged (the lr is past the edge of stability); None if unknown."""
    if t.user_attrs.get("retried"):
        return None
    if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
        return t.value
    if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("result", {}).get("status") == "diverged":
        return math.inf
    return None


def extended(cfg: SweepConfig) -> list[str]:
    """The axes cfg.extend.param names (comma-separated)."""
    return [n.strip() for n in cfg.extend.param.split(",") if n.strip()]


def edge_points(study: optuna.Study, cfg: SweepConfig) -> list[tuple[dict, str]]:
    """(params, side) of each trial to add: the next value past every edge optimum of the extended axes.

    With several axes (optim.lr,model.init_std) a group's optimum is its best cell over all of
    them; an axis whose best value is on its edge gets the next value at every value of the others
    (a whole row of the grid: a fit that profiles one axis over the other needs it complete)."""
    names = extended(cfg)
    if not names:
        return []
    ext = cfg.extend
    grid = grid_space(parse_search(cfg.search, cfg.trial))
    others = [n for n in grid if n not in names and n not in REPLICATES]
    reps = [n for n in grid if n in REPLICATES]
    groups: dict[tuple, dict[tuple, list[float]]] = {}
    for t in study.get_trials(deepcopy=False):
        p = _params(t)
        if any(n not in p for n in names) or t.user_attrs.get("retried"):
            continue
        cell = tuple(float(p[n]) for n in names)
        tried = groups.setdefault(tuple(p.get(n) for n in others), {}).setdefault(cell, [])
        loss = _loss(t)
        if loss is not None:
            tried.append(loss)
    out = []
    for key, tried in sorted(groups.items(), key=lambda kv: repr(kv[0])):
        means = {c: sum(ls) / len(ls) for c, ls in tried.items() if ls}
        if not means or min(means.values()) == math.inf:
            continue
        best = min(means, key=means.get)
        base = dict(zip(others, key))
        for i, name in enumerate(names):
            values = sorted({c[i] for c in tried})  # pending ones included: a point asked is not asked again
            lo0, hi0 = min(grid[name]), max(grid[name])
            for side, edge, new, n_beyond in (
                    ("low", values[0], values[0] / ext.factor, sum(v < lo0 for v in values)),
                    ("high", values[-1], values[-1] * ext.factor, sum(v > hi0 for v in values))):
                if best[i] == edge and n_beyond < ext.max_steps:  # a whole row: the grid stays rectangular
                    rows = itertools.product(*(sorted({c[j] for c in tried}) if j != i else [new]
                                               for j in range(len(names))))
                    out += [({**base, **rep, **dict(zip(names, row))}, side)
                            for row in rows for rep in _replicates(grid, reps)]
    return out


def missing_points(study: optuna.Study, cfg: SweepConfig) -> list[dict]:
    """The grid's points no trial ran or waits to run, once the grid sampler has used every index.

    A driver that reseeded the GridSampler (before it kept the study's seed) ran some points twice
    and others never, while the sampler counts its grid covered: these are the points to run."""
    if cfg.sampler.type != "grid":
        return []
    grid = grid_space(parse_search(cfg.search, cfg.trial))
    trials = study.get_trials(deepcopy=False)
    used = {t.system_attrs["grid_id"] for t in trials if "grid_id" in t.system_attrs}
    if len(used) < math.prod(len(v) for v in grid.values()):
        return []
    ran = {tuple(_params(t).get(n) for n in grid) for t in trials if not t.user_attrs.get("retried")}
    return [dict(zip(grid, v)) for v in itertools.product(*grid.values()) if v not in ran]


def _replicates(grid: dict[str, list], reps: list[str]) -> list[dict]:
    combos = [{}]
    for n in reps:
        combos = [{**c, n: v} for c in combos for v in grid[n]]
    return combos


def widened(low: float, high: float, cfg: SweepConfig) -> tuple[float, float]:
    """The extended axis' range for Optuna's distribution: the grid's, max_steps factors wider each side."""
    k = cfg.extend.factor ** cfg.extend.max_steps
    return low / k, high * k
