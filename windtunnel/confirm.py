"""`windtunnel confirm`: the best configurations of a finished sweep, and any the user names, re-run
with n seeds each, so that the winner comes with an interval.

One trial of a search is one draw of its noise (init, data order, float rounding), and the search
picked the luckiest draws: the top trials' own losses are biased low and cannot be told apart.
Confirm trains each configuration again with fresh seeds (windtunnel.config.sweep.trial_seeds,
stream 1: never a draw the search saw; replicate r of every configuration shares its seeds), as
the replicates of a sweep of its own, RESULTS/SWEEP-confirm: the sweep driver runs them (bundled
into populations, on any executor, resumed when re-run, each finished replicate an MLflow child
run); this module chooses them and writes confirm.csv, replicates.csv, report.md and best.yaml.

The rule: each configuration's mean final validation loss, its sd and a 95% Student-t interval
over its replicates; the winner is the lowest mean among configurations whose every replicate
finished; configurations whose interval overlaps the winner's are tied with it.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import yaml

from windtunnel.config.trial import RUN_ONLY, SECTIONS, field_type, settings, to_dict, trial_from_dict, with_overrides
from windtunnel.errors import ConfigError
from windtunnel.files import write_atomically
from windtunnel.results import counts_as_finished
from windtunnel.sweep import Driver
from windtunnel.config.sweep import SweepConfig, sweep_from_dict, trial_seeds
from windtunnel.symmetry import DEPTH, EMB, MINICPM_RATIO, RATIO

TS = optuna.trial.TrialState
LEVEL = 0.95
RULE = ("winner: the lowest mean final validation loss among configurations whose every replicate finished; "
        f"tied: those whose {LEVEL:.0%} t-interval overlaps the winner's")


@dataclass
class Candidate:
    label: str
    config: dict
    """The resolved trial config (to_dict), seeds as the sweep's base."""

    @property
    def key(self) -> str:
        return config_key(self.config)


