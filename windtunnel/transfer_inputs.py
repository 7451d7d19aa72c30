"""The inputs of a transfer plan besides the target: the sweep's winner and the fitted laws.

    load_winner(path)        a sweep's best.yaml (or RESULTS_DIR/SWEEP holding one)
    load_law(path, kind)     a `windtunnel fit KIND --json` file
    load_drift_law(path, ..) a `windtunnel fit lr-transfer --json` file: the lr's drift across depth or batch
    Laws                     the batch size, token budget and lr inputs; a given value beats a fit
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from windtunnel import results
from windtunnel.config.trial import TrialConfig, trial_from_dict
from windtunnel.errors import ConfigError

LR_BATCH_SCALINGS = {"none": 0.0, "sqrt": 0.5}  # names for the exponent of lr ∝ batch^beta


@dataclass
class Winner:
    trial: TrialConfig
    sweep: str
    number: int | None
    value: float | None
    path: str
    label: str | None = None
    """`windtunnel confirm`'s name for the winning configuration (its best.yaml has no trial number)."""
    tied_lr: tuple[float, float] | None = None
    """The lr range of the configurations confirm could not tell from the winner, the winner's included."""

    @property
    def which(self) -> str:
        return self.label or f"trial {self.number}"


def load_winner(path: str) -> Winner:
    """A sweep's best.yaml ({"sweep", "number", "value", "trial"}) or a folder holding one."""
    from windtunnel.config.overrides import load_yaml

    p = Path(path)
    if p.is_dir():
        if not (p / results.BEST).is_file():
            raise ConfigError(_no_winner(p, path))
        p = p / results.BEST
    elif not p.exists():
        raise ConfigError(f"{path}: no such file or folder (expected RESULTS_DIR/SWEEP after a sweep, or a best.yaml path)")
    d = load_yaml(p)
    trial = d.get("trial", d)
    if not isinstance(trial, dict):
        raise ConfigError(f"{p}: 'trial' must be a mapping (a TrialConfig as nested dicts)")
    try:
        cfg = trial_from_dict(trial)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    number = d.get("number")
    value = d.get("value")
    return Winner(cfg, str(d.get("sweep") or p.parent.name), None if number is None else int(number),
                  None if value is None else float(value), str(p), d.get("config"), tied_lr(p, d))


def tied_lr(best: Path, doc: dict) -> tuple[float, float] | None:
    """The lr range over confirm.csv's winner and tied rows beside a confirmed best.yaml: how well the proxy
    pins its own lr. None for a search's best.yaml (one trial, no replicates) or without the table."""
    import csv

    table = best.parent / "confirm.csv"
    if "tied" not in doc or not table.is_file():
        return None
    with table.open(newline="") as f:
        lrs = [float(r["optim.lr"]) for r in csv.DictReader(f) if r.get("verdict") in ("winner", "tied") and r.get("optim.lr")]
    return (min(lrs), max(lrs)) if lrs else None


def _no_winner(p: Path, path: str) -> str:
    """Why a folder has no best.yaml: a sweep none of whose trials completed (it said 'not a sweep
    folder'), or no sweep at all."""
    if not (p / results.STUDY).exists() and not (p / results.TRIALS).is_file():
        return f"{path}: no best.yaml in this folder (expected RESULTS_DIR/SWEEP after a sweep, or a best.yaml path)"
    states = {}
    if (p / results.TRIALS).is_file():
        import csv

        with open(p / results.TRIALS, newline="") as f:
            for row in csv.DictReader(f):
                states[row.get("state", "?")] = states.get(row.get("state", "?"), 0) + 1
    counts = ", ".join(f"{n} {'failed' if s == 'FAIL' else s.lower()}" for s, n in sorted(states.items()))
    return (f"{path}: no trial of this sweep has completed{f' ({counts})' if counts else ''}, so it has no winner "
            f"(best.yaml) to transfer; trials.csv says why they failed, or let the sweep run on")


def load_law(path: str, kind: str) -> dict:
    """A fit's --json output: kind 'batch-size' and 'horizon' need a, b; 'scaling-law' needs E, A, B,
    alpha, beta (a `fit wsd --json` file is read through its 'scaling_law')."""
    need = {"batch-size": ("a", "b"), "horizon": ("a", "b"), "scaling-law": ("E", "A", "B", "alpha", "beta")}[kind]
    opt = f"--{kind}-law" if kind != "scaling-law" else "--scaling-law"
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{opt}: {path}: no such file (the output of `windtunnel fit {kind} --json`)")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{opt}: {path}: not JSON ({e})") from None
    if kind == "scaling-law" and isinstance(d, dict) and isinstance(d.get("scaling_law"), dict):
        d = d["scaling_law"]
    if not isinstance(d, dict):
        raise ConfigError(f"{opt}: {path}: must hold a JSON object with keys {', '.join(need)}")
    for k in need:
        v = d.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ConfigError(f"{opt}: {path}: key {k!r} must be a finite number (got {v!r})")
    if d.get("at_bound"):  # E, alpha or beta on its box's edge (fit or interval): the budget it would set is not measured
        raise ConfigError(f"{opt}: {path}: {', '.join(d['at_bound'])} on its bound, so the fit does not determine the "
                          "token budget; fix the runs it came from or give --tokens")
    return {**d, "source": str(p)}


