"""A sweep's results, regenerated from its study alone: trials.csv/.parquet, curves.csv (every
evaluation), branches.csv (every WSD decay branch), best.yaml, plots, report.md. Every file is
written to a temp name and renamed, so none is ever half-written.

The folder's layout (the names below, best.yaml's keys) lives here only: the fits and transfer
read a sweep's folder through them. Reading the layout loads no optuna (the fits run without it).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from windtunnel import symmetry
from windtunnel.files import write_atomically, write_text

STUDY = "study.journal"  # the Optuna study: the source everything else here is regenerated from
TRIALS = "trials.csv"  # one row per trial: number, state, value, parameters by dotted key, ...
TRIALS_PARQUET = "trials.parquet"
CURVES = "curves.csv"  # one row per evaluation of every trial: ..., tokens, val_loss
BRANCHES = "branches.csv"  # one row per WSD decay branch: ..., n_params, tokens, final_val_loss
BEST = "best.yaml"  # the best completed trial: sweep, number, value, params, trained_with, trial (its config)
REPORT = "report.md"
COMPLETE = "COMPLETE"  # the `state` of a trial that counts (not FAIL, PRUNED, RUNNING, STOPPED, REPEAT)
REPEAT = "REPEAT"  # a complete run of an earlier complete trial's parameters and seeds: the same run again
FINAL = ("COMPLETE", "PRUNED", "FAIL")


def best_setting(sweep_dir: Path, key: str) -> Any:
    """A setting (dotted key, e.g. model.seq_len) of the best trial's config in sweep_dir's best.yaml;
    None if there is no best.yaml or no such setting."""
    best = Path(sweep_dir) / BEST
    if not best.is_file():
        return None
    v: Any = (yaml.safe_load(best.read_text()) or {}).get("trial", {})
    for k in key.split("."):
        v = v.get(k) if isinstance(v, dict) else None
    return v


def open_sweep_study(d: Path) -> optuna.Study:
    """The study of a folder `windtunnel sweep` (or `confirm`) wrote; ConfigError naming it if none."""
    import optuna

    from windtunnel.errors import ConfigError
    from windtunnel.search import open_storage

    d = Path(d)
    if d.is_file():
        raise ConfigError(f"{d} is a file; a sweep's results folder is needed (RESULTS_DIR/SWEEP, e.g. results/quickstart)")
    if not d.is_dir():
        raise ConfigError(f"{d}: no such folder (allowed: a folder `windtunnel sweep` wrote, RESULTS_DIR/SWEEP)")
    if not (d / STUDY).exists():
        raise ConfigError(_not_a_sweep(d))
    storage = open_storage(str(d / STUDY))
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if not names:
        raise ConfigError(f"{d}: its study.journal holds no study yet (allowed: a folder `windtunnel sweep` wrote)")
    return optuna.load_study(study_name=names[0], storage=storage)


def _not_a_sweep(d: Path) -> str:
    """What a folder without study.journal is: the results dir the sweep printed (`windtunnel ui
    RESULTS_DIR`), whose sweeps are its subfolders; a sweep whose study lives in a database
    (storage=URL); or no sweep's."""
    import shlex

    sweeps = sorted(p.parent.name for p in d.glob(f"*/{STUDY}"))
    if sweeps:
        return (f"{d}: a results dir holding the sweeps {', '.join(sweeps)}: report one of them, e.g. "
                f"windtunnel report {shlex.quote(str(d / sweeps[0]))}")
    if (d / TRIALS).is_file() or (d / "bundles").is_dir():
        return (f"{d}: this sweep's study is not in a journal here (a sweep run with storage=URL keeps it in that "
                "database); report reads a sweep's study.journal")
    return f"{d}: holds no study.journal (allowed: a folder `windtunnel sweep` wrote, RESULTS_DIR/SWEEP)"


def counts_as_finished(t: optuna.trial.FrozenTrial) -> bool:
    """COMPLETE, PRUNED, or FAIL that was not replaced by a retry."""
    return t.state.name in FINAL and not t.user_attrs.get("retried", False)