def config_key(config: dict) -> str:
    """A configuration's identity: its settings but seeds and what only changes how it runs."""
    s = {k: v for k, v in settings(config).items() if k not in RUN_ONLY and k not in ("train.seed", "train.data_seed")}
    return hashlib.sha1(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()[:12]


# -- choosing what to run ----------------------------------------------------------------------
def parse_add(text: str) -> dict:
    """'model.scale_emb=12,optim.lr=0.01' -> {key: value}; a key that is no trial field is refused."""
    from windtunnel.config.overrides import parse_value

    out = {}
    for item in re.split(r",(?=\s*[A-Za-z_][\w]*\.[\w]+\s*=)", text.strip()):  # a comma inside a value stays
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--add: {item!r} must be KEY=VALUE[,KEY=VALUE...], e.g. model.scale_emb=12,optim.lr=0.01")
        if field_type(key) is None:
            section = key.partition(".")[0]
            fields = [f.name for f in dataclasses.fields(SECTIONS[section])] if section in SECTIONS else []
            allowed = f"{section}.{{{', '.join(fields)}}}" if fields else f"SECTION.FIELD, SECTION one of {', '.join(SECTIONS)}"
            raise ConfigError(f"--add: {key}: no such trial field (allowed: {allowed})")
        out[key] = parse_value(value.strip())
    return out


def parse_factors(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or not all(math.isfinite(c) and c > 0 for c in out):
        raise ConfigError(f"--scale-pairs: must be numbers > 0 separated by commas, e.g. 0.25,4 (got {text!r})")
    return out


def candidates(study: optuna.Study, top: int, adds: list[dict], factors: list[float],
               overrides: dict) -> list[Candidate]:
    """The top `top` distinct configurations, then each --add (the winner's config with those
    values), then the winner with both scale knobs ×c for each factor; overrides on all."""
    done = sorted((t for t in study.get_trials(deepcopy=False, states=(TS.COMPLETE,))
                   if t.value is not None and math.isfinite(t.value) and "config" in t.user_attrs),
                  key=lambda t: t.value)
    if not done:
        raise ConfigError(f"sweep_dir: study {study.study_name!r} has no complete trial to confirm "
                          "(allowed: a sweep with at least one finished trial)")

    def make(label: str, config: dict, changes: dict) -> Candidate:
        try:
            cfg = with_overrides(trial_from_dict(config), {**changes, **overrides})
        except ConfigError as e:
            raise ConfigError(f"{'--add' if label.startswith('add') else 'overrides'}: {e}") from None
        return Candidate(label, to_dict(cfg))

    out: dict[str, Candidate] = {}

    def put(c: Candidate) -> None:
        if c.key in out:  # the same configuration by two routes: one row, both names
            out[c.key].label += f" = {c.label}"
        else:
            out[c.key] = c

    for t in done:
        if len(out) >= top:
            break
        c = make(f"top {len(out) + 1} (trial {t.number})", t.user_attrs["config"], {})
        if c.key not in out:
            out[c.key] = c
    winner = done[0].user_attrs["config"]
    for i, changes in enumerate(adds, 1):
        put(make(f"add {i}: " + ",".join(f"{k}={v}" for k, v in changes.items()), winner, changes))
    if factors and winner["model"]["parametrization"] != "mup":
        raise ConfigError("--scale-pairs: the winner trained in sp, where scale_emb and scale_depth do nothing")
    for c in factors:
        m = winner["model"]
        put(make(f"top 1 scales ×{c:g}", winner, {EMB: m["scale_emb"] * c, DEPTH: m["scale_depth"] * c}))
    return list(out.values())


def confirm_sweep(study: optuna.Study, sweep_dir: Path, overrides: list[str], n_trials: int) -> SweepConfig:
    """The replicates' sweep: the finished sweep's settings (its executor, population, tracking),
    no search, no pruning (every replicate runs to its end), in SWEEP_DIR-confirm beside it;
    KEY=VALUE overrides any of it (data.source=..., executor.workers=2, name=...)."""
    from windtunnel.config.overrides import apply

    stored = json.loads(study.user_attrs.get("sweep", "{}"))
    known = {f.name for f in dataclasses.fields(SweepConfig)}
    d = {k: v for k, v in copy.deepcopy(stored).items() if k in known}
    best = min((t for t in study.get_trials(deepcopy=False, states=(TS.COMPLETE,)) if "config" in t.user_attrs),
               key=lambda t: t.value, default=None)
    for sec in SECTIONS:  # a study from before the sweep's settings were stored: its best trial's
        d.setdefault(sec, copy.deepcopy(best.user_attrs["config"][sec]) if best else {})
    for sec, cls in {**SECTIONS, **_sweep_sections()}.items():  # fields since removed would be refused
        if isinstance(d.get(sec), dict):
            names = {f.name for f in dataclasses.fields(cls)}
            d[sec] = {k: v for k, v in d[sec].items() if k in names}
    d.update(name=f"{sweep_dir.name}-confirm", results_dir=str(sweep_dir.parent), search={}, n_trials=n_trials,
             storage="", seeds="common", sampler={"type": "random", "seed": 0}, pruner={"type": "none"}, extend={})
    d.pop("description", None)
    return sweep_from_dict(apply(d, overrides, example="data.source=/path/to/shards"))


def _sweep_sections() -> dict:
    from windtunnel.config.sweep import SWEEP_SECTIONS

    return SWEEP_SECTIONS


# -- running them ------------------------------------------------------------------------------
class ConfirmDriver(Driver):
    """The sweep driver over a fixed list of replicates instead of a sampler's asks: each trial it
    asks takes the next replicate not yet finished or running (a retry keeps its own)."""

    def __init__(self, cfg: SweepConfig, cands: list[Candidate], seeds: int, progress: bool = True, stop=None,
                 tokens: dict | None = None):
        self.cands = {c.key: c for c in cands}
        self.request = [(c.key, r) for c in cands for r in range(seeds)]
        super().__init__(dataclasses.replace(cfg, n_trials=len(self.request)), progress, stop, tokens)
        held = json.loads(self.study.user_attrs.get("candidates", "{}"))
        held.update({c.key: {"label": c.label, "config": c.config} for c in cands})
        self.study.set_user_attr("candidates", json.dumps(held, default=str))
        self.study.set_user_attr("request", json.dumps({"keys": [c.key for c in cands], "seeds": seeds}))
        self.study.set_user_attr("confirm", json.dumps({"base_seed": cfg.train.seed, "stream": 1}))
        self.held = held

    def _replicates(self, states) -> set[tuple[str, int]]:
        return {(t.user_attrs["replicate"]["config"], t.user_attrs["replicate"]["seed"])
                for t in self.study.get_trials(deepcopy=False)
                if "replicate" in t.user_attrs and (counts_as_finished(t) if states is None else t.state in states)}

    def finished(self) -> int:
        return len(self._replicates(None) & set(self.request))

    def remaining(self) -> int:
        busy = self._replicates(None) | self._replicates((TS.RUNNING,))
        return sum(r not in busy for r in self.request)

    def trial_config(self, trial: optuna.trial.Trial):
        rep = trial.user_attrs.get("replicate")
        if rep is None:  # the next replicate nobody holds (a queued retry holds its own)
            busy = self._replicates(None) | self._replicates((TS.RUNNING,))
            free = [r for r in self.request if r not in busy]
            queued = self._replicates((TS.WAITING,))  # retries: they will ask for their own
            key, seed = next((r for r in free if r not in queued), free[0])
            rep = {"config": key, "seed": seed, "label": self.cands[key].label}
            trial.set_user_attr("replicate", rep)
        init, data = trial_seeds(self.cfg.train.seed, rep["seed"], stream=1)
        config = self.cands[rep["config"]].config if rep["config"] in self.cands else self.held[rep["config"]]["config"]
        return with_overrides(trial_from_dict(config), {"train.seed": init, "train.data_seed": data})

    def write_tables(self) -> None:
        write_outputs(self.study, self.dir)

    def write_report(self) -> list[Path]:
        return write_outputs(self.study, self.dir)


# -- what it says ------------------------------------------------------------------------------
def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, float, float, float]:
    """(mean, sd, low, high): Student's t interval for the mean; nan bounds for fewer than 2."""
    from scipy import stats

    s = pd.Series(values, dtype=float)
    mean, sd = float(s.mean()), float(s.std(ddof=1)) if len(s) > 1 else math.nan
    if len(s) < 2:
        return mean, sd, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(s) - 1)) * sd / math.sqrt(len(s))
    return mean, sd, mean - half, mean + half


