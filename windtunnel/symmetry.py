"""The symmetry of MiniCPM's μP knobs in this pre-norm model, in one place.

`scale_emb` multiplies the embedding output and `scale_depth` every residual branch, so both
multiply the whole residual stream; every RMSNorm divides that factor out again. Scaling both
by the same c leaves every normalised activation, gradient and AdamW step unchanged (up to the
norm's eps): only their ratio scale_emb / scale_depth matters (MiniCPM: 12 / 1.4 = 8.57). A
search over both spends one of its dimensions on a ridge, the product, where the loss is flat.
Here: the ratio's name and how a table computes it, the warning for a space that searches both,
and the fit of the loss against the ratio that `windtunnel report` plots.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

EMB, DEPTH = "model.scale_emb", "model.scale_depth"
RATIO = "scale_ratio"
"""The column: scale_emb / scale_depth."""
MINICPM_RATIO = 12.0 / 1.4
NEAR = 1.5
"""The fit keeps trials whose other log-scaled knobs (lr, init_std) lie within this factor of the
best trial's: along the ratio, the rest of the space then stays near its optimum."""


def _searched(spec) -> bool:
    return isinstance(spec, dict) and spec.get("type") not in (None, "fixed")


def ridge_warning(search: dict, parametrization: str = "mup") -> str | None:
    """One line when the space searches both knobs of a μP model, else None."""
    if parametrization != "mup" or not (_searched(search.get(EMB)) and _searched(search.get(DEPTH))):
        return None
    return (f"search: {EMB} and {DEPTH} are both searched, but only their ratio matters (both ×c "
            "leaves the pre-norm model unchanged): their product is a flat ridge, one dimension spent on "
            f"nothing; search one with the other fixed ({DEPTH}: {{type: fixed, value: 1.4}})")


def with_ratio(df: pd.DataFrame, base: dict) -> pd.DataFrame | None:
    """df with a RATIO column when its sweep could move the ratio (a μP model, one knob searched),
    the other knob from the sweep's base config where the table lacks it; else None."""
    model = base.get("model", {})
    if model.get("parametrization", "mup") != "mup" or not ({EMB, DEPTH} & set(df.columns)):
        return None
    emb = df[EMB] if EMB in df.columns else model.get("scale_emb")
    depth = df[DEPTH] if DEPTH in df.columns else model.get("scale_depth")
    if emb is None or depth is None:
        return None
    return df.assign(**{RATIO: np.asarray(emb, dtype=float) / np.asarray(depth, dtype=float)})


def ratio_fit(done: pd.DataFrame, log_knobs: list[str]) -> dict | None:
    """A quadratic in log(ratio) over the finished trials near the best (`NEAR`); None when too few
    points or no minimum. done: `value` and RATIO columns; log_knobs: the other log-scaled searched
    params. Returns the best trial's ratio, the fit's minimum, R² and the trials it used."""
    done = done[np.isfinite(done["value"])]
    if done.empty:
        return None
    best = done.loc[done["value"].idxmin()]
    near = np.ones(len(done), dtype=bool)
    for k in log_knobs:
        if k in done.columns and k not in (EMB, DEPTH):
            near &= np.abs(np.log(done[k].astype(float) / float(best[k]))).to_numpy() < math.log(NEAR)
    sub = done[near]
    out = {"best_ratio": float(best[RATIO]), "n": int(len(sub))}
    x, y = np.log(sub[RATIO].to_numpy(float)), sub["value"].to_numpy(float)
    if len(sub) < 8 or np.ptp(x) < 0.5:
        return out
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        return out
    resid = y - np.polyval([c2, c1, c0], x)
    r2 = 1 - float((resid ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-300))
    return {**out, "vertex": float(math.exp(-c1 / (2 * c2))), "r2": r2, "coef": [float(c2), float(c1), float(c0)],
            "span": [float(np.exp(x.min())), float(np.exp(x.max()))]}


def ratio_sentence(fit: dict, both_searched: bool, log_knobs: list[str]) -> str:
    """What report.md says of the ratio."""
    knobs = ", ".join(f"`{k}`" for k in log_knobs if k not in (EMB, DEPTH)) or "no other knob"
    s = (f"**Ratio `scale_emb / scale_depth`** (the only one of the two that matters: both ×c leave this "
         f"pre-norm model unchanged): the best trial's is **{fit['best_ratio']:.2f}**")
    if "vertex" in fit:
        s += (f"; a quadratic in log(ratio) over the {fit['n']} trials with {knobs} within ×{NEAR:g} of the best's "
              f"has its minimum at **{fit['vertex']:.2f}** (R² {fit['r2']:.2f})")
    s += f"; MiniCPM's is 12 / 1.4 = {MINICPM_RATIO:.2f}. A single trial's loss is noisy: `windtunnel confirm` replicates."
    if both_searched:
        s += (" This space searched both knobs: their product is a flat ridge, so the loss against either knob "
              "alone (`loss_vs_params.png`) looks flat; `loss_vs_ratio.png` shows it.")
    return s


def plot_ratio(ax, done: pd.DataFrame, fit: dict | None) -> None:
    """Loss against the ratio on ax: the trials, the fit over its span, MiniCPM's ratio."""
    ax.scatter(done[RATIO], done["value"], s=14, c=done["number"], cmap="viridis", label="trial")
    if fit and "vertex" in fit:
        xs = np.geomspace(*fit["span"], 100)
        ax.plot(xs, np.polyval(fit["coef"], np.log(xs)), color="C3",
                label=f"quadratic fit near the best (min {fit['vertex']:.2f})")
    ax.axvline(MINICPM_RATIO, color="0.4", ls="--", label=f"MiniCPM 12/1.4 = {MINICPM_RATIO:.2f}")
    ax.set_xscale("log")
    best = float(done["value"].min())
    top = float(done["value"].max())
    ax.set_ylim(best - 0.02 * max(top - best, 1e-3), min(top, best + 0.5) + 1e-3)  # the basin, not the blow-ups
    ax.set(xlabel="scale_emb / scale_depth", ylabel="final validation loss")
    ax.legend(fontsize=8)
