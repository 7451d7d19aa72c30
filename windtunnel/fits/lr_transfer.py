"""μTransfer's test: the optimal lr per (parametrization, width, depth, batch) and how far it drifts.

Per group, the seeds' mean loss at each lr; the optimum is a parabola in log2(lr) through the
argmin and its neighbours (`parabola_min`). Drift across width is given in steps of the lr grid
(as in Tensor Programs V, fig. 1); across depth in octaves (log2 of the ratio of the optima),
with the goal of issue 24: under half an octave over 8x depth; across the batch (tokens a step) in
octaves and as the exponent of lr ∝ batch^beta, which `transfer --lr-batch-scaling FILE.json`
applies. Intervals: `bootstrap` over the runs (seeds) of each (group, lr) cell.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from windtunnel.errors import ConfigError
from windtunnel.fits.bootstrap import RESAMPLES, bootstrap, units
from windtunnel.fits.frames import check_frame, jsonable, where
from windtunnel.fits.optimum import curve_optimum, grid_step, rests_on_one_run

AXES = ("width", "depth", "batch")
"""What a group of runs is: its parametrization and these; an optimum's drift is measured along each."""
GOAL_OCTAVES = 0.5
GOAL_DEPTH_RATIO = 8.0
"""Issue 24's goal: the optimum moves less than GOAL_OCTAVES over GOAL_DEPTH_RATIO x depth. A sweep
spanning another ratio is held to the same rate per doubling of depth."""


@dataclass
class LrOptimum:
    parametrization: str
    width: float
    lr_opt: float
    loss_opt: float
    at_edge: bool
    """The grid's smallest or largest lr had the lowest loss: lr_opt is a bound, not an optimum."""
    depth: float | None = None
    lr_opt_ci: tuple[float, float] | None = None
    """95% bootstrap interval of lr_opt over the cell's runs (None: one run per cell, or `thin`)."""
    batch: float | None = None
    """Tokens a step (None: not in the data)."""
    thin: bool = False
    """An lr the parabola rests on has one run while others have several: resampling would hold only the
    others' noise and give too narrow an interval, so none is given until that lr has its seeds."""


@dataclass
class Drift:
    """log2(lr_opt at the largest) - log2(lr_opt at the smallest) of widths, depths or batches, at
    one value of the others."""

    parametrization: str
    axis: str
    """'width', 'depth' or 'batch'."""
    low: float
    high: float
    at: float | None
    """The width for a depth or batch drift, the depth for a width drift (None: not in the data)."""
    octaves: float
    ci: tuple[float, float] | None
    edge: bool
    """One of the two optima sat on the grid's edge: the drift is not measured."""
    goal_octaves: float | None = None
    """For depth: the most drift the goal allows over this sweep's depth ratio."""
    goal_met: bool | None = None
    """|octaves| < goal_octaves (None when an optimum sat on the edge)."""
    goal_met_95: bool | None = None
    """The whole interval lies inside ±goal_octaves (None without an interval)."""

    @property
    def per_doubling(self) -> float:
        """Octaves per doubling of the axis: for the batch, beta of lr ∝ batch^beta."""
        return self.octaves / math.log2(self.high / self.low)

    @property
    def per_doubling_ci(self) -> tuple[float, float] | None:
        return None if self.ci is None else tuple(c / math.log2(self.high / self.low) for c in self.ci)


@dataclass
class LrTransferFit:
    optima: list[LrOptimum]
    drift_steps: dict[str, float | None]
    """|log2 lr_opt(largest width) - log2 lr_opt(smallest width)| in grid steps, per parametrization."""
    grid_step_log2: dict[str, float]
    """Median spacing of each parametrization's lr grid, in log2 units."""
    drifts: list[Drift] = field(default_factory=list)
    resamples: int = 0
    """Bootstrap resamples behind the intervals (0: one run per cell, no intervals)."""

    def lr_opt(self, parametrization: str, width: float, depth: float | None = None) -> float:
        for o in self.optima:
            if o.parametrization == parametrization and o.width == width and (depth is None or o.depth == depth):
                return o.lr_opt
        raise KeyError((parametrization, width, depth))

    def drift(self, parametrization: str, axis: str) -> Drift | None:
        return next((d for d in self.drifts if d.parametrization == parametrization and d.axis == axis), None)

    def to_dict(self) -> dict:
        return jsonable({
            "optima": [asdict(o) for o in self.optima],
            "drift_steps": self.drift_steps,
            "grid_step_log2": self.grid_step_log2,
            "drifts": [asdict(d) | ({"per_doubling": d.per_doubling, "per_doubling_ci": d.per_doubling_ci}
                                    if d.axis == "batch" else {}) for d in self.drifts],
            "resamples": self.resamples,
        })


def _num(v) -> float | None:
    """An axis value of a group: None where the data do not have that axis."""
    return None if pd.isna(v) else float(v)


def _unit(d: pd.DataFrame) -> list[str] | None:
    """Rows of one run: a run or seed column names them; without either every row is a run."""
    return ["run"] if "run" in d.columns else ["seed"] if "seed" in d.columns else None