def replicates_frame(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rep = t.user_attrs.get("replicate")
        if rep is None or t.user_attrs.get("retried"):
            continue
        cfg = t.user_attrs.get("config", {}).get("train", {})
        rows.append({"config": rep["config"], "label": rep.get("label", ""), "replicate": rep["seed"],
                     "number": t.number, "state": t.state.name, "value": t.value, "train.seed": cfg.get("seed"),
                     "train.data_seed": cfg.get("data_seed"),
                     "status": t.user_attrs.get("result", {}).get("status", ""),
                     "reason": t.user_attrs.get("result", {}).get("reason", "")})
    return pd.DataFrame(rows, columns=["config", "label", "replicate", "number", "state", "value", "train.seed",
                                       "train.data_seed", "status", "reason"])


def summary_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per requested configuration: its replicates' statistics and its verdict."""
    held = json.loads(study.user_attrs.get("candidates", "{}"))
    req = json.loads(study.user_attrs.get("request", '{"keys": [], "seeds": 0}'))
    reps = replicates_frame(study)
    rows = []
    for key in req["keys"]:
        c = held[key]
        mine = reps[(reps.config == key) & (reps.replicate < req["seeds"])]
        ok = mine[mine.state == "COMPLETE"]
        mean, sd, lo, hi = t_interval(list(ok.value))
        m = c["config"]["model"]
        rows.append({"config": c["label"], "key": key, "n": req["seeds"], "ok": len(ok),
                     "failed": int((mine.state == "FAIL").sum()), "mean": mean, "sd": sd, "ci_low": lo, "ci_high": hi,
                     "optim.lr": c["config"]["optim"]["lr"], "model.init_std": m["init_std"], EMB: m["scale_emb"],
                     DEPTH: m["scale_depth"], RATIO: m["scale_emb"] / m["scale_depth"],
                     "schedule.warmup": c["config"]["schedule"]["warmup"]})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    eligible = df[(df.ok == df.n) & (df.ok >= 2)]
    df["verdict"] = ["incomplete" if r.ok < r.n or r.ok < 2 else "" for r in df.itertuples()]
    if not eligible.empty:
        w = eligible["mean"].idxmin()
        lo, hi = df.at[w, "ci_low"], df.at[w, "ci_high"]
        for i, r in df.iterrows():
            if r.verdict != "incomplete":
                df.at[i, "verdict"] = "winner" if i == w else ("tied" if r.ci_low <= hi and r.ci_high >= lo else "worse")
    return df


def table_lines(df: pd.DataFrame) -> list[str]:
    """The summary as a markdown table (stdout prints the same)."""
    lines = ["| configuration | n ok | mean | sd | 95% interval | verdict | lr | init_std | scale_emb | scale_depth | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, p=4: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"  # noqa: E731
    for _, r in df.iterrows():
        lines.append(f"| {r.config} | {r.ok}/{r.n} | {f(r['mean'])} | {f(r.sd)} | [{f(r.ci_low)}, {f(r.ci_high)}] | "
                     f"**{r.verdict}** | {r['optim.lr']:.3g} | {r['model.init_std']:.3g} | {r[EMB]:.3g} | "
                     f"{r[DEPTH]:.3g} | {r[RATIO]:.2f} |")
    return lines


def write_outputs(study: optuna.Study, out: Path) -> list[Path]:
    """confirm.csv, replicates.csv, report.md and (once a winner exists) best.yaml, from the study."""
    df, reps = summary_frame(study), replicates_frame(study)
    write_atomically(out / "confirm.csv", lambda p: df.to_csv(p, index=False))
    write_atomically(out / "replicates.csv", lambda p: reps.to_csv(p, index=False))
    files = [out / "confirm.csv", out / "replicates.csv"]
    name = study.study_name.removesuffix("-confirm")
    req = json.loads(study.user_attrs.get("request", '{"seeds": 0}'))
    lines = [f"# Confirm `{name}`", "",
             f"Each configuration re-trained with {req['seeds']} fresh seeds (init and data order; replicate r of every "
             "configuration shares its seeds, none a draw the search saw). The search's own losses are not used: "
             "its top trials were picked for their luck as well as their parameters.", "",
             f"Rule: {RULE}.", ""]
    if not df.empty:
        lines += table_lines(df) + [""]
        win = df[df.verdict == "winner"]
        if not win.empty:
            w = win.iloc[0]
            tied = list(df[df.verdict == "tied"].config)
            lines += [f"**Winner:** {w.config}: {w['mean']:.4f} ± {w.sd:.4f} (sd), {LEVEL:.0%} interval "
                      f"[{w.ci_low:.4f}, {w.ci_high:.4f}], ratio scale_emb/scale_depth {w[RATIO]:.2f} "
                      f"(MiniCPM's {MINICPM_RATIO:.2f}).",
                      "", f"**Tied with it** ({len(tied)}): " + ("; ".join(tied) if tied else "none") + ".", ""]
            cfg = json.loads(study.user_attrs["candidates"])[w.key]["config"]
            doc = {"sweep": name, "number": None, "value": float(w["mean"]), "config": w.config, "rule": RULE,
                   "interval": {"level": LEVEL, "low": float(w.ci_low), "high": float(w.ci_high), "sd": float(w.sd),
                                "n": int(w.ok)},
                   "tied": tied, "trial": cfg}
            write_atomically(out / "best.yaml", lambda p: p.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)))
            files.append(out / "best.yaml")
        else:
            lines += ["No winner yet: no configuration has all its replicates finished.", ""]
        bad = reps[reps.state == "FAIL"]
        if not bad.empty:
            lines += ["## Failed or diverged replicates", ""] + [f"- {r.label} seed {r.replicate}: {r.reason}"
                                                                for r in bad.itertuples()] + [""]
    lines += ["`confirm.csv`: the table; `replicates.csv`: every replicate's loss and seeds; `best.yaml`: the "
              "winner's config with its interval (`windtunnel transfer` reads it). How to read it: docs/noise.md."]
    write_atomically(out / "report.md", lambda p: p.write_text("\n".join(lines) + "\n"))
    return [*files, out / "report.md"]