# What a drift law is fitted on, for the error that names a missing file.
DRIFT_SWEEPS = {"depth": "a depth sweep, e.g. sweeps/lr_depth.yaml",
                "batch": "lr sweeps of one model at two batch sizes, each an --input"}


def load_drift_law(path: str, axis: str, opt: str) -> dict:
    """`windtunnel fit lr-transfer --json`: per parametrization label (e.g. 'mup', 'mup/depth:none'),
    the optimum's drift along `axis` ('depth' or 'batch') per doubling, its interval and the range measured."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{opt}: {path}: no such file (the output of `windtunnel fit lr-transfer --json` "
                          f"on {DRIFT_SWEEPS[axis]})")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{opt}: {path}: not JSON ({e})") from None
    drifts = [x for x in ((d.get("drifts") or []) if isinstance(d, dict) else [])
              if isinstance(x, dict) and x.get("axis") == axis and not x.get("edge")]
    if not drifts:
        raise ConfigError(f"{opt}: {path}: no measured drift across {axis} (its 'drifts' hold none with axis "
                          f"{axis!r} whose optima are inside the grid)")
    from windtunnel.fits.lr_transfer import Drift  # the rate per doubling has one home; older JSON lacks it

    rates = {}
    for x in drifts:
        dr = Drift(**{k: x.get(k) for k in Drift.__dataclass_fields__})
        ci = dr.per_doubling_ci
        rates[dr.parametrization] = {"per_doubling": dr.per_doubling, "low": dr.low, "high": dr.high,
                                     "ci": list(ci) if ci else None}
    return {"rates": rates, "source": str(p)}


def load_depth_law(path: str) -> dict:
    return load_drift_law(path, "depth", "--depth-law")


@dataclass
class Laws:
    """Inputs of the batch size and the token budget; a given value always beats a fit."""

    batch_size: int | None = None
    """Tokens per step, given."""
    batch_size_law: dict | None = None
    loss: float | None = None
    """The target's loss, given (for the batch-size law)."""
    scaling_law: dict | None = None
    tokens: int | None = None
    tokens_per_param: float | None = None
    lr_batch_scaling: str = "none"
    """none (MiniCPM: μP's lr is kept), sqrt (PanGu-π Pro: lr × sqrt(batch / proxy batch)), an exponent
    beta in [0, 1]: lr × (batch / proxy batch)^beta, or FILE.json: beta measured with its interval
    (`fit lr-transfer --json` over lr sweeps at two batch sizes; docs/laws.md)."""
    lr_batch_exponent: float = field(init=False, default=0.0)
    """beta of lr_batch_scaling as a number (0 for FILE.json: lr_batch_law gives it, per parametrization)."""
    lr_batch_law: dict | None = field(init=False, default=None)
    """load_drift_law's for FILE.json; None otherwise."""
    depth_law: dict | None = None
    """load_depth_law's: the lr × 2^(drift per doubling × log2(target layers / proxy layers)); None: off."""
    horizon_law: dict | None = None
    """lr*(T) = a · T^-b (`windtunnel fit horizon --json`): the lr × (D / proxy tokens)^-b; None: off."""

    def __post_init__(self) -> None:
        for name, opt in (("batch_size", "--batch-size"), ("tokens", "--tokens")):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{opt}: must be > 0 (got {v})")
        for name, opt in (("loss", "--loss"), ("tokens_per_param", "--tokens-per-param")):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{opt}: must be a finite number > 0 (got {v})")
        beta = LR_BATCH_SCALINGS.get(str(self.lr_batch_scaling))
        if beta is None and str(self.lr_batch_scaling).endswith(".json"):
            self.lr_batch_law = load_drift_law(str(self.lr_batch_scaling), "batch", "--lr-batch-scaling")
            beta = 0.0
        if beta is None:
            try:
                beta = float(self.lr_batch_scaling)
            except ValueError:
                beta = math.nan
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"--lr-batch-scaling: must be {', '.join(LR_BATCH_SCALINGS)}, an exponent from 0 to 1 "
                              "or a FILE.json of `windtunnel fit lr-transfer --json` "
                              f"(got {self.lr_batch_scaling!r})")
        self.lr_batch_exponent = beta
