"""The laws the wind tunnel fits, as plain functions over pandas frames.

    fit_lr_transfer(df)   optimal lr per (parametrization, width) and its drift across widths
    fit_batch_size(df)    MiniCPM: loss-minimising batch size per (model, tokens), bs_opt = a / L^b
    fit_scaling_law(df)   Chinchilla approach 3: L = E + A/N^alpha + B/D^beta, compute-optimal N, D
    fit_wsd(df)           WSD decay branches -> loss vs data per size -> the (N, D, loss) scaling law
    predict_loss(fit, N, D)

Each fit returns a dataclass with `to_dict()` (what `windtunnel fit KIND --json` prints). Input
frames are checked here, so `windtunnel report` and the transfer module get the same one-line
`ConfigError`s as the CLI; `load_csv(path, kind)` names the file in them (it sets
`df.attrs["source"]`) and also reads a sweep's results (`sweep_frame`). Only numpy, pandas and
scipy (yaml for a sweep's best.yaml): no torch, no tracking.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from windtunnel.errors import ConfigError

try:  # installed with scikit-learn; without it the fits run the same, only slower on a busy machine
    from threadpoolctl import threadpool_limits as _blas_threads
except ImportError:  # pragma: no cover
    _blas_threads = None


def _one_blas_thread():
    """L-BFGS-B's tiny BLAS calls on several OpenBLAS threads spin-wait: on 2 busy cores the
    scaling-law fit took 2-3x the CPU time (1.7 s vs 0.7 s; 15 s vs 1 s under load)."""
    return _blas_threads(1) if _blas_threads is not None else nullcontext()

# Columns each fit needs; extra columns are ignored.
COLUMNS: dict[str, tuple[str, ...]] = {
    "lr-transfer": ("parametrization", "width", "lr", "loss"),
    "batch-size": ("model", "batch_size", "tokens", "loss"),
    "scaling-law": ("N", "D", "loss"),
    "wsd": ("model", "N", "tokens", "loss"),
}
# Columns that must be numeric (the others are labels).
_NUMERIC = {"width", "lr", "loss", "batch_size", "tokens", "N", "D"}
# Columns that must be > 0 where present (they are taken logs of).
_POSITIVE = {"width", "lr", "batch_size", "tokens", "N", "D"}


# --------------------------------------------------------------------------- input


def _where(df: pd.DataFrame) -> str:
    return str(df.attrs.get("source", "data frame"))


def _read_csv(p: Path, need: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(p)
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{p}: file is empty; expected a CSV with columns {need}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{p}: not a readable CSV ({first}); expected columns {need}") from None
    df.columns = [str(c).strip() for c in df.columns]
    df.attrs["source"] = str(p)
    return df


def load_csv(path: str | Path, kind: str) -> pd.DataFrame:
    """Read and check the input of fit `kind`: a CSV of its columns, or a sweep's results folder or
    one of its tables (see `sweep_frame`); errors name the file and the column."""
    if kind not in COLUMNS:
        raise ConfigError(f"fit kind: unknown {kind!r}; allowed: {', '.join(COLUMNS)}")
    p = Path(path)
    need = ",".join(COLUMNS[kind])
    if p.is_dir():
        return check_frame(sweep_frame(p, kind), kind)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file (a CSV with columns {need}, or a sweep's results folder, is expected)")
    df = _read_csv(p, need)
    # A sweep's own table (number,state,<dotted params>,...) rather than one of the fit's columns.
    if "state" in df.columns and not set(COLUMNS[kind]) <= set(df.columns):
        return check_frame(sweep_frame(p, kind), kind)
    return check_frame(df, kind)


# What a sweep writes (windtunnel.results) -> the frame a fit takes: the table read, and each fit
# column's source column in it (parameters under their dotted config keys, searched or fixed).
SWEEP_SOURCES: dict[str, tuple[str, dict[str, str]]] = {
    # final validation loss of each trial
    "lr-transfer": ("trials.csv", {"parametrization": "model.parametrization", "width": "model.d_model",
                                   "lr": "optim.lr", "loss": "value"}),
    # the loss at every evaluation: one batch-size optimum per (model, token count)
    "batch-size": ("curves.csv", {"model": "model.d_model", "batch_size": "train.batch_size",
                                  "tokens": "tokens", "loss": "val_loss"}),
    # the loss at the end of every decay branch (train.branch_at)
    "wsd": ("branches.csv", {"model": "model.d_model", "N": "n_params", "tokens": "tokens",
                             "loss": "final_val_loss"}),
}


def sweep_frame(path: str | Path, kind: str) -> pd.DataFrame:
    """The frame fit `kind` takes (unchecked), from a sweep's results folder or a table in it.

    lr-transfer reads trials.csv, batch-size curves.csv, wsd branches.csv: the given file if it is
    that table, else the one beside it. Only COMPLETE trials count (FAIL, PRUNED and retried ones
    do not). batch-size gives batch sizes in tokens (train.batch_size x model.seq_len) and rounds
    token counts to multiples of train.eval_every (trials of different batch sizes evaluate a few
    steps apart); batch-size and wsd name models d<d_model>. A setting not in the table (seq_len,
    eval_every) is read from the folder's best.yaml.
    """
    p = Path(path)
    if kind not in SWEEP_SOURCES:
        raise ConfigError(f"{p}: fit {kind} takes a CSV with columns {','.join(COLUMNS.get(kind, ()))}; "
                          f"only {', '.join(SWEEP_SOURCES)} read a sweep's results")
    name, src = SWEEP_SOURCES[kind]
    need = ",".join(src.values())
    table = p / name if p.is_dir() else p
    if not table.is_file():
        raise ConfigError(f"{table}: no such file; fit {kind} reads a sweep's {name}")
    df = _read_csv(table, need)
    if src["loss"] not in df.columns and not p.is_dir():  # e.g. trials.csv for batch-size: its curves.csv
        table = p.parent / name
        if not table.is_file():
            raise ConfigError(f"{p}: missing column {src['loss']!r} and no {name} beside it; "
                              f"fit {kind} reads a sweep's {name}")
        df = _read_csv(table, need)
    where = str(table)
    if "state" not in df.columns:
        raise ConfigError(f"{where}: missing column 'state' (a sweep's {name} has it)")
    df = df[df["state"] == "COMPLETE"]

    def col(c: str) -> pd.Series:
        s = src[c]
        if s not in df.columns:
            hint = (f"the sweep parameter that gives {kind}'s {c!r}: search it, type fixed for one value"
                    if "." in s else f"it gives {kind}'s {c!r}; a sweep's {name} has it")
            raise ConfigError(f"{where}: missing column {s!r} ({hint})")
        return df[s]

    out = pd.DataFrame({c: col(c) for c in src})
    if kind in ("batch-size", "wsd"):
        out["model"] = "d" + out["model"].astype(str)
    if kind == "batch-size":
        seq = _sweep_setting(df, table, "model.seq_len", kind, "'batch_size' in tokens")
        every = _sweep_setting(df, table, "train.eval_every", kind, "'tokens' shared by all batch sizes")
        out["batch_size"] = out["batch_size"] * seq
        out["tokens"] = (out["tokens"] / every).round().astype(int) * every
    out = out.reset_index(drop=True)
    out.attrs["source"] = where
    return out


def _sweep_setting(df: pd.DataFrame, table: Path, key: str, kind: str, why: str):
    """A config value: the table's column if the sweep searched it, else the (same for all trials)
    value in the best trial's config."""
    if key in df.columns:
        return df[key]
    best = table.parent / "best.yaml"
    v: Any = None
    if best.is_file():
        import yaml

        v = (yaml.safe_load(best.read_text()) or {}).get("trial", {})
        for k in key.split("."):
            v = v.get(k) if isinstance(v, dict) else None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{table}: missing column {key!r} and no {key} in {best} ({kind} needs it for {why})")
    return v


