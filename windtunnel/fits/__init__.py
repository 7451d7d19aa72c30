"""The laws the wind tunnel fits, as plain functions over pandas frames, one module per law:

    fit_lr_transfer(df)   lr_transfer: optimal lr per (parametrization, width, depth, batch), its
                          drift across width (grid steps), depth (octaves, against issue 24's
                          goal) and batch (octaves; lr ∝ batch^beta)
    fit_batch_size(df)    batch_size: MiniCPM's bs_opt = a / L^b, the lr tuned per batch size
    fit_horizon(df)       horizon: lr*(T) = a · T^-b over token budgets T
    fit_scaling_law(df)   scaling_law: Chinchilla approach 3, L = E + A/N^alpha + B/D^beta
    fit_wsd(df)           scaling_law: WSD decay branches -> loss vs data per size -> the scaling law
    predict_loss(fit, N, D)

Each fit returns a dataclass with `to_dict()` (what `windtunnel fit KIND --json` prints). Every
interval comes from one helper, `bootstrap.bootstrap` (runs resampled within the design's cells);
the scaling and batch-size laws keep their refits (`draws`), so `transfer` gives a number's interval
at the target's N, D or loss too (`optimal_tokens_interval`, `loss_interval`, `batch_size_interval`);
every grid optimum from `optimum.parabola_min`. Input frames are checked in `frames`, so
`windtunnel report` and the transfer module get the same one-line `ConfigError`s as the CLI;
`load_csv(path, kind)` names the file in them and also reads a sweep's results (`sweep_frame`);
`load_inputs(paths, kind)` stacks several (e.g. lr sweeps at two batch sizes).
Only numpy, pandas and scipy (a sweep's folder is read through windtunnel/results.py's layout,
which loads no optuna): no torch, no tracking. docs/laws.md
says how each law is measured and what its intervals mean.
"""
from windtunnel.fits.batch_size import BatchSizeFit, BatchSizePoint, LrTuning, batch_size_interval, fit_batch_size
from windtunnel.fits.bootstrap import LEVEL, RESAMPLES, Bootstrap, bootstrap, units
from windtunnel.fits.frames import COLUMNS, OPTIONAL, SWEEP_SOURCES, check_frame, load_csv, load_inputs, sweep_frame
from windtunnel.fits.horizon import WEAK_R2, HorizonFit, HorizonPoint, fit_horizon, horizon_factor
from windtunnel.fits.lr_transfer import GOAL_DEPTH_RATIO, GOAL_OCTAVES, Drift, LrOptimum, LrTransferFit, fit_lr_transfer
from windtunnel.fits.optimum import curve_optimum, grid_step, parabola_min
from windtunnel.fits.scaling_law import (
    HUBER_DELTA, INIT_GRID, MIN_LEVELS, N_STARTS, N_STARTS_BOOTSTRAP, ScalingLawFit, WsdFit, compute_optimal,
    fit_scaling_law, fit_wsd, loss_interval, optimal_tokens, optimal_tokens_interval, predict_loss,
)

__all__ = [
    "BatchSizeFit", "BatchSizePoint", "Bootstrap", "COLUMNS", "Drift", "GOAL_DEPTH_RATIO", "GOAL_OCTAVES",
    "HUBER_DELTA", "HorizonFit", "HorizonPoint", "INIT_GRID", "LEVEL", "LrOptimum", "LrTransferFit", "LrTuning",
    "MIN_LEVELS", "N_STARTS", "N_STARTS_BOOTSTRAP", "OPTIONAL", "RESAMPLES", "SWEEP_SOURCES", "ScalingLawFit",
    "WEAK_R2", "WsdFit", "batch_size_interval", "bootstrap", "check_frame", "compute_optimal", "curve_optimum",
    "fit_batch_size", "fit_horizon", "fit_lr_transfer", "fit_scaling_law", "fit_wsd", "grid_step", "horizon_factor",
    "load_csv", "load_inputs", "loss_interval", "optimal_tokens", "optimal_tokens_interval", "parabola_min",
    "predict_loss", "sweep_frame", "units",
]
