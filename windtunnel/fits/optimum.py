"""The optimum of a loss sampled on a grid of one hyperparameter (lr, batch size): a parabola
through the argmin and its neighbours, and whether it lies inside the grid at all."""
from __future__ import annotations

import numpy as np


# An lr axis takes one neighbour a side: lr curves rise far more steeply past their optimum than
# before it, and a parabola through five points of a ×2 grid then lands ~0.3 octaves low, three
# points ~0.05 (results/windtunnel/optimum_bias.md). Other axes (batch size, init_std) keep two.
LR_HALF_WINDOW = 1


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
        c2, c1, c0 = _quadratic(x[lo:hi], y[lo:hi])
        if c2 > 0:
            xv = float(np.clip(-c1 / (2 * c2), x[i - 1], x[i + 1]))
            return xv, float(c0 + c1 * xv + c2 * xv * xv), False
    return float(x[i]), float(y[i]), False


def _quadratic(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares c2, c1, c0 of y = c2 x² + c1 x + c0 on 3-5 points: np.polyfit's answer at a
    tenth of its cost (a bootstrap calls this ~10^5 times), x centred for conditioning."""
    m = x.mean()
    u = x - m
    a = np.stack([u * u, u, np.ones_like(u)], axis=1)
    (k2, k1, k0), *_ = np.linalg.lstsq(a, y, rcond=None)
    return float(k2), float(k1 - 2 * k2 * m), float(k0 - k1 * m + k2 * m * m)


def grid_step(log_values: np.ndarray) -> float:
    """Median spacing of a grid's distinct values (NaN for a single value)."""
    u = np.unique(np.round(log_values, 9))
    return float(np.median(np.diff(u))) if len(u) > 1 else float("nan")


def rests_on_one_run(y: np.ndarray, runs: np.ndarray, half_window: int = LR_HALF_WINDOW) -> bool:
    """Whether `parabola_min`'s parabola over y (on a sorted grid) rests on a point of one run: the argmin
    and its half_window neighbours a side. Its bootstrap interval would then hold only the other points'
    noise (fits/bootstrap.py)."""
    i = int(np.argmin(y))
    return bool((np.asarray(runs)[max(0, i - half_window):i + half_window + 1] < 2).any())


def curve_optimum(x: np.ndarray, y: np.ndarray) -> tuple[float, float, bool]:
    """The lr optimum: parabola_min over the distinct x (log2 lr) of (x, y) pairs, y averaged per x
    (duplicate runs, seeds)."""
    ux, inv = np.unique(x, return_inverse=True)
    my = np.bincount(inv, weights=y) / np.bincount(inv)
    return parabola_min(ux, my, LR_HALF_WINDOW)