def repeats(trials: list[optuna.trial.FrozenTrial]) -> dict[int, int]:
    """{number: the earlier trial's number} of each complete trial that ran an earlier complete
    one's parameters and seeds again (grid sweeps resumed by drivers before session 27 did): the
    same run, so not a replicate; the fits count the first only."""
    first: dict[str, int] = {}
    out = {}
    for t in trials:
        if t.state.name != COMPLETE or t.user_attrs.get("retried"):
            continue
        train = t.user_attrs.get("config", {}).get("train", {})
        k = json.dumps([sorted(t.params.items()), train.get("seed"), train.get("data_seed")], default=str)
        if k in first:
            out[t.number] = first[k]
        else:
            first[k] = t.number
    return out


def trials_frame(study: optuna.Study, driver_running: bool = False) -> pd.DataFrame:
    """One row per trial, in its final state: an attempt replaced by a retry (same parameters) is not
    a row of its own but counted in its retry's `attempts` (it listed 26 rows for a 20-trial sweep).
    A trial left RUNNING by a stopped driver reads STOPPED (a re-run runs it) unless driver_running;
    one that ran an earlier one's parameters and seeds again reads REPEAT (`repeats`)."""
    fixed = json.loads(study.user_attrs.get("fixed", "{}"))
    trials = study.get_trials(deepcopy=False)
    retry_of = {t.number: t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    again = repeats(trials)
    rows = []
    for t in trials:
        if t.user_attrs.get("retried", False):
            continue
        attempts, n = 1, t.number
        while n in retry_of:
            attempts, n = attempts + 1, retry_of[n]
        r = t.user_attrs.get("result", {})
        state = "STOPPED" if t.state.name == "RUNNING" and not driver_running else t.state.name
        if t.number in again:
            state, r = REPEAT, {**r, "reason": f"repeats trial {again[t.number]} (same parameters and seeds)"}
        rows.append({"number": t.number, "state": state, "value": t.value,
                     **t.params, **fixed, "train.seed": t.user_attrs.get("config", {}).get("train", {}).get("seed"),
                     "status": r.get("status", ""), "tokens": r.get("tokens"), "seconds": r.get("seconds"),
                     "tokens_per_s": r.get("tokens_per_s"), "attempts": attempts,
                     "reason": r.get("reason") or t.user_attrs.get("reason", "")})
    # no trial yet (a sweep stopped before its first ask): the columns the report reads, empty
    if not rows:
        return pd.DataFrame(columns=["number", "state", "value", "attempts", "reason"])
    return pd.DataFrame(rows)


def _per_point_frame(study: optuna.Study, key: str, extra: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per entry of the result's `key` list of every trial not replaced by a retry nor a
    repeat: its number, state, params, the sweep's fixed values, extra's {column: result key}, then the entry."""
    fixed = json.loads(study.user_attrs.get("fixed", "{}"))
    rows = []
    trials = study.get_trials(deepcopy=False)
    again = repeats(trials)
    for t in trials:
        result = t.user_attrs.get("result", {})
        if t.user_attrs.get("retried") or not result.get(key) or t.number in again:
            continue
        head = {"number": t.number, "state": t.state.name, **t.params, **fixed,
                **{col: result.get(k) for col, k in (extra or {}).items()}}
        rows += [{**head, **point} for point in result[key]]
    return pd.DataFrame(rows)


def curves_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per evaluation of every trial: the input of `windtunnel fit batch-size` and friends."""
    return _per_point_frame(study, "curve")


def branches_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per WSD decay branch (train.branch_at) of every trial: (N, D, loss) points for
    `windtunnel fit wsd` and, through it, the data-model scaling law."""
    return _per_point_frame(study, "branches", {"n_params": "params"})


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    import optuna

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    return min(done, key=lambda t: t.value) if done else None


def write_tables(study: optuna.Study, sweep_dir: Path, driver_running: bool = False) -> pd.DataFrame:
    df = trials_frame(study, driver_running)
    write_atomically(sweep_dir / TRIALS, lambda p: df.to_csv(p, index=False))
    write_atomically(sweep_dir / TRIALS_PARQUET, lambda p: df.astype({"reason": str}).to_parquet(p, index=False))
    for name, frame in ((CURVES, curves_frame(study)), (BRANCHES, branches_frame(study))):
        if not frame.empty:
            write_atomically(sweep_dir / name, lambda p, f=frame: f.to_csv(p, index=False))
    best = best_trial(study)
    if best is not None:
        prov = best.user_attrs.get("result", {}).get("provenance", {})
        doc = {"sweep": study.study_name, "number": best.number, "value": best.value, "params": best.params,
               "trained_with": {k: prov[k] for k in ("device", "threads", "population", "data") if k in prov},
               "trial": best.user_attrs["config"]}
        write_text(sweep_dir / BEST, yaml.safe_dump(doc, sort_keys=False))
    return df


def _plots(study: optuna.Study, df: pd.DataFrame, sweep_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out = []
    done = df[df.state == "COMPLETE"].sort_values("number")
    if done.empty:
        return out
    space = json.loads(study.user_attrs.get("space", "{}")).get("search", {})
    searched = [n for n, s in space.items() if s.get("type") != "fixed" and n in df.columns]
    if searched:
        fig, axes = plt.subplots(1, len(searched), figsize=(4 * len(searched) + 1, 3.4), squeeze=False, sharey=True,
                                 layout="constrained")  # room for the colour bar
        for ax, name in zip(axes[0], searched):
            x = done[name]
            if space[name].get("type") == "categorical":
                x = x.astype(str)
            dots = ax.scatter(x, done.value, s=14, c=done.number, cmap="viridis")
            if space[name].get("log"):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(name)
        axes[0][0].set_ylabel("final validation loss")
        bar = fig.colorbar(dots, ax=axes[0].tolist(), label="trial")
        bar.locator = matplotlib.ticker.MaxNLocator(integer=True)  # trials are whole numbers
        bar.update_ticks()
        fig.suptitle(f"{study.study_name}: loss vs each searched hyperparameter")
        out.append(sweep_dir / "loss_vs_params.png")
        write_atomically(out[-1], lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)
    ratio = ratio_analysis(study, df)
    if ratio is not None:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        symmetry.plot_ratio(ax, ratio["done"], ratio["fit"])
        ax.set_title(f"{study.study_name}: loss vs scale_emb / scale_depth (colour = trial number)", fontsize=9)
        fig.tight_layout()
        out.append(sweep_dir / "loss_vs_ratio.png")
        write_atomically(out[-1], lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.scatter(done.number, done.value, s=12, label="trial")
    ax.plot(done.number, done.value.cummin(), color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel="final validation loss", title=f"{study.study_name}: optimization history")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # no trial 2.5
    ax.legend()
    fig.tight_layout()
    out.append(sweep_dir / "history.png")
    write_atomically(out[-1], lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    imp = importances(study)
    if imp:
        fig, ax = plt.subplots(figsize=(6, 1.6 + 0.4 * len(imp)))  # room for title and axis at one bar
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title=f"{study.study_name}: parameter importance")
        fig.tight_layout()
        out.append(sweep_dir / "importance.png")
        write_atomically(out[-1], lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)
    return out


def ratio_analysis(study: optuna.Study, df: pd.DataFrame) -> dict | None:
    """The complete trials with their scale_emb / scale_depth, its fit and what the space searched
    (windtunnel/symmetry.py), or None when the sweep could not move the ratio."""
    space = json.loads(study.user_attrs.get("space", "{}")).get("search", {})
    searched = [n for n, s in space.items() if s.get("type") != "fixed"]
    done = df[(df.state == "COMPLETE") & ~df.retried] if "retried" in df else df[df.state == "COMPLETE"]
    if done.empty or not {symmetry.EMB, symmetry.DEPTH} & set(searched):
        return None
    done = symmetry.with_ratio(done, json.loads(study.user_attrs.get("sweep", "{}")))
    if done is None:
        return None
    log_knobs = [n for n in searched if space[n].get("log")]
    return {"done": done, "fit": symmetry.ratio_fit(done, log_knobs), "log_knobs": log_knobs,
            "both": bool(symmetry.ridge_warning(space))}


def importances(study: optuna.Study) -> dict[str, float]:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varying = {n for t in done for n in t.params if len({tt.params.get(n) for tt in done}) > 1}
    if len(done) < 3 or not varying:
        return {}
    try:
        return optuna.importance.get_param_importances(study, params=sorted(varying))
    except (RuntimeError, ValueError):
        return {}


def write_report(study: optuna.Study, sweep_dir: Path, driver_running: bool = False) -> list[Path]:
    """Everything a sweep produces, regenerated from the study: tables, best.yaml, plots, report."""
    df = write_tables(study, sweep_dir, driver_running)
    plots = _plots(study, df, sweep_dir)
    n = df.state.value_counts().to_dict()
    retried = sum(bool(t.user_attrs.get("retried")) for t in study.get_trials(deepcopy=False))
    best = best_trial(study)
    lines = [f"# Sweep `{study.study_name}`", "",
             f"{len(df)} trials: {n.get('COMPLETE', 0)} complete, {n.get('PRUNED', 0)} pruned, "
             f"{n.get('FAIL', 0)} failed"
             + (f", {n.get('RUNNING', 0) + n.get('WAITING', 0) + n.get('STOPPED', 0)} unfinished (running, queued, "
                "or stopped with their driver: a re-run runs them)"
                if n.get("RUNNING") or n.get("WAITING") or n.get("STOPPED") else "")
             + (f", {n[REPEAT]} repeated an earlier trial's parameters and seeds (not counted: trials.csv names it)"
                if n.get(REPEAT) else "")
             + f" ({retried} more were retried).", ""]
    if best is not None:
        lines += [f"**Best:** trial {best.number}, final validation loss **{best.value:.4f}**", "",
                  "| parameter | value |", "|---|---|"]
        lines += [f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in best.params.items()]
        lines += ["", "`best.yaml` holds its full resolved config and how it was trained: `windtunnel trial --config best.yaml` "
                  "re-runs it (on a CPU with the same threads: the same loss, bit for bit; trained in a population "
                  "of several: within float noise).", ""]
    for inv in [i for i in study.user_attrs.get("invocations", []) if i["trials"]]:  # not a re-run of a complete sweep
        hours = inv["wall_s"] / 3600
        lines += [f"Run: {inv['trials']} trials in {inv['wall_s'] / 60:.1f} min on {inv['slots']} slot(s), "
                  f"population {inv['population']}, sampler {inv['sampler']}: "
                  f"{inv['trials'] / max(hours * inv['slots'], 1e-9):.0f} trials per slot-hour; slots waited on "
                  f"the driver {100 * inv['driver_wait_frac']:.2f}% of the time"
                  + (f" and trained {100 * inv['train_frac']:.0f}% of it (the rest: starting workers, setting up "
                     "populations)" if "train_frac" in inv else "")
                  + (f"; the driver spent {100 * inv['ask_frac']:.0f}% of its time asking the sampler"
                     if "ask_frac" in inv else "") + ".", ""]
    imp = importances(study)
    if imp:
        lines += ["**Parameter importance (fANOVA):** " + ", ".join(f"`{k}` {v:.2f}" for k, v in imp.items()), ""]
    ratio = ratio_analysis(study, df)
    if ratio is not None and ratio["fit"] is not None:
        lines += [symmetry.ratio_sentence(ratio["fit"], ratio["both"], ratio["log_knobs"]), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    top = df[df.state == "COMPLETE"].sort_values("value").head(10)
    if not top.empty:
        if ratio is not None:  # the knob that matters beside the two that carry it
            top = symmetry.with_ratio(top, json.loads(study.user_attrs.get("sweep", "{}")))
        cols = ["number", "value"] + [c for c in top.columns if "." in c] + ([symmetry.RATIO] if ratio is not None else [])
        lines += ["", "## Top trials", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, r in top.iterrows():
            lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    failed = df[df.state == "FAIL"]
    if not failed.empty:
        lines += ["", "## Failed trials", ""] + [f"- trial {r.number}: {r.reason}" for r in failed.itertuples()]
    report = sweep_dir / REPORT
    write_text(report, "\n".join(lines) + "\n")
    # best.yaml only where a trial completed: a sweep whose every trial failed has none
    return [sweep_dir / TRIALS, *([sweep_dir / BEST] if best is not None else []), report, *plots]