def fit_lr_transfer(df: pd.DataFrame, bootstrap_n: int = RESAMPLES, seed: int = 0) -> LrTransferFit:
    """Optimal lr per (parametrization, width[, depth][, batch]) from an lr x width (x depth x
    batch) sweep, its drift across width (grid steps), depth and batch (octaves), and bootstrap
    intervals over seeds.

    Repeated (group, lr) rows (seeds) are averaged; rows with NaN loss are dropped.
    """
    d = check_frame(df, "lr-transfer")
    where_ = where(d)
    for c in AXES[1:]:
        if c not in d.columns:
            d[c] = np.nan
    keys = ["parametrization", *AXES]
    d["_g"] = d.groupby(keys, sort=True, dropna=False).ngroup()
    groups = d.drop_duplicates("_g").sort_values("_g")[keys].to_numpy()
    steps: dict[str, float] = {}
    for p, dp in d.groupby("parametrization", sort=True):
        steps[str(p)] = grid_step(np.log2(dp["lr"].to_numpy()))
        if not np.isfinite(steps[str(p)]):
            raise ConfigError(f"{where_}: column 'lr': parametrization {p!r} has one lr value; a grid of >= 3 is needed")
    gid, x, y = d["_g"].to_numpy(), np.log2(d["lr"].to_numpy()), d["loss"].to_numpy()
    bounds_all = np.searchsorted(np.sort(gid), np.arange(len(groups) + 1))
    order_all = np.argsort(gid, kind="stable")

    def optima(idx: np.ndarray | None) -> list[tuple[float, float, bool]]:
        if idx is None:
            idx, bounds = order_all, bounds_all
        else:
            idx = idx[np.argsort(gid[idx], kind="stable")]
            bounds = np.searchsorted(gid[idx], np.arange(len(groups) + 1))
        return [curve_optimum(x[idx[a:b]], y[idx[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]

    pairs = _drift_pairs(groups)

    def statistic(idx: np.ndarray) -> dict[str, float]:
        opt = optima(idx)
        out = {f"lr_opt/{k}": 2.0 ** opt[k][0] for k in range(len(groups))}
        for j, (_, _, lo, hi, _, _) in enumerate(pairs):
            out[f"drift/{j}"] = opt[hi][0] - opt[lo][0]
        return out

    cells = units(d, ["_g", "lr"], _unit(d))
    boot = bootstrap(cells, statistic, n=bootstrap_n, seed=seed)
    # the strata are the (group, lr) cells in order: per group, its lrs ascending with their runs and mean loss
    runs = np.array([len(us) for us in cells])
    first = np.array([us[0][0] for us in cells])
    mean = np.array([y[np.concatenate(us)].mean() for us in cells])
    opt = optima(None)
    result = []
    for k, (p, w, dep, bs) in enumerate(groups):
        xo, fo, edge = opt[k]
        mine = gid[first] == k
        thin = bool(boot.n) and rests_on_one_run(mean[mine], runs[mine])
        ci = None if thin else boot[f"lr_opt/{k}"]
        result.append(LrOptimum(str(p), float(w), float(2.0**xo), fo, edge, _num(dep), ci, _num(bs), thin))
    drifts, drift_steps = [], {p: None for p in steps}
    for j, (p, axis, lo, hi, a, b) in enumerate(pairs):
        octaves = opt[hi][0] - opt[lo][0]
        edge = opt[hi][2] or opt[lo][2]
        at = groups[lo][2] if axis == "width" else groups[lo][1]
        thin = result[lo].thin or result[hi].thin  # an end without its interval has none to lend the drift
        dr = Drift(str(p), axis, float(a), float(b), _num(at), octaves, None if thin else boot[f"drift/{j}"], edge)
        if axis == "width":
            drift_steps[str(p)] = abs(octaves) / steps[str(p)]
        elif axis == "depth":
            dr.goal_octaves = GOAL_OCTAVES * math.log2(b / a) / math.log2(GOAL_DEPTH_RATIO)
            if not edge:
                dr.goal_met = abs(octaves) < dr.goal_octaves
                if dr.ci is not None:
                    dr.goal_met_95 = -dr.goal_octaves < dr.ci[0] and dr.ci[1] < dr.goal_octaves
        drifts.append(dr)
    return LrTransferFit(result, drift_steps, steps, drifts, boot.n)


def _drift_pairs(groups: np.ndarray) -> list[tuple]:
    """(parametrization, axis, group of the smallest, group of the largest, smallest, largest) for
    each axis: its drift at the first values of the other two axes (smallest first) under which it
    has >= 2 values."""
    out = []
    g = pd.DataFrame(groups, columns=["p", *AXES])
    g["k"] = range(len(g))
    for p, gp in g.groupby("p", sort=True):
        for col in AXES:
            if gp[col].isna().all():
                continue
            others = [c for c in AXES if c != col]
            for _, line in gp.groupby(others, sort=True, dropna=False):
                if line[col].nunique() >= 2:
                    line = line.sort_values(col)
                    out.append((p, col, int(line["k"].iloc[0]), int(line["k"].iloc[-1]),
                                float(line[col].iloc[0]), float(line[col].iloc[-1])))
                    break
    return out
