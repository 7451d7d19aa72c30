"""MiniCPM's batch-size law, bs_opt(L) = a / L^b (batch size in tokens), measured with the lr tuned
per batch size.

Per (model, batch size, token count): the loss at the best lr (a parabola in log lr over the
runs' mean losses; with one lr, that lr's loss). Per (model, token count): the loss-minimising
batch size (a parabola in log batch size over those tuned losses) and its loss. Then log bs_opt =
log a - b log L by least squares over the optima inside the batch-size grid (one on the edge is
only a bound: reported, not fitted). Intervals: `bootstrap` over runs (a run's evaluations move
together), within each (model, batch size, lr) cell.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from windtunnel.errors import ConfigError
from windtunnel.fits.bootstrap import RESAMPLES, bootstrap, cell_means, draws_interval, draws_of, units
from windtunnel.fits.frames import check_frame, field_getter, jsonable, where
from windtunnel.fits.optimum import LR_HALF_WINDOW, parabola_min, rests_on_one_run


@dataclass
class BatchSizePoint:
    model: str
    tokens: float
    batch_size_opt: float
    loss_opt: float
    at_edge: bool
    used_in_fit: bool
    thin: bool = False
    """A cell this optimum rests on (a batch size near it, at an lr near that one's best) has one run
    while others have several: the law's interval would hold only the others' noise, so it has none."""


@dataclass
class LrTuning:
    """The lr optimum of one (model, batch size) at the model's largest token count."""

    model: str
    batch_size: float
    tokens: float
    lr_opt: float
    at_edge: bool
    """The lowest loss was at the grid's smallest or largest lr: the tuned loss is only a bound."""


@dataclass
class BatchSizeFit:
    """bs_opt(L) = a / L^b, batch size in tokens (MiniCPM: a = 1.21e9, b = 6.24)."""

    a: float
    b: float
    points: list[BatchSizePoint]
    r2: float
    """Coefficient of determination of the fit of log bs_opt on log L."""
    ci: dict[str, tuple[float, float] | None] | None = None
    """95% bootstrap intervals of a and b over runs; None with one run per (model, batch size, lr)."""
    resamples: int = 0
    lr_tuned: bool = False
    """The data had >= 2 lrs per batch size (else every batch size ran at one lr)."""
    lr_optima: list[LrTuning] = field(default_factory=list)
    draws: dict | None = None
    """The bootstrap refits of a, b (`bootstrap.draws_of`): a batch size's interval at the target's loss."""

    def batch_size_opt(self, loss: float | np.ndarray) -> float | np.ndarray:
        return self.a / np.asarray(loss, dtype=float) ** self.b

    def to_dict(self) -> dict:
        return jsonable({"a": self.a, "b": self.b, "r2": self.r2, "ci": self.ci, "resamples": self.resamples,
                         "lr_tuned": self.lr_tuned, "points": [asdict(p) for p in self.points],
                         "lr_optima": [asdict(t) for t in self.lr_optima]}
                        | ({"draws": self.draws} if self.draws is not None else {}))


def batch_size_interval(fit: BatchSizeFit | dict, loss: float) -> tuple[float, float] | None:
    """95% interval of bs_opt = a / L^b at one loss over the fit's bootstrap refits (None without them):
    a and b move together, so their separate intervals cannot give it."""
    get = field_getter(fit)
    return draws_interval(get("draws"), lambda law: law["a"] / loss ** law["b"], get("a") / loss ** get("b"))


def fit_batch_size(df: pd.DataFrame, bootstrap_n: int = RESAMPLES, seed: int = 0) -> BatchSizeFit:
    """The batch-size law from a batch-size (x lr) sweep at several models and token counts."""
    d = check_frame(df, "batch-size")
    where_ = where(d)
    if "lr" not in d.columns:
        d["lr"] = 1.0  # one lr for all: the "tuned" loss is that lr's
    d["_cell"] = d.groupby(["model", "tokens", "batch_size", "lr"], sort=True).ngroup()
    cells = d.drop_duplicates("_cell").sort_values("_cell")
    cells["_mtb"] = cells.groupby(["model", "tokens", "batch_size"], sort=True).ngroup()
    mtb = cells.drop_duplicates("_mtb")[["model", "tokens", "batch_size", "_mtb"]]
    mtb["_mt"] = mtb.groupby(["model", "tokens"], sort=True).ngroup()
    for (m, t), g in mtb.groupby(["model", "tokens"], sort=True):
        if len(g) < 3:
            raise ConfigError(f"{where_}: column 'batch_size': model {m!r} at tokens {t:g} has {len(g)} batch "
                              "sizes with a finite loss; >= 3 needed")
    lr_cells = [np.log(c["lr"].to_numpy()) for _, c in cells.groupby("_mtb", sort=True)]
    cell_ids = [c["_cell"].to_numpy() for _, c in cells.groupby("_mtb", sort=True)]
    bs_of = [(g["batch_size"].to_numpy(), g["_mtb"].to_numpy()) for _, g in mtb.groupby("_mt", sort=True)]
    mt_keys = mtb.drop_duplicates("_mt")[["model", "tokens"]].to_numpy()
    code, loss, n_cells = d["_cell"].to_numpy(), d["loss"].to_numpy(), len(cells)

    def solve(idx: np.ndarray):
        """(tuned loss and lr optimum per (model, tokens, batch size), batch-size optima, law)."""
        mean = cell_means(code, loss, idx, n_cells)
        cnt = np.bincount(code[idx], minlength=n_cells)
        tuned = []
        for xs, ids in zip(lr_cells, cell_ids):
            ok = cnt[ids] > 0
            tuned.append(parabola_min(xs[ok], mean[ids][ok], LR_HALF_WINDOW) if ok.any() else (np.nan, np.nan, True))
        pts = []
        for bs, ks in bs_of:
            ys = np.array([tuned[k][1] for k in ks])
            x, fx, edge = parabola_min(np.log(bs), ys)
            pts.append((float(bs[np.argmin(ys)] if edge else np.exp(x)), fx, edge))
        use = [(bs, L) for bs, L, edge in pts if not edge]
        law = (np.nan, np.nan, np.nan)
        if len(use) >= 2 and np.ptp(np.log([L for _, L in use])) > 0:
            logB, logL = np.log([bs for bs, _ in use]), np.log([L for _, L in use])
            slope, icpt = np.polyfit(logL, logB, 1)
            ss = float(np.sum((logB - logB.mean()) ** 2))
            r2 = 1.0 - float(np.sum((logB - icpt - slope * logL) ** 2)) / ss if ss > 0 else np.nan
            law = (float(np.exp(icpt)), float(-slope), r2)
        return tuned, pts, law

    tuned, pts, (a, b, r2) = solve(np.arange(len(d)))
    points = [BatchSizePoint(str(m), float(t), bs, fx, edge, not edge) for (m, t), (bs, fx, edge) in zip(mt_keys, pts)]
    if not np.isfinite(a):
        n_in = sum(p.used_in_fit for p in points)
        raise ConfigError(f"{where_}: column 'batch_size': {n_in} of {len(points)} (model, tokens) optima lie inside "
                          "the batch-size grid with distinct losses; >= 2 needed (widen the batch-size grid)")
    lr_tuned = max(len(xs) for xs in lr_cells) >= 2
    lr_optima = []
    if lr_tuned:
        last = mtb[mtb["tokens"] == mtb.groupby("model")["tokens"].transform("max")]
        for m, t, bs, k in last[["model", "tokens", "batch_size", "_mtb"]].itertuples(index=False):
            lr_optima.append(LrTuning(str(m), float(bs), float(t), float(np.exp(tuned[k][0])), bool(tuned[k][2])))

    def statistic(idx: np.ndarray) -> dict[str, float]:
        _, _, (ra, rb, _) = solve(idx)
        return {"a": ra, "b": rb}

    unit = ["run"] if "run" in d.columns else ["seed"] if "seed" in d.columns else ["_cell"]
    strata = units(d, ["_cell"], unit)
    boot = bootstrap(strata, statistic, n=bootstrap_n, seed=seed)
    if boot.n:
        runs, mean = np.array([len(us) for us in strata]), cell_means(code, loss, np.arange(len(d)), n_cells)
        for pt, (bs, ks) in zip(points, bs_of):
            ys = np.array([tuned[k][1] for k in ks])
            i = int(np.argmin(ys))  # the batch sizes its parabola rests on, each at the lrs its own rests on
            pt.thin = any(rests_on_one_run(mean[cell_ids[k]], runs[cell_ids[k]]) for k in ks[max(0, i - 2):i + 3])
    if any(pt.thin for pt in points if pt.used_in_fit):
        return BatchSizeFit(a, b, points, r2, {"a": None, "b": None}, boot.n, lr_tuned, lr_optima, None)
    ci = boot.intervals if boot.n else None
    return BatchSizeFit(a, b, points, r2, ci, boot.n, lr_tuned, lr_optima, draws_of(boot, ("a", "b")))
