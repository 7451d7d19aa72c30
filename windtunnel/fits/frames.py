"""The input of every fit: a CSV of the kind's columns or a sweep's own tables, checked here so
that `windtunnel fit`, `windtunnel report` and the transfer module give the same one-line
`ConfigError`s; and the output's plain-JSON form."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from windtunnel import results
from windtunnel.errors import ConfigError

# Columns each fit needs; extra columns are ignored, but for those in OPTIONAL.
COLUMNS: dict[str, tuple[str, ...]] = {
    "lr-transfer": ("parametrization", "width", "lr", "loss"),
    "batch-size": ("model", "batch_size", "tokens", "loss"),
    "scaling-law": ("N", "D", "loss"),
    "wsd": ("model", "N", "tokens", "loss"),
    "horizon": ("tokens", "lr", "loss"),
}
# Columns a fit reads where present. run (or seed) names the run a row belongs to: the bootstrap
# resamples runs. lr-transfer: depth (n_layers), batch (tokens a step). batch-size: lr, tuned per batch size.
# horizon: init_std, tuned with the lr.
OPTIONAL: dict[str, tuple[str, ...]] = {
    "lr-transfer": ("depth", "batch", "run", "seed"),
    "batch-size": ("lr", "run", "seed"),
    "horizon": ("init_std", "run", "seed"),
}
# Columns that must be numeric (the others are labels).
_NUMERIC = {"width", "lr", "loss", "batch_size", "tokens", "N", "D", "depth", "init_std", "batch"}
# Columns that must be > 0 where present (they are taken logs of).
_POSITIVE = {"width", "lr", "batch_size", "tokens", "N", "D", "depth", "init_std", "batch"}


def where(df: pd.DataFrame) -> str:
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


def load_inputs(paths: list[str | Path], kind: str) -> pd.DataFrame:
    """load_csv of each path, stacked: e.g. lr sweeps at two batch sizes for lr ∝ batch^beta. Each
    input's runs stay apart (run = '<input>:<run, seed or row>'), as trial numbers repeat across sweeps."""
    frames = [load_csv(p, kind) for p in paths]
    if len(frames) == 1:
        return frames[0]
    for i, f in enumerate(frames):
        label = f["run"] if "run" in f.columns else f["seed"] if "seed" in f.columns else pd.Series(f.index, index=f.index)
        f["run"] = f"{i}:" + label.astype(str)
    out = pd.concat(frames, ignore_index=True)
    out.attrs["source"] = " + ".join(where(f) for f in frames)
    return out


# What a sweep writes (windtunnel.results, the layout's home) -> the frame a fit takes: the table
# read, each fit column's source column in it (parameters under their dotted config keys, searched or fixed),
# and the optional columns' sources (taken where the table has them).
SWEEP_SOURCES: dict[str, tuple[str, dict[str, str], dict[str, str]]] = {
    # final validation loss of each trial; depth when n_layers was searched; batch from sweep_frame
    "lr-transfer": (results.TRIALS, {"parametrization": "model.parametrization", "width": "model.d_model",
                                   "lr": "optim.lr", "loss": "value"},
                    {"depth": "model.n_layers", "run": "number", "depth_scaling": "model.depth_scaling"}),
    # the loss at every evaluation: one batch-size optimum per (model, token count)
    "batch-size": (results.CURVES, {"model": "model.d_model", "batch_size": "train.batch_size",
                                  "tokens": "tokens", "loss": "val_loss"},
                   {"lr": "optim.lr", "run": "number"}),
    # the loss at the end of every decay branch (train.branch_at)
    "wsd": (results.BRANCHES, {"model": "model.d_model", "N": "n_params", "tokens": "tokens",
                             "loss": "final_val_loss"}, {}),
    # the same branches as the law's (N, D, loss) rows, for `fit scaling-law` on a WSD sweep
    "scaling-law": (results.BRANCHES, {"N": "n_params", "D": "tokens", "loss": "final_val_loss"}, {}),
    # final validation loss of each trial at its token budget
    "horizon": (results.TRIALS, {"tokens": "train.tokens", "lr": "optim.lr", "loss": "value"},
                {"init_std": "model.init_std", "run": "number"}),
}


