"""The training-horizon law: the optimal lr falls with the token budget, lr*(T) = a · T^-b
(Bjorck et al. 2024, "Scaling Optimal LR Across Token Horizons").

Per token budget T: the seeds' mean final loss at each (lr, init_std); lr*(T) is a parabola in
log2(lr) over the loss profiled over init_std (the best init_std at each lr), init_std*(T) the
same over the loss profiled over lr. Then log lr* = log a - b log T by least squares over the
budgets whose lr optimum lies inside the grid (init_std*(T) = c · T^-d likewise, reported).
Intervals: `bootstrap` over the runs of each (T, lr, init_std) cell.

transfer applies it as a factor on the proxy's lr: (T_target / T_proxy)^-b. The factor, not
a · T_target^-b, so that the lr the proxy's own sweep found at its budget stays the anchor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from windtunnel.errors import ConfigError
from windtunnel.fits.bootstrap import RESAMPLES, bootstrap, cell_means, units
from windtunnel.fits.frames import check_frame, jsonable, where
from windtunnel.fits.optimum import LR_HALF_WINDOW, parabola_min, rests_on_one_run

MIN_BUDGETS = 3
# Below this r² the power law explains too little of how the optimum moved to extrapolate it over
# orders of magnitude of tokens (the committed code-corpus sweep: 0.38).
WEAK_R2 = 0.8


@dataclass
class HorizonPoint:
    tokens: float
    lr_opt: float
    loss_opt: float
    at_edge: bool
    """The lowest loss was at the lr grid's smallest or largest value: lr_opt is a bound (not fitted)."""
    lr_opt_ci: tuple[float, float] | None = None
    init_std_opt: float | None = None
    init_std_at_edge: bool | None = None
    thin: bool = False
    """A cell the lr parabola rests on has one run while others have several: no interval (as in
    `LrOptimum.thin`), and none for a law this point enters."""


@dataclass
class HorizonFit:
    """lr*(T) = a · T^-b, T in tokens."""

    a: float
    b: float
    r2: float
    points: list[HorizonPoint]
    ci: dict[str, tuple[float, float] | None] | None = None
    """95% bootstrap intervals of a and b (and c, d), over runs; None with one run per cell, and a
    law's None while a point it rests on is `thin` (for c, d: a cell its init_std parabola rests on)."""
    resamples: int = 0
    c: float | None = None
    d: float | None = None
    """init_std*(T) = c · T^-d, when init_std was searched and >= 2 of its optima are interior."""

    def lr_at(self, tokens: float) -> float:
        return self.a * float(tokens) ** -self.b

    def to_dict(self) -> dict:
        return jsonable({"a": self.a, "b": self.b, "r2": self.r2, "c": self.c, "d": self.d, "ci": self.ci,
                         "resamples": self.resamples, "points": [asdict(p) for p in self.points]})


def horizon_factor(law: dict, proxy_tokens: float, target_tokens: float) -> float:
    """(target / proxy)^-b: what the proxy's lr is multiplied by at the target's token budget."""
    return float((float(target_tokens) / float(proxy_tokens)) ** -float(law["b"]))


def _power_law(T: np.ndarray, v: np.ndarray) -> tuple[float, float, float]:
    """(a, b, r2) of v = a · T^-b by least squares in logs; NaNs with < 2 distinct T."""
    if len(T) < 2 or np.ptp(np.log(T)) <= 0:
        return np.nan, np.nan, np.nan
    lt, lv = np.log(T), np.log(v)
    slope, icpt = np.polyfit(lt, lv, 1)
    ss = float(np.sum((lv - lv.mean()) ** 2))
    r2 = 1.0 - float(np.sum((lv - icpt - slope * lt) ** 2)) / ss if ss > 0 else np.nan
    return float(np.exp(icpt)), float(-slope), r2


def _thin(t: tuple, mean: np.ndarray, runs: np.ndarray) -> tuple[bool, bool]:
    """Whether a cell one budget's lr parabola (its init_std parabola) rests on has a single run: the
    argmin of the profiled loss and its neighbours, each at its best init_std (lr)."""
    lrs, stds, li, si, ids = t
    grid, cell = np.full((len(lrs), len(stds)), np.inf), np.zeros((len(lrs), len(stds)), dtype=int)
    grid[li, si] = np.where(np.isfinite(mean[ids]), mean[ids], np.inf)
    cell[li, si] = ids
    lr = rests_on_one_run(grid.min(axis=1), runs[cell[np.arange(len(lrs)), grid.argmin(axis=1)]])
    std = len(stds) >= 3 and rests_on_one_run(grid.min(axis=0),
                                              runs[cell[grid.argmin(axis=0), np.arange(len(stds))]], 2)
    return lr, bool(std)