def check_frame(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Check columns and types for `kind`; return a copy with rows of non-finite loss dropped."""
    where = _where(df)
    need = COLUMNS[kind]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ConfigError(
            f"{where}: missing column {missing[0]!r}; {kind} needs columns {','.join(need)} "
            f"(got {','.join(map(str, df.columns)) or 'none'})"
        )
    out = df[list(need)].copy()
    out.attrs["source"] = where
    for c in need:
        if c in _NUMERIC:
            num = pd.to_numeric(out[c], errors="coerce")
            bad = num.isna() & out[c].notna()
            if bad.any():
                raise ConfigError(
                    f"{where}: column {c!r}: numbers required (got {out[c][bad].iloc[0]!r} "
                    f"in row {int(np.flatnonzero(bad.to_numpy())[0]) + 2})"
                )
            out[c] = num.astype(float)
        else:
            out[c] = out[c].astype(str)
    # Failed or diverged trials carry NaN/inf loss: they are not points of the law.
    out = out[np.isfinite(out["loss"].to_numpy())]
    for c in need:
        if c in _POSITIVE:
            col = out[c].to_numpy()
            bad = ~(np.isfinite(col) & (col > 0))
            if bad.any():
                raise ConfigError(f"{where}: column {c!r}: values must be finite and > 0 (got {float(col[bad][0])!r})")
    if out.empty:
        raise ConfigError(f"{where}: no rows with a finite 'loss' (columns {','.join(need)})")
    out.attrs["source"] = where
    return out


def _jsonable(x: Any) -> Any:
    """Plain JSON types: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x


# --------------------------------------------------------------------------- 1-D optimum


def parabola_min(x: np.ndarray, y: np.ndarray, half_window: int = 2) -> tuple[float, float, bool]:
    """Minimum of y(x) on a sorted grid: a parabola through the argmin and its neighbours.

    Uses up to `half_window` points each side (3-5 points); if that parabola is not convex,
    the 3 nearest points; if neither is, the argmin itself. The vertex is kept between the
    argmin's neighbours (a convex curve sampled there has its minimum in that interval).
    Returns (x_opt, y_opt, at_edge); at an edge of the grid the edge point is returned.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    i = int(np.argmin(y))
    n = len(x)
    if i == 0 or i == n - 1:
        return float(x[i]), float(y[i]), True
    for hw in (half_window, 1):
        lo, hi = max(0, i - hw), min(n, i + hw + 1)
        c2, c1, c0 = np.polyfit(x[lo:hi], y[lo:hi], 2)
        if c2 > 0:
            xv = float(np.clip(-c1 / (2 * c2), x[i - 1], x[i + 1]))
            return xv, float(c0 + c1 * xv + c2 * xv * xv), False
    return float(x[i]), float(y[i]), False


def _grid_step(log_values: np.ndarray) -> float:
    u = np.unique(np.round(log_values, 9))
    return float(np.median(np.diff(u))) if len(u) > 1 else float("nan")


# --------------------------------------------------------------------------- lr transfer


@dataclass
class LrOptimum:
    parametrization: str
    width: float
    lr_opt: float
    loss_opt: float
    at_edge: bool


@dataclass
class LrTransferFit:
    optima: list[LrOptimum]
    drift_steps: dict[str, float | None]
    """|log2 lr_opt(largest width) - log2 lr_opt(smallest width)| in grid steps, per parametrization."""
    grid_step_log2: dict[str, float]
    """Median spacing of each parametrization's lr grid, in log2 units."""

    def lr_opt(self, parametrization: str, width: float) -> float:
        for o in self.optima:
            if o.parametrization == parametrization and o.width == width:
                return o.lr_opt
        raise KeyError((parametrization, width))

    def to_dict(self) -> dict:
        return _jsonable({
            "optima": [asdict(o) for o in self.optima],
            "drift_steps": self.drift_steps,
            "grid_step_log2": self.grid_step_log2,
        })


def fit_lr_transfer(df: pd.DataFrame) -> LrTransferFit:
    """Optimal lr per (parametrization, width) from an lr x width sweep, and its drift.

    Repeated (parametrization, width, lr) rows (seeds) are averaged; rows with NaN loss are
    dropped. The optimum is a parabola in log2(lr) (see `parabola_min`). Drift is measured in
    steps of the lr grid, so "0.3 steps" means the optimum stayed on the same grid point.
    """
    d = check_frame(df, "lr-transfer")
    where = _where(d)
    d = d.groupby(["parametrization", "width", "lr"], as_index=False)["loss"].mean()
    optima: list[LrOptimum] = []
    drift: dict[str, float | None] = {}
    steps: dict[str, float] = {}
    for p, dp in d.groupby("parametrization", sort=True):
        step = _grid_step(np.log2(dp["lr"].to_numpy()))
        if not np.isfinite(step):
            raise ConfigError(f"{where}: column 'lr': parametrization {p!r} has one lr value; a grid of >= 3 is needed")
        steps[str(p)] = step
        by_width = {}
        for w, dw in dp.groupby("width", sort=True):
            dw = dw.sort_values("lr")
            lr, loss = dw["lr"].to_numpy(), dw["loss"].to_numpy()
            x, fx, edge = parabola_min(np.log2(lr), loss)
            optima.append(LrOptimum(str(p), float(w), float(lr[np.argmin(loss)] if edge else 2.0**x), fx, edge))
            by_width[float(w)] = x
        ws = sorted(by_width)
        drift[str(p)] = abs(by_width[ws[-1]] - by_width[ws[0]]) / step if len(ws) > 1 else None
    return LrTransferFit(optima, drift, steps)


# --------------------------------------------------------------------------- batch size


@dataclass
class BatchSizePoint:
    model: str
    tokens: float
    batch_size_opt: float
    loss_opt: float
    at_edge: bool
    used_in_fit: bool


@dataclass
class BatchSizeFit:
    """bs_opt(L) = a / L^b, batch size in tokens (MiniCPM: a = 1.21e9, b = 6.24)."""

    a: float
    b: float
    points: list[BatchSizePoint]
    r2: float
    """Coefficient of determination of the fit of log bs_opt on log L."""

    def batch_size_opt(self, loss: float | np.ndarray) -> float | np.ndarray:
        return self.a / np.asarray(loss, dtype=float) ** self.b

    def to_dict(self) -> dict:
        return _jsonable({"a": self.a, "b": self.b, "r2": self.r2, "points": [asdict(p) for p in self.points]})


def fit_batch_size(df: pd.DataFrame) -> BatchSizeFit:
    """MiniCPM's batch-size law from a batch-size sweep at several models and token counts.

    For each (model, tokens): the loss-minimising batch size (parabola in log batch size
    around the minimum) and its loss. Then log bs_opt = log a - b log L by linear least
    squares over the points whose optimum lies inside the batch-size grid (an optimum at the
    grid's edge is only a bound, so it is reported but not fitted).
    """
    d = check_frame(df, "batch-size")
    where = _where(d)
    d = d.groupby(["model", "tokens", "batch_size"], as_index=False)["loss"].mean()
    points: list[BatchSizePoint] = []
    for (m, t), g in d.groupby(["model", "tokens"], sort=True):
        g = g.sort_values("batch_size")
        if len(g) < 3:
            raise ConfigError(
                f"{where}: column 'batch_size': model {m!r} at tokens {t:g} has {len(g)} batch sizes with a finite loss; >= 3 needed"
            )
        bs, loss = g["batch_size"].to_numpy(), g["loss"].to_numpy()
        x, fx, edge = parabola_min(np.log(bs), loss)
        points.append(BatchSizePoint(str(m), float(t), float(bs[np.argmin(loss)] if edge else np.exp(x)), fx, edge, not edge))
    use = [p for p in points if p.used_in_fit]
    logL = np.log([p.loss_opt for p in use])
    if len(use) < 2 or np.ptp(logL) <= 0:
        raise ConfigError(
            f"{where}: column 'batch_size': {len(use)} of {len(points)} (model, tokens) optima lie inside the "
            f"batch-size grid with distinct losses; >= 2 needed (widen the batch-size grid)"
        )
    logB = np.log([p.batch_size_opt for p in use])
    slope, intercept = np.polyfit(logL, logB, 1)
    resid = logB - (intercept + slope * logL)
    ss = float(np.sum((logB - logB.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss if ss > 0 else float("nan")
    return BatchSizeFit(float(np.exp(intercept)), float(-slope), points, r2)


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
    get = fit.get if isinstance(fit, dict) else lambda k: getattr(fit, k)
    return (get("beta") * get("B") / (get("alpha") * get("A"))) ** (1.0 / get("beta")) * N ** (get("alpha") / get("beta"))


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

    def predict(self, N, D):
        return predict_loss(self, N, D)

    def at_compute(self, compute: float) -> tuple[float, float]:
        """(N_opt, D_opt) at another budget."""
        return compute_optimal(self.E, self.A, self.B, self.alpha, self.beta, compute)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("E", "A", "B", "alpha", "beta", "N_opt", "D_opt", "tokens_per_param",
                                           "compute", "n_points")}
        if self.ci is not None:
            d["ci"] = {k: list(v) for k, v in self.ci.items()}
        return _jsonable(d)


def predict_loss(fit: ScalingLawFit | dict, N, D):
    """L(N, D) from a ScalingLawFit or a dict with E, A, B, alpha, beta (e.g. the --json output)."""
    get = fit.get if isinstance(fit, dict) else lambda k: getattr(fit, k)
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
    where = _where(d)
    if len(d) < 5:
        raise ConfigError(f"{where}: {len(d)} rows with a finite 'loss'; the scaling law has 5 parameters, >= 5 rows needed")
    if d["N"].nunique() < MIN_LEVELS or d["D"].nunique() < MIN_LEVELS:
        raise ConfigError(f"{where}: columns 'N','D': >= {MIN_LEVELS} distinct values of each are needed, as "
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
    ci = None
    if bootstrap:
        rng = np.random.default_rng(seed)
        n = len(logL)
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, n, n)
            th, _ = _fit_theta(logN[idx], logD[idx], logL[idx], [theta] + grid_starts[:N_STARTS_BOOTSTRAP])
            samples.append(_law_from_theta(th, compute))
        ci = {}
        for k in law:
            v = np.array([s[k] for s in samples], dtype=float)
            v = v[np.isfinite(v)]
            ci[k] = (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if len(v) else (float("nan"),) * 2
    return ScalingLawFit(**law, compute=float(compute), n_points=len(logL), objective=fval, ci=ci)


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
        return _jsonable({
            "points": self.points.to_dict(orient="records"),
            "scaling_law": self.scaling_law.to_dict() if self.scaling_law is not None else None,
        })


def fit_wsd(df: pd.DataFrame, compute: float | None = None, bootstrap: int = 0, seed: int = 0) -> WsdFit:
    """Loss vs data per model size from WSD decay branches, and the scaling law they feed.

    Rows are (model, N, tokens, loss), one per decay branch. Each model must have one N.
    `points` (columns model, N, D, loss) is the frame `fit_scaling_law` takes.
    """
    d = check_frame(df, "wsd")
    where = _where(d)
    sizes = d.groupby("model")["N"].nunique()
    if (sizes > 1).any():
        m = sizes.index[sizes > 1][0]
        raise ConfigError(f"{where}: column 'N': model {m!r} has {int(sizes[m])} different N values; one per model")
    pts = (d.rename(columns={"tokens": "D"})[["model", "N", "D", "loss"]]
           .sort_values(["N", "D"], kind="stable").reset_index(drop=True))
    law = None
    if pts["N"].nunique() >= MIN_LEVELS and pts["D"].nunique() >= MIN_LEVELS:
        sl = pts[["N", "D", "loss"]].copy()
        sl.attrs["source"] = where
        law = fit_scaling_law(sl, compute=compute, bootstrap=bootstrap, seed=seed)
    return WsdFit(pts, law)