def sweep_frame(path: str | Path, kind: str) -> pd.DataFrame:
    """The frame fit `kind` takes (unchecked), from a sweep's results folder or a table in it.

    lr-transfer and horizon read trials.csv, batch-size curves.csv, wsd and scaling-law branches.csv: the given
    file if it is that table, else the one beside it. Only COMPLETE trials count (FAIL, PRUNED and
    retried ones do not). batch-size gives batch sizes in tokens (train.batch_size x model.seq_len)
    and rounds token counts to multiples of train.eval_every (trials of different batch sizes
    evaluate a few steps apart); batch-size and wsd name models d<d_model>. A setting not in the
    table (seq_len, eval_every) is read from the folder's best.yaml. lr-transfer labels a trial
    with model.depth_scaling other than sqrt as '<parametrization>/depth:<value>' (a control), and
    gives each trial's batch in tokens (train.batch_size x model.seq_len) where the sweep says them.
    """
    p = Path(path)
    if kind not in SWEEP_SOURCES:
        raise ConfigError(f"{p}: fit {kind} takes a CSV with columns {','.join(COLUMNS.get(kind, ()))}; "
                          f"only {', '.join(SWEEP_SOURCES)} read a sweep's results")
    name, src, optional = SWEEP_SOURCES[kind]
    or_csv = f" or a CSV with columns {','.join(COLUMNS[kind])}" if kind in COLUMNS else ""
    need = ",".join(src.values())
    table = p / name if p.is_dir() else p
    if not table.is_file():
        raise ConfigError(f"{table}: no such file; fit {kind} reads a sweep's {name}{or_csv}")
    df = _read_csv(table, need)
    if src["loss"] not in df.columns and not p.is_dir():  # e.g. trials.csv for batch-size: its curves.csv
        table = p.parent / name
        if not table.is_file():
            raise ConfigError(f"{p}: missing column {src['loss']!r} and no {name} beside it; "
                              f"fit {kind} reads a sweep's {name}{or_csv}")
        df = _read_csv(table, need)
    where_ = str(table)
    if "state" not in df.columns:
        raise ConfigError(f"{where_}: missing column 'state' (a sweep's {name} has it)")
    df = df[df["state"] == results.COMPLETE]

    def col(c: str) -> pd.Series:
        s = src[c]
        if s not in df.columns and "." in s and (v := results.best_setting(table.parent, s)) is not None:
            return pd.Series(v, index=df.index)  # not searched: the same for every trial
        if s not in df.columns:
            hint = (f"the sweep parameter that gives {kind}'s {c!r}: search it, type fixed for one value"
                    if "." in s else f"it gives {kind}'s {c!r}; a sweep's {name} has it")
            raise ConfigError(f"{where_}: missing column {s!r} ({hint})")
        return df[s]

    out = pd.DataFrame({c: col(c) for c in src})
    for c, s in optional.items():
        if s in df.columns:
            out[c] = df[s]
    if "depth_scaling" in out.columns:
        ds = out.pop("depth_scaling").astype(str)
        other = ds != "sqrt"
        out.loc[other, "parametrization"] = out.loc[other, "parametrization"].astype(str) + "/depth:" + ds[other]
    if kind == "lr-transfer":
        bs, seq = (_setting_or_none(df, table, k) for k in ("train.batch_size", "model.seq_len"))
        if bs is not None and seq is not None:
            out["batch"] = bs * seq
    if kind in ("batch-size", "wsd"):
        out["model"] = "d" + out["model"].astype(str)
    if kind == "batch-size":
        seq = _sweep_setting(df, table, "model.seq_len", kind, "'batch_size' in tokens")
        every = _sweep_setting(df, table, "train.eval_every", kind, "'tokens' shared by all batch sizes")
        out["batch_size"] = out["batch_size"] * seq
        out["tokens"] = (out["tokens"] / every).round().astype(int) * every
    out = out.reset_index(drop=True)
    out.attrs["source"] = where_
    return out


def _setting_or_none(df: pd.DataFrame, table: Path, key: str):
    """A config value: the table's column if the sweep searched it, else the (same for all trials)
    value in the best trial's config; None when neither holds a number > 0."""
    if key in df.columns:
        return df[key]
    v = results.best_setting(table.parent, key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def _sweep_setting(df: pd.DataFrame, table: Path, key: str, kind: str, why: str):
    """_setting_or_none, required."""
    v = _setting_or_none(df, table, key)
    if v is None:
        raise ConfigError(f"{table}: missing column {key!r} and no {key} in {table.parent / results.BEST} "
                          f"({kind} needs it for {why})")
    return v


def check_frame(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Check columns and types for `kind`; return a copy (the needed columns, then the optional ones
    present) with rows of non-finite loss dropped."""
    where_ = where(df)
    need = COLUMNS[kind]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ConfigError(
            f"{where_}: missing column {missing[0]!r}; {kind} needs columns {','.join(need)} "
            f"(got {','.join(map(str, df.columns)) or 'none'})"
        )
    cols = list(need) + [c for c in OPTIONAL.get(kind, ()) if c in df.columns]
    out = df[cols].copy()
    out.attrs["source"] = where_
    for c in cols:
        if c in _NUMERIC:
            num = pd.to_numeric(out[c], errors="coerce")
            bad = num.isna() & out[c].notna()
            if bad.any():
                raise ConfigError(
                    f"{where_}: column {c!r}: numbers required (got {out[c][bad].iloc[0]!r} "
                    f"in row {int(np.flatnonzero(bad.to_numpy())[0]) + 2})"
                )
            out[c] = num.astype(float)
        else:
            out[c] = out[c].astype(str)
    # Failed or diverged trials carry NaN/inf loss: they are not points of the law.
    out = out[np.isfinite(out["loss"].to_numpy())]
    for c in cols:
        if c in _POSITIVE:
            col = out[c].to_numpy()
            bad = ~(np.isfinite(col) & (col > 0))
            if bad.any():
                raise ConfigError(f"{where_}: column {c!r}: values must be finite and > 0 (got {float(col[bad][0])!r})")
    if out.empty:
        raise ConfigError(f"{where_}: no rows with a finite 'loss' (columns {','.join(need)})")
    out = out.reset_index(drop=True)
    out.attrs["source"] = where_
    return out


def field_getter(fit: Any):
    """get(key) for a fit's dataclass or its `--json` dict alike: the laws' helpers take either."""
    return fit.get if isinstance(fit, dict) else lambda k: getattr(fit, k)


def jsonable(x: Any) -> Any:
    """Plain JSON types: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x