def fit_horizon(df: pd.DataFrame, bootstrap_n: int = RESAMPLES, seed: int = 0) -> HorizonFit:
    """lr*(T) = a · T^-b from an lr (x init_std) x token-budget sweep."""
    d = check_frame(df, "horizon")
    where_ = where(d)
    has_std = "init_std" in d.columns and d["init_std"].nunique() > 1
    if "init_std" not in d.columns:
        d["init_std"] = 1.0
    budgets = np.sort(d["tokens"].unique())
    if len(budgets) < MIN_BUDGETS:
        raise ConfigError(f"{where_}: column 'tokens': {len(budgets)} token budgets; >= {MIN_BUDGETS} needed "
                          "(issue 24: three or more spanning >= 16x)")
    d["_cell"] = d.groupby(["tokens", "lr", "init_std"], sort=True).ngroup()
    cells = d.drop_duplicates("_cell").sort_values("_cell")
    for t, g in cells.groupby("tokens"):
        if g["lr"].nunique() < 3:
            raise ConfigError(f"{where_}: column 'lr': tokens {t:g} has {g['lr'].nunique()} lr values; >= 3 needed")
    per_t = []  # per budget: the cells as (lr index, std index) into its sorted lr and std values
    for t, g in cells.groupby("tokens", sort=True):
        lrs, stds = np.sort(g["lr"].unique()), np.sort(g["init_std"].unique())
        per_t.append((lrs, stds, np.searchsorted(lrs, g["lr"]), np.searchsorted(stds, g["init_std"]),
                      g["_cell"].to_numpy()))
    code, loss, n_cells = d["_cell"].to_numpy(), d["loss"].to_numpy(), len(cells)

    def solve(idx: np.ndarray):
        mean = cell_means(code, loss, idx, n_cells)
        out = []
        for lrs, stds, li, si, ids in per_t:
            grid = np.full((len(lrs), len(stds)), np.inf)
            grid[li, si] = np.where(np.isfinite(mean[ids]), mean[ids], np.inf)
            xl, fl, el = parabola_min(np.log2(lrs), grid.min(axis=1), LR_HALF_WINDOW)
            xs, _, es = parabola_min(np.log2(stds), grid.min(axis=0)) if len(stds) >= 3 else (np.nan, 0, True)
            out.append((2.0**xl, fl, el, 2.0**xs, es))
        inner = [(t, o) for t, o in zip(budgets, out) if not o[2]]
        lr_law = _power_law(np.array([t for t, _ in inner]), np.array([o[0] for _, o in inner]))
        inner = [(t, o) for t, o in zip(budgets, out) if not o[4]]
        std_law = _power_law(np.array([t for t, _ in inner]), np.array([o[3] for _, o in inner]))
        return out, lr_law, std_law

    out, (a, b, r2), (c, dd, _) = solve(np.arange(len(d)))

    def statistic(idx: np.ndarray) -> dict[str, float]:
        o, (ra, rb, _), (rc, rd, _) = solve(idx)
        s = {"a": ra, "b": rb, **{f"lr_opt/{k}": v[0] for k, v in enumerate(o)}}
        return {**s, "c": rc, "d": rd} if has_std else s

    unit = ["run"] if "run" in d.columns else ["seed"] if "seed" in d.columns else None
    strata = units(d, ["_cell"], unit)
    boot = bootstrap(strata, statistic, n=bootstrap_n, seed=seed)
    runs = np.array([len(us) for us in strata])  # runs per cell (the strata are the cells, in order)
    mean = cell_means(code, loss, np.arange(len(d)), n_cells)
    thin = [_thin(t, mean, runs) if boot.n else (False, False) for t in per_t]
    points = [HorizonPoint(float(t), float(o[0]), float(o[1]), bool(o[2]), None if th[0] else boot[f"lr_opt/{k}"],
                           float(o[3]) if has_std else None, bool(o[4]) if has_std else None, th[0])
              for k, (t, o, th) in enumerate(zip(budgets, out, thin))]
    if not np.isfinite(a):
        edges = ", ".join(f"{p.tokens:g}" for p in points if p.at_edge)
        raise ConfigError(f"{where_}: column 'lr': the optimum sat on the lr grid's edge at tokens {edges}; "
                          ">= 2 interior optima needed (extend the lr grid past that edge)")
    ci = None
    if boot.n:
        thin_lr = any(th[0] for th, o in zip(thin, out) if not o[2])  # only the points the law is fitted on
        thin_std = any(th[1] for th, o in zip(thin, out) if not o[4])
        ci = {k: None if (thin_std if k in "cd" else thin_lr) else boot[k]
              for k in (("a", "b", "c", "d") if has_std else ("a", "b"))}
    return HorizonFit(a, b, r2, points, ci, boot.n, c if has_std and np.isfinite(c) else None,
                      dd if has_std and np.isfinite(dd) else None)
