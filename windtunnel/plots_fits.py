"""Figures for the fits in windtunnel/fits/. matplotlib (Agg) is imported only when one is drawn.

Each `plot_*` takes the fit and the checked frame it came from and writes one image file,
via a temporary file renamed into place, so a failed plot leaves nothing half-written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from windtunnel.errors import ConfigError
from windtunnel.files import file_in_the_way, write_atomically
from windtunnel.fits import BatchSizeFit, HorizonFit, LrTransferFit, ScalingLawFit, WsdFit, predict_loss

FORMATS = ("png", "pdf", "svg")


def check_format(path: str | Path, flag: str = "--plot") -> str:
    """The figure format path's suffix names; a one-line error before any work if not allowed, or
    if path is a folder or lies under a file."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ConfigError(f"{flag}: {path}: file type {path.suffix or '(none)'!r} not allowed; allowed: .{', .'.join(FORMATS)}")
    if path.is_dir():
        raise ConfigError(f"{flag}: {path} is a folder; a file name is needed (e.g. {path / ('plot.' + fmt)})")
    folder = file_in_the_way(path.parent)  # in the way of the folders save_figure would create
    if folder is not None:
        raise ConfigError(f"{flag}: {path}: {folder} is a file, not a folder")
    return fmt


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, flag: str = "--plot") -> Path:
    """Write fig to path atomically (temp file + rename), in the format its suffix names."""
    path = Path(path)
    fmt = check_format(path, flag)
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"),
                         error=f"{flag}: cannot write {path} there", mode=0o644)
    finally:
        pyplot().close(fig)
    return path


