"""Chinchilla approach 3, L(N, D) = E + A/N^alpha + B/D^beta, and the WSD decay branches that feed it."""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from windtunnel.errors import ConfigError
from windtunnel.fits.bootstrap import LEVEL, bootstrap as resample, draws_interval, draws_of
from windtunnel.fits.frames import check_frame, field_getter, jsonable, where

try:  # installed with scikit-learn; without it the fits run the same, only slower on a busy machine
    from threadpoolctl import threadpool_limits as _blas_threads
except ImportError:  # pragma: no cover
    _blas_threads = None


def _one_blas_thread():
    """L-BFGS-B's tiny BLAS calls on several OpenBLAS threads spin-wait: on 2 busy cores the
    scaling-law fit took 2-3x the CPU time (1.7 s vs 0.7 s; 15 s vs 1 s under load)."""
    return _blas_threads(1) if _blas_threads is not None else nullcontext()


# --------------------------------------------------------------------------- scaling law

HUBER_DELTA = 1e-3
# Distinct model sizes and token counts the law needs: along N it is E + A/N^alpha, three unknowns.
# With two sizes it fits any alpha exactly (noise-free data from alpha 0.34 came back 1.36, and
# tokens per parameter 193 instead of 30).
MIN_LEVELS = 3
# Hoffmann et al. / Epoch AI's grid of initialisations (log E, log A, log B, alpha, beta).
INIT_GRID = {
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
# L-BFGS runs from the best `N_STARTS` of the 4,500 grid points (ranked by the objective
# itself, evaluated for all of them at once, 30 ms); all 4,500 runs took 55 s and, on the data
# tried, found no better optimum. A bootstrap refit starts from the full fit and the best
# `N_STARTS_BOOTSTRAP` grid points of the full data (~20 ms per resample).
N_STARTS = 32
N_STARTS_BOOTSTRAP = 1
# Box for L-BFGS-B: keeps exp() finite; alpha, beta >= 0 (a loss that grows with N or D
# is not this law).
_BOUNDS = [(-10.0, 5.0), (-20.0, 80.0), (-20.0, 80.0), (0.0, 5.0), (0.0, 5.0)]
_PARAMS = ("E", "A", "B", "alpha", "beta")


def _terms(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray) -> np.ndarray:
    """(..., 3, n): log E, log A - alpha log N, log B - beta log D for parameter rows theta (..., 5)."""
    e, a, b, al, be = (theta[..., k, None] for k in range(5))
    return np.stack(np.broadcast_arrays(e + 0 * logN, a - al * logN, b - be * logD), axis=-2)


def _huber_objective(theta: np.ndarray, logN, logD, logL, delta=HUBER_DELTA):
    """Sum of Huber(log-pred - log-obs) / delta^2 and its gradient in (e, a, b, alpha, beta).

    Dividing by delta^2 leaves the minimiser unchanged and puts the objective at O(1) per
    point, so L-BFGS's tolerances mean something (the raw Huber loss is ~1e-7 per point).
    """
    t = _terms(theta, logN, logD)  # (3, n)
    m = t.max(axis=0)
    ex = np.exp(t - m)
    s = ex.sum(axis=0)
    r = m + np.log(s) - logL
    ar = np.abs(r)
    f = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum() / delta**2
    g = np.clip(r, -delta, delta) / delta**2
    w = ex / s  # d lse / d t_k
    gw = g * w
    grad = np.array([gw[0].sum(), gw[1].sum(), gw[2].sum(), -(gw[1] * logN).sum(), -(gw[2] * logD).sum()])
    return float(f), grad


def _grid_objectives(grid: np.ndarray, logN, logD, logL, delta=HUBER_DELTA) -> np.ndarray:
    t = _terms(grid, logN, logD)  # (G, 3, n)
    m = t.max(axis=1)
    r = m + np.log(np.exp(t - m[:, None, :]).sum(axis=1)) - logL
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum(axis=1)


def _init_grid() -> np.ndarray:
    mesh = np.meshgrid(*(np.asarray(v) for v in INIT_GRID.values()), indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def _grid_starts(logN, logD, logL, k: int) -> list[np.ndarray]:
    """The `k` points of the initialisation grid with the lowest objective on these data."""
    grid = _init_grid()
    order = np.argsort(_grid_objectives(grid, logN, logD, logL), kind="stable")
    return [grid[i] for i in order[:k]]


def _fit_theta(logN, logD, logL, starts: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """L-BFGS-B from each start; the parameters (log E, log A, log B, alpha, beta) of the best."""
    best, best_f = None, np.inf
    for x0 in starts:
        res = minimize(
            _huber_objective, x0, args=(logN, logD, logL), jac=True, method="L-BFGS-B", bounds=_BOUNDS,
            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10},
        )
        if np.all(np.isfinite(res.x)) and res.fun < best_f:
            best, best_f = res.x, float(res.fun)
    return best, best_f


def compute_optimal(E: float, A: float, B: float, alpha: float, beta: float, compute: float) -> tuple[float, float]:
    """Chinchilla's closed form for C = 6 N D: (N_opt, D_opt) minimising E + A/N^alpha + B/D^beta."""
    s = alpha + beta
    G = (alpha * A / (beta * B)) ** (1.0 / s)
    return G * (compute / 6.0) ** (beta / s), (compute / 6.0) ** (alpha / s) / G


def optimal_tokens(fit: ScalingLawFit | dict, N: float) -> float:
    """The D at which a model of N parameters is compute-optimal (C = 6 N D), from the optimality
    condition alpha A / N^alpha = beta B / D^beta. D/N grows with N when alpha > beta: a ratio
    taken at the proxies' compute is not the target's."""
    get = field_getter(fit)
    return (get("beta") * get("B") / (get("alpha") * get("A"))) ** (1.0 / get("beta")) * N ** (get("alpha") / get("beta"))


def optimal_tokens_interval(fit: ScalingLawFit | dict, N: float) -> tuple[float, float] | None:
    """95% interval of the compute-optimal tokens per parameter D_opt(N) / N over the fit's bootstrap
    refits (None without them): the fit's own interval holds at its compute, a target's N is elsewhere."""
    return refit_interval(fit, lambda law: optimal_tokens(law, N) / N)


def loss_interval(fit: ScalingLawFit | dict, N: float, D: float) -> tuple[float, float] | None:
    """95% interval of L(N, D) over the fit's bootstrap refits (None without them)."""
    return refit_interval(fit, lambda law: predict_loss(law, N, D))


def refit_interval(fit: ScalingLawFit | dict, value) -> tuple[float, float] | None:
    """95% interval of value(law) over the fit's bootstrap refits, each a dict E, A, B, alpha, beta."""
    get = field_getter(fit)
    # an exponent at 0: one term does not shrink, and there is no optimum
    return draws_interval(get("draws"), lambda law: value(law) if law["alpha"] > 0 and law["beta"] > 0 else math.nan,
                          value(fit))


@dataclass
class ScalingLawFit:
    """L(N, D) = E + A/N^alpha + B/D^beta and its compute-optimal allocation at `compute` FLOPs."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    compute: float
    """The budget C = 6 N D at which N_opt, D_opt, tokens_per_param are given."""
    N_opt: float
    D_opt: float
    tokens_per_param: float
    n_points: int
    objective: float
    """Final Huber objective (sum over points, divided by delta^2)."""
    ci: dict[str, tuple[float, float]] | None = None
    """95% percentile bootstrap intervals (resampling rows), when asked for."""
    at_bound: tuple[str, ...] = ()
    """E, alpha, beta on their box's edge in the fit or its interval: the data do not determine them, nor N_opt, D_opt."""
    N_range: tuple[float, float] | None = None
    """The smallest and largest N fitted: a target past them is an extrapolation."""
    draws: dict | None = None
    """The bootstrap refits (`bootstrap.draws_of`): the interval of a number at another N or D than the
    fit's (`optimal_tokens_interval`, `loss_interval`)."""

    def predict(self, N, D):
        return predict_loss(self, N, D)

    def at_compute(self, compute: float) -> tuple[float, float]:
        """(N_opt, D_opt) at another budget."""
        return compute_optimal(self.E, self.A, self.B, self.alpha, self.beta, compute)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("E", "A", "B", "alpha", "beta", "N_opt", "D_opt", "tokens_per_param",
                                           "compute", "n_points", "at_bound", "N_range")}
        if self.ci is not None:
            d["ci"] = {k: list(v) for k, v in self.ci.items()}
        return jsonable(d | {"draws": self.draws} if self.draws is not None else d)


def predict_loss(fit: ScalingLawFit | dict, N, D):
    """L(N, D) from a ScalingLawFit or a dict with E, A, B, alpha, beta (e.g. the --json output)."""
    get = field_getter(fit)
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    out = get("E") + get("A") / N ** get("alpha") + get("B") / D ** get("beta")
    return float(out) if np.ndim(out) == 0 else out


def _law_from_theta(theta, compute: float) -> dict[str, float]:
    e, a, b, al, be = (float(v) for v in theta)
    E, A, B = math.exp(e), math.exp(a), math.exp(b)
    if al > 0 and be > 0:
        N_opt, D_opt = compute_optimal(E, A, B, al, be, compute)
    else:  # one term does not shrink: no finite optimum
        N_opt = D_opt = float("nan")
    return {"E": E, "A": A, "B": B, "alpha": al, "beta": be, "N_opt": N_opt, "D_opt": D_opt,
            "tokens_per_param": D_opt / N_opt}


def fit_scaling_law(df: pd.DataFrame, compute: float | None = None, bootstrap: int = 0, seed: int = 0) -> ScalingLawFit:
    """Chinchilla approach 3 on rows (N, D, loss); N parameters, D tokens.

    Minimises the Huber loss (delta 1e-3) between log E+A/N^a+B/D^b (as a logsumexp) and log
    loss with L-BFGS-B from the best of Hoffmann et al.'s grid of starts. `compute` defaults
    to the largest 6 N D in the data. `bootstrap` K > 0 refits K resamples of the rows
    (numpy Generator seeded with `seed`) and adds 95% percentile intervals as `ci`.
    """
    d = check_frame(df, "scaling-law")
    where_ = where(d)
    if len(d) < 5:
        raise ConfigError(f"{where_}: {len(d)} rows with a finite 'loss'; the scaling law has 5 parameters, >= 5 rows needed")
    if d["N"].nunique() < MIN_LEVELS or d["D"].nunique() < MIN_LEVELS:
        raise ConfigError(f"{where_}: columns 'N','D': >= {MIN_LEVELS} distinct values of each are needed, as "
                          f"E + A/N^alpha has 3 unknowns along N (B/D^beta likewise along D) "
                          f"(got {d['N'].nunique()} N, {d['D'].nunique()} D)")
    logN, logD, logL = (np.log(d[c].to_numpy()) for c in ("N", "D", "loss"))
    if compute is None:
        compute = float((6.0 * d["N"] * d["D"]).max())
    elif not (np.isfinite(compute) and compute > 0):
        raise ConfigError(f"compute: must be a finite FLOP count > 0 (got {compute!r})")
    if bootstrap and bootstrap < 2:
        raise ConfigError(f"bootstrap: number of resamples must be >= 2 (got {bootstrap})")
    with _one_blas_thread():
        return _fit_scaling_law(logN, logD, logL, compute, bootstrap, seed)


def _fit_scaling_law(logN, logD, logL, compute: float, bootstrap: int, seed: int) -> ScalingLawFit:
    grid_starts = _grid_starts(logN, logD, logL, N_STARTS)
    theta, fval = _fit_theta(logN, logD, logL, grid_starts)
    law = _law_from_theta(theta, compute)
    ci = draws = None
    if bootstrap:
        def refit(idx: np.ndarray) -> dict[str, float]:
            th, _ = _fit_theta(logN[idx], logD[idx], logL[idx], [theta] + grid_starts[:N_STARTS_BOOTSTRAP])
            return _law_from_theta(th, compute)

        # each row is a unit, one stratum: the rows' (N, D) design is resampled with the noise
        boot = resample([[np.array([i]) for i in range(len(logL))]], refit, n=bootstrap, seed=seed, level=LEVEL)
        ci = {k: v if v is not None else (float("nan"),) * 2 for k, v in boot.intervals.items()}
        draws = draws_of(boot, _PARAMS)
    return ScalingLawFit(**law, compute=float(compute), n_points=len(logL), objective=fval, ci=ci,
                         at_bound=_undetermined(theta, ci), draws=draws,
                         N_range=(float(np.exp(logN.min())), float(np.exp(logN.max()))))


def _undetermined(theta: np.ndarray, ci: dict | None) -> tuple[str, ...]:
    """E, alpha, beta on their box's edge, in the fit or (with a bootstrap) its 95% interval: the data do
    not fix them. E on its floor is a law without a loss floor; an exponent whose interval reaches its bound
    is not measured (wsd_prose_tuned: alpha 2.5 [0.09, 5.1], tokens per parameter 28 to 18,508;
    wsd_prose_wide: E 1.6 [-0.04, 2.7])."""
    out = []
    for i in (0, 3, 4):  # A's and B's boxes are wide enough never to bind
        # E's interval, stretched past its resamples (bootstrap.py), can end below zero: its floor, reached
        vals = [theta[i]] + [x if i else (math.log(x) if x > 0 else -math.inf)
                             for x in (ci[_PARAMS[i]] if ci else ()) if math.isfinite(x)]
        lo, hi = _BOUNDS[i]
        if min(vals) - lo < 1e-6 or hi - max(vals) < 1e-6:
            out.append(_PARAMS[i])
    return tuple(out)


# --------------------------------------------------------------------------- WSD branches


@dataclass
class WsdFit:
    points: pd.DataFrame
    """One row per decay branch: model, N, D (tokens at the end of the decay), loss; sorted."""
    scaling_law: ScalingLawFit | None
    """The (N, D, loss) law, when the points span >= MIN_LEVELS sizes and token counts; else None."""

    def loss_vs_data(self) -> pd.DataFrame:
        """Wide table: one row per D, one column per model (N in the header)."""
        p = self.points.assign(size=[f"{m} (N={n:.3g})" for m, n in zip(self.points["model"], self.points["N"])])
        return p.pivot_table(index="D", columns="size", values="loss", aggfunc="mean")

    def to_dict(self) -> dict:
        return jsonable({
            "points": self.points.to_dict(orient="records"),
            "scaling_law": self.scaling_law.to_dict() if self.scaling_law is not None else None,
        })


def fit_wsd(df: pd.DataFrame, compute: float | None = None, bootstrap: int = 0, seed: int = 0) -> WsdFit:
    """Loss vs data per model size from WSD decay branches, and the scaling law they feed.

    Rows are (model, N, tokens, loss), one per decay branch. Each model must have one N.
    `points` (columns model, N, D, loss) is the frame `fit_scaling_law` takes.
    """
    d = check_frame(df, "wsd")
    where_ = where(d)
    sizes = d.groupby("model")["N"].nunique()
    if (sizes > 1).any():
        m = sizes.index[sizes > 1][0]
        raise ConfigError(f"{where_}: column 'N': model {m!r} has {int(sizes[m])} different N values; one per model")
    pts = (d.rename(columns={"tokens": "D"})[["model", "N", "D", "loss"]]
           .sort_values(["N", "D"], kind="stable").reset_index(drop=True))
    law = None
    if pts["N"].nunique() >= MIN_LEVELS and pts["D"].nunique() >= MIN_LEVELS:
        sl = pts[["N", "D", "loss"]].copy()
        sl.attrs["source"] = where_
        law = fit_scaling_law(sl, compute=compute, bootstrap=bootstrap, seed=seed)
    return WsdFit(pts, law)