def plot_lr_transfer(fit: LrTransferFit, df: pd.DataFrame, path: str | Path) -> Path:
    """Loss vs lr (log x) per width, depth and batch, one panel per parametrization, optimum marked (TP5 Fig. 1)."""
    plt = pyplot()
    axes_ = ["width", "depth", "batch"]
    d = df.assign(**{c: df[c] if c in df.columns else np.nan for c in axes_[1:]})
    d = d.groupby(["parametrization", *axes_, "lr"], as_index=False, dropna=False)["loss"].mean()
    ps = sorted(d["parametrization"].unique())
    several_batches = d["batch"].nunique() > 1  # one batch is a setting, not worth a label
    fig, axes = plt.subplots(1, len(ps), figsize=(5 * len(ps), 4), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], ps):
        dp = d[d["parametrization"] == p]
        optima = sorted((o for o in fit.optima if o.parametrization == p),
                        key=lambda o: (o.width, o.depth or 0, o.batch or 0))
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(optima)))
        for o, c in zip(optima, colors):
            same = np.ones(len(dp), bool)
            for col, v in (("width", o.width), ("depth", o.depth), ("batch", o.batch)):
                same &= dp[col].isna().to_numpy() if v is None else (dp[col] == v).to_numpy()
            dw = dp[same].sort_values("lr")
            label = f"width {o.width:g}" + ("" if o.depth is None else f", depth {o.depth:g}") \
                + (f", batch {o.batch:g}" if several_batches and o.batch is not None else "")
            ax.plot(dw["lr"], dw["loss"], "o-", color=c, ms=3, label=label)
            ax.plot([o.lr_opt], [o.loss_opt], "*" if not o.at_edge else "x", color=c, ms=12, mec="k")
        drift = fit.drift_steps.get(p)
        depth, batch = fit.drift(p, "depth"), fit.drift(p, "batch")
        ax.set_title(f"{p}" + (f" (width drift {drift:.1f} grid steps)" if drift is not None else "")
                     + (f"\n(depth drift {depth.octaves:+.2f} octaves)" if depth is not None else "")
                     + (f"\n(lr ∝ batch^{batch.per_doubling:.3f})" if batch is not None and not batch.edge else ""),
                     fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss")
    return save_figure(fig, path)


def plot_horizon(fit: HorizonFit, df: pd.DataFrame, path: str | Path) -> Path:
    """Left: loss vs lr per token budget (best init_std at each lr), optima marked. Right: lr* vs T and a·T^-b."""
    plt = pyplot()
    d = df.groupby(["tokens", "lr"] + (["init_std"] if "init_std" in df.columns else []), as_index=False)["loss"].mean()
    d = d.groupby(["tokens", "lr"], as_index=False)["loss"].min()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    budgets = sorted(d["tokens"].unique())
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(budgets)))
    for t, c, p in zip(budgets, colors, fit.points):
        g = d[d["tokens"] == t].sort_values("lr")
        ax.plot(g["lr"], g["loss"], "o-", color=c, ms=3, label=f"T = {t:.3g}")
        ax.plot([p.lr_opt], [p.loss_opt], "x" if p.at_edge else "*", color=c, ms=12, mec="k")
        lo, hi = p.lr_opt_ci or (p.lr_opt, p.lr_opt)
        ax2.errorbar([t], [p.lr_opt], yerr=[[p.lr_opt - lo], [hi - p.lr_opt]], fmt="x" if p.at_edge else "o", color=c)
    T = np.geomspace(min(budgets) / 1.5, max(budgets) * 1.5, 50)
    ax2.plot(T, fit.a * T**-fit.b, "k--", label=f"lr* = {fit.a:.3g} · T^-{fit.b:.3g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final loss")
    ax.legend(fontsize=8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("token budget T")
    ax2.set_ylabel("optimal lr (95% interval)")
    ax2.legend(fontsize=8)
    return save_figure(fig, path)


def plot_batch_size(fit: BatchSizeFit, df: pd.DataFrame, path: str | Path) -> Path:
    """Left: loss vs batch size per (model, tokens) (at each batch size's best lr of the grid), optima
    marked. Right: bs_opt vs loss and a/L^b."""
    plt = pyplot()
    keys = ["model", "tokens", "batch_size"]
    d = df.groupby(keys + (["lr"] if "lr" in df.columns else []), as_index=False)["loss"].mean()
    d = d.groupby(keys, as_index=False)["loss"].min()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    models = sorted(d["model"].unique())
    cmap = dict(zip(models, plt.cm.tab10(np.arange(len(models)) % 10)))
    for (m, t), g in d.groupby(["model", "tokens"]):
        g = g.sort_values("batch_size")
        ax.plot(g["batch_size"], g["loss"], "-", color=cmap[m], alpha=0.6, lw=1)
    for p in fit.points:
        ax.plot([p.batch_size_opt], [p.loss_opt], "*" if p.used_in_fit else "x", color=cmap[p.model], ms=9, mec="k")
        ax2.plot([p.loss_opt], [p.batch_size_opt], "o" if p.used_in_fit else "x", color=cmap[p.model])
    for m in models:
        ax2.plot([], [], "o", color=cmap[m], label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (tokens)")
    ax.set_ylabel("loss")
    ax.set_title("loss vs batch size per (model, tokens)")
    L = np.array([p.loss_opt for p in fit.points])
    grid = np.linspace(L.min() * 0.97, L.max() * 1.03, 100)
    ax2.plot(grid, fit.batch_size_opt(grid), "k--", label=f"bs = {fit.a:.3g} / L^{fit.b:.3g}")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("loss at the optimum")
    ax2.set_ylabel("optimal batch size (tokens)")
    ax2.legend(fontsize=8)
    return save_figure(fig, path)


def plot_scaling_law(fit: ScalingLawFit | None, df: pd.DataFrame, path: str | Path) -> Path:
    """Loss vs D (log x) per N, with the fitted L(N, D) curves when there is a fit."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    Ns = sorted(df["N"].unique())
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(Ns)))
    for n, c in zip(Ns, colors):
        g = df[df["N"] == n].sort_values("D")
        ax.plot(g["D"], g["loss"], "o", color=c, ms=4, label=f"N = {n:.3g}")
        if fit is not None:
            Dg = np.geomspace(df["D"].min() / 1.5, df["D"].max() * 1.5, 100)
            ax.plot(Dg, predict_loss(fit, n, Dg), "-", color=c, lw=1)
    if fit is not None:
        ax.axhline(fit.E, color="gray", ls=":", lw=1)
        ax.set_title(f"L = {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3g} + {fit.B:.3g}/D^{fit.beta:.3g}", fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("tokens D")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_wsd(fit: WsdFit, path: str | Path) -> Path:
    """Loss vs data per model size from the decay branches, with the scaling-law curves if fitted."""
    return plot_scaling_law(fit.scaling_law, fit.points, path)
