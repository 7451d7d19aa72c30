"""Does the transferred configuration win at the target's scale? (issue 24 item 6)

`windtunnel transfer` writes a launchable run (train.yaml + launch.sh) for the target; this trains it
beside lr ×{½, 1/√2, √2, 2, 4}, init_std ×{½, 2} and MiniCPM's published values (scale_emb 12,
scale_depth 1.4, init_std 0.1, lr 0.01, through the same μP rules), each with n seeds, every run a
real `launch.sh` of the large run. The three most telling configurations (the transferred one and its
lr neighbours ×1/√2, ×√2) run with all their seeds first, then seed 0 of the rest before seed 1, so a
partial result can already be judged. lr ×4, past the issue's grid, runs only where lr ×2 is the best
lr so far.

Resumable: a run whose loss.jsonl holds its `done` event is kept under OUT/runs/ and never re-run;
`--deadline-s` starts no run that would not end before it (device calls are 10 minutes).

    windtunnel transfer results/windtunnel/mup_hp-confirm --target h100-0.5b --tokens 30000000 \\
        --horizon-law results/windtunnel/lr_horizon/horizon_law.json --out /tmp/v run_name=v
    python -m windtunnel.bench.validate_target /tmp/v --out results/windtunnel/validate_0.5b --seeds 2 \\
        data.source=/tmp/prose
    python -m windtunnel.bench.validate_target --summarize results/windtunnel/validate_0.5b

The goal: the transferred configuration's mean final validation loss within one seed-sd (pooled
over the configurations with 2+ seeds) of the best configuration's mean.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from windtunnel import data
from windtunnel.config.large_run import load_config, read
from windtunnel.config.overrides import apply
from windtunnel.config.trial import changed_settings, settings
from windtunnel.confirm import t_interval
from windtunnel.files import write_atomically, write_json, write_text
from windtunnel.fits.optimum import LR_HALF_WINDOW

R2 = math.sqrt(2)
MINICPM = {"model.scale_emb": 12.0, "model.scale_depth": 1.4, "model.init_std": 0.1, "optim.lr": 0.01}
# (name, lr factor, init_std factor, absolute values), the most telling first: the first validation put the
# target's optimum at x1.97 its transferred lr, which the depth law and batch scaling now move the transfer to,
# so the neighbours x1/sqrt2 and xsqrt2 decide the verdict. lr x4 is past the grid: planned last, and
# run only where lr x2 is the best lr (`by_what_they_decide` orders the runs left).
CONFIGS = (("transferred", 1, 1, {}), ("lr x1/sqrt2", 1 / R2, 1, {}), ("lr xsqrt2", R2, 1, {}),
           ("lr x1/2", 0.5, 1, {}), ("lr x2", 2, 1, {}), ("init x1/2", 1, 0.5, {}), ("init x2", 1, 2, {}),
           ("minicpm", 1, 1, MINICPM), ("lr x4", 4, 1, {}))
TELLING = 3  # these run with all their seeds first: the verdict needs the seeds, and a GPU session fits ~7 runs
PAST_GRID = "lr x4"


def past_grid_needed(means: dict[str, float]) -> bool:
    """lr x4 only says something where lr x2 is the best lr so far: the optimum may then lie past the grid.
    Elsewhere its runs (~4 GPU-minutes each) are skipped and not counted as planned."""
    lrs = {n: m for n, m in means.items() if n == "transferred" or (n.startswith("lr ") and n != PAST_GRID)}
    return bool(lrs) and min(lrs, key=lrs.get) == "lr x2"


def finished_means(runs_dir: Path, runs: list[tuple]) -> dict[str, float]:
    """Each configuration's mean final loss over its finished runs (of `plan`'s) that did not diverge."""
    by: dict[str, list[float]] = {}
    for rid, name, *_ in runs:
        f = final(runs_dir / f"{rid}.jsonl")
        if f and not f["diverged"]:
            by.setdefault(name, []).append(f["val_loss"])
    return {n: sum(v) / len(v) for n, v in by.items()}


def run_id(name: str, seed: int) -> str:
    return f"{name.replace(' ', '_').replace('/', '-')}_s{seed}"


def plan(base: dict, seeds: int) -> list[tuple[str, str, int, dict]]:
    """(run id, config name, seed, overrides) as planned; `by_what_they_decide` orders what is left."""
    head, tail = CONFIGS[:TELLING], CONFIGS[TELLING:]
    order = [(c, s) for c in head for s in range(seeds)] + [(c, s) for s in range(seeds) for c in tail]
    out = []
    for (name, lr_f, init_f, absolute), seed in order:
        over = {"optim.lr": base["optim"]["lr"] * lr_f, "model.init_std": base["model"]["init_std"] * init_f}
        over.update(absolute)
        over["train.seed"] = seed
        out.append((run_id(name, seed), name, seed, over))
    return out


def by_what_they_decide(todo: list[tuple], means: dict[str, float]) -> list[tuple]:
    """The runs left, those that decide the finding first within each seed round: the best configuration
    so far (the verdict's gap rests on its mean), then the lr runs the optimum's parabola rests on (its
    interval needs their seeds), then the rest, best first. A device session often ends before the plan
    does; ties (no mean yet) keep the plan's order."""
    lrs = sorted((f, n) for n, f, init_f, absolute in CONFIGS if init_f == 1 and not absolute and n in means)
    window: set[str] = set()
    if lrs:
        i = min(range(len(lrs)), key=lambda k: means[lrs[k][1]])
        window = {n for _, n in lrs[max(0, i - LR_HALF_WINDOW):i + LR_HALF_WINDOW + 1]}  # as the fit's parabola
    best = min(means, key=means.get) if means else None

    def key(k_run):
        k, (_, name, seed, _) = k_run
        if name in {c[0] for c in CONFIGS[:TELLING]}:  # the telling ones, all their seeds, as planned
            return (0, 0, 0, 0.0, k)
        rank = 0 if name == best else 1 if name in window else 2
        return (1, seed, rank, means.get(name, math.inf), k)

    return [r for _, r in sorted(enumerate(todo), key=key)]


def final(jsonl: Path) -> dict | None:
    """The run's last val_loss, its wall time and data identity, once its `done` event is in; None before."""
    if not jsonl.exists():
        return None
    recs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    if not any(r.get("event") == "done" for r in recs):
        return None
    vals = [r for r in recs if "val_loss" in r]
    steps = [r for r in recs if "loss" in r and "step" in r]
    tokens = next((r["data"] for r in recs if r.get("event") == "start" and "data" in r), None)  # older runs logged none
    return {"val_loss": vals[-1]["val_loss"] if vals else None, "tokens": vals[-1]["tokens"] if vals else None,
            "seconds": steps[-1].get("seconds") if steps else None, "data": tokens,
            "diverged": not vals or not math.isfinite(vals[-1]["val_loss"])}


def train(transfer_dir: Path, out: Path, seeds: int, extra: list[str], deadline_s: float, est_s: float) -> None:
    base = yaml.safe_load((transfer_dir / "train.yaml").read_text())
    planned = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else None
    if planned is not None:  # a resume trains the rest of the same plan, or its runs would not compare
        keys = ("optim.lr", "model.init_std", "model.d_model", "model.n_layers", "data.val_split", "data.val_fraction")
        # each side as its runs train it: the transfer with the overrides given to every run
        was = settings(load_config(apply(copy.deepcopy(planned["transfer"]), planned.get("extra", [])))[0])
        changed = changed_settings(was, settings(load_config(read(transfer_dir / "train.yaml", extra))[0]), keys)
        if changed:
            key, was, _, now = changed[0].split(" ", 3)
            raise SystemExit(f"validate: {transfer_dir}/train.yaml and the overrides give {key} {now}, but the runs in "
                             f"{out} were planned with {was}: transfer and override as they were (plan.json), "
                             "or give a new --out")
    tokens = data_identity(transfer_dir, out, extra)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    runs, tried = plan(base, seeds), set()
    while True:
        means = finished_means(runs_dir, runs)
        todo = [r for r in runs if r[0] not in tried and not final(runs_dir / f"{r[0]}.jsonl")]
        if not todo:
            break
        rid, name, seed, over = by_what_they_decide(todo, means)[0]
        tried.add(rid)  # a run that fails is not retried in this call
        if name == PAST_GRID and not past_grid_needed(means):
            print(f"validate: {rid} skipped: lr x2 is not the best lr so far, so the optimum is inside the grid",
                  flush=True)
            continue
        left = deadline_s - (time.monotonic() - t0)
        if left < est_s:
            print(f"validate: {rid} not started: {left:.0f} s left, a run takes ~{est_s:.0f} s", flush=True)
            break
        run_dir = transfer_dir / "runs" / rid
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over: it saves no checkpoints
        args = [f"{k}={v}" for k, v in over.items()] + [
            f"large_run.run_name={rid}", f"large_run.run_dir=runs/{rid}", "train.checkpoint_every=0",
            "train.save_at=[]", f"train.checkpoint_dir=runs/{rid}/checkpoints"] + extra
        print(f"validate: {rid}: {' '.join(args)}", flush=True)
        started = time.monotonic()
        with open(out / f"{rid}.log", "w") as log:
            rc = subprocess.call(["bash", str(transfer_dir / "launch.sh"), *args], cwd=transfer_dir,
                                 stdout=log, stderr=subprocess.STDOUT)
        jsonl = run_dir / "loss.jsonl"
        if jsonl.exists():
            shutil.copyfile(jsonl, runs_dir / f"{rid}.jsonl.tmp")
            os.replace(runs_dir / f"{rid}.jsonl.tmp", runs_dir / f"{rid}.jsonl")
        est_s = max(est_s, time.monotonic() - started)
        done = {k: v for k, v in (final(runs_dir / f"{rid}.jsonl") or {}).items() if k != "data"}
        print(f"validate: {rid} exit {rc} in {time.monotonic() - started:.0f} s: {done or None}",
              flush=True)
    write_json(out / "plan.json", {"transfer": yaml.safe_load((transfer_dir / "train.yaml").read_text()),
                                   "extra": extra, "seeds": seeds, "data": tokens})


def data_identity(transfer_dir: Path, out: Path, extra: list[str]) -> dict:
    """The identity of the tokens the runs will train on (windtunnel.data.identity), refused when the
    runs already in OUT trained on others: a fresh machine prepares its data.source again, maybe
    from other text. OUT/data_manifest.json keeps the first runs' manifest (plans before it was
    recorded in plan.json hold none)."""
    cfg, _ = load_config(read(transfer_dir / "train.yaml", extra))
    manifest = {k: v for k, v in data.load(cfg.data).manifest.items() if k != "corpus"}
    now = data.identity(manifest)
    kept = out / "data_manifest.json"
    changed = data.identity_changes(planned_data(out), now)
    if changed:
        raise SystemExit(f"validate: {cfg.data.source} holds other tokens than the runs in {out} trained on "
                         f"({'; '.join(changed)}): prepare theirs again ({kept}), or give a new --out")
    if not kept.exists():
        write_json(kept, manifest)
    return now


def planned_data(out: Path) -> dict:
    """The data identity OUT's runs trained on: plan.json's, else (plans from before it held one)
    that of the first runs' data_manifest.json; {} for a new OUT."""
    plan_file, kept = out / "plan.json", out / "data_manifest.json"
    planned = json.loads(plan_file.read_text()).get("data") if plan_file.exists() else None
    if planned is None and kept.exists():
        planned = data.identity(json.loads(kept.read_text()))
    return planned or {}


def summarize(out: Path) -> dict:
    """validate.json, validate.csv and report.md from OUT/runs/; the goal judged only where seeds allow."""
    cfg = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else {}
    rows, by = [], {}
    base, planned = cfg.get("transfer"), planned_data(out)
    for rid, name, seed, over in plan(base, cfg.get("seeds", 2)) if base else []:
        f = final(out / "runs" / f"{rid}.jsonl")
        changed = data.identity_changes(planned, f.pop("data", None) or {}) if f else []
        if changed:  # a run copied in from another plan's data would be compared as if on the same
            raise SystemExit(f"validate: {rid} trained on other tokens than {out}'s plan ({'; '.join(changed)})")
        if f:
            rows.append({"run": rid, "config": name, "seed": seed, "lr": over["optim.lr"],
                         "init_std": over["model.init_std"], **f})
            if not f["diverged"]:
                by.setdefault(name, []).append(f["val_loss"])
    means = {n: sum(v) / len(v) for n, v in by.items()}
    configs = [n for n, *_ in CONFIGS if n != PAST_GRID or n in by or past_grid_needed(means)]
    table = []
    for name in configs:
        v = by.get(name, [])
        mean, sd, lo, hi = t_interval(v) if v else (math.nan,) * 4
        table.append({"config": name, "n": len(v), "mean": mean, "sd": sd, "low": lo, "high": hi})
    pooled = [x for t in table if t["n"] >= 2 for x in [t["sd"] ** 2]]
    seed_sd = math.sqrt(sum(pooled) / len(pooled)) if pooled else math.nan
    done = [t for t in table if t["n"]]
    best = min(done, key=lambda t: t["mean"]) if done else None
    mine = next((t for t in table if t["config"] == "transferred" and t["n"]), None)
    gap = mine["mean"] - best["mean"] if best and mine else math.nan
    # a configuration near the edge of stability is far noisier than the rest and lifts the pooled
    # sd; the sd of the two configurations compared says how many of their own seed-sds the gap is
    pair = [t["sd"] ** 2 for t in ([mine] if best is mine else [mine, best]) if t and t["n"] >= 2]
    pair_sd = math.sqrt(sum(pair) / len(pair)) if pair else math.nan
    n_planned = len(configs) * cfg.get("seeds", 2)
    if not (best and mine) or math.isnan(seed_sd) or len(rows) < n_planned:
        verdict = (f"not judged: {len(rows)} of {n_planned} runs done"
                   + ("" if pooled else ", no configuration has 2 seeds yet (no seed-sd)"))
        verdict += _what_would_turn_it(table, mine, seed_sd, cfg.get("seeds", 2))
    else:
        verdict = "MET" if gap <= seed_sd else "MISSED"
    lr_opt = lr_optimum(rows, base["optim"]["lr"]) if base else None
    summary = {"runs_done": len(rows), "runs_planned": n_planned, "seed_sd": seed_sd, "pair_seed_sd": pair_sd,
               "best": best and best["config"],
               "transferred_minus_best": gap, "goal": "transferred mean within one seed-sd of the best mean",
               "verdict": verdict, "lr_optimum": lr_opt, "table": table, "runs": rows}
    write_json(out / "validate.json", _json_safe(summary))
    lines = ["| config | seeds | mean val loss | sd | 95% interval |", "|---|---|---|---|---|"]
    for t in table:
        if t["n"]:
            iv = f"[{t['low']:.4f}, {t['high']:.4f}]" if t["n"] > 1 else "—"
            sd = f"{t['sd']:.4f}" if t["n"] > 1 else "—"
            lines.append(f"| {t['config']} | {t['n']} | {t['mean']:.4f} | {sd} | {iv} |")
    head = (f"# Validation at the target's scale\n\n{len(rows)} of {n_planned} runs done. Best so far: "
            f"{best and best['config']}; transferred − best = {gap:.4f} nats; pooled seed-sd {seed_sd:.4f}"
            + (f" (over the transferred and the best alone {pair_sd:.4f}: the gap is {gap / pair_sd:.1f} of those)"
               if gap > 0 and pair_sd > 0 else "")
            + f". Goal ({summary['goal']}): **{verdict}**.\n\n")
    if lr_opt and lr_opt["at_edge"]:  # the best lr run is the largest (smallest) tried: no vertex, no interval
        side = "≥" if lr_opt["factor"] > 1 else "≤"
        head += (f"The target's optimal lr is {side} {lr_opt['lr_opt']:.3g}, **{side} ×{lr_opt['factor']:.2f}** the "
                 "transferred: the best lr run so far is on the edge of those run, so this is a bound.\n\n")
    elif lr_opt:
        iv = (f" [{lr_opt['factor_ci'][0]:.2f}, {lr_opt['factor_ci'][1]:.2f}]" if lr_opt["factor_ci"]
              else " (an lr its parabola rests on has one seed so far: no interval yet)" if lr_opt["thin"]
              else " (one seed an lr: no interval)")
        head += (f"The target's optimal lr, a parabola over the lr runs' mean losses (as `fit lr-transfer`): "
                 f"{lr_opt['lr_opt']:.3g}, **×{lr_opt['factor']:.2f}**{iv} the transferred.\n\n")
    write_text(out / "report.md", head + "\n".join(lines) + "\n")
    import pandas as pd
    write_atomically(out / "validate.csv", lambda p: pd.DataFrame(rows).to_csv(p, index=False))
    if rows:
        plot(out, rows, cfg["transfer"]["optim"]["lr"])
    return summary


def _what_would_turn_it(table: list[dict], mine: dict | None, seed_sd: float, seeds: int) -> str:
    """While runs are missing but the transferred configuration has all its seeds, its gap to the best
    configuration that has all of its seeds can only widen (the final best is no higher); the verdict then
    turns only if the configurations still short of seeds bring the pooled sd up to that gap. Say how
    large their sd would be."""
    full = [t for t in table if t["n"] >= seeds]
    if math.isnan(seed_sd) or not mine or mine["n"] < seeds or not full:
        return ""
    bound = mine["mean"] - min(t["mean"] for t in full)
    short = len(table) - len(full)
    if bound <= seed_sd or not short:
        return ""
    sds = [t["sd"] ** 2 for t in full]
    need = math.sqrt(max(bound ** 2 * len(table) - sum(sds), 0) / short)
    return (f"; MISSED unless the {short} configurations still short of seeds have a seed-sd of {need:.3f} nats "
            f"(rms) or more, where the largest so far is {math.sqrt(max(sds)):.3f}")


def lr_optimum(rows: list[dict], lr0: float) -> dict | None:
    """The target's optimal lr from the runs that change only the lr (the transferred and lr ×f ones):
    the parabola and the bootstrap over seeds of `fit lr-transfer`, as a factor of the transferred lr.
    A diverged run is left out (a loss of +inf has no parabola)."""
    import pandas as pd

    from windtunnel import fits

    runs = [r for r in rows if (r["config"] == "transferred" or r["config"].startswith("lr ")) and not r["diverged"]]
    if len({r["lr"] for r in runs}) < 3:
        return None
    df = pd.DataFrame({"parametrization": "mup", "width": 1.0, "lr": [r["lr"] for r in runs],
                       "loss": [r["val_loss"] for r in runs], "seed": [r["seed"] for r in runs]})
    o = fits.fit_lr_transfer(df).optima[0]
    ci = [v / lr0 for v in o.lr_opt_ci] if o.lr_opt_ci else None
    return {"lr_opt": o.lr_opt, "factor": o.lr_opt / lr0, "factor_ci": ci, "at_edge": o.at_edge, "thin": o.thin,
            "runs": len(runs)}


def plot(out: Path, rows: list[dict], lr0: float) -> Path:
    """validate.png: each run's validation curve (left); final loss against the lr, the transferred
    lr marked (right): where the curve's bottom sits against the transferred lr is the finding."""
    from windtunnel.plots_fits import pyplot, save_figure

    plt = pyplot()
    fig, (ax_c, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    names = [name for name, *_ in CONFIGS]
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    for r in rows:
        recs = [json.loads(x) for x in (out / "runs" / f"{r['run']}.jsonl").read_text().splitlines() if '"val_loss"' in x]
        ax_c.plot([x["tokens"] / 1e6 for x in recs], [x["val_loss"] for x in recs], color=colors[r["config"]],
                  ls="-" if r["seed"] == 0 else "--", label=r["config"] if r["seed"] == 0 else None)
        if not r["diverged"]:
            ax_l.scatter(r["lr"], r["val_loss"], color=colors[r["config"]], marker="o" if r["seed"] == 0 else "x")
            ax_l.annotate(r["config"], (r["lr"], r["val_loss"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax_c.set(xlabel="tokens (M)", ylabel="validation loss", title="runs (seed 0 solid, seed 1 dashed)")
    ax_c.legend(fontsize=7)
    ax_l.axvline(lr0, color="gray", ls=":", label="transferred lr")
    ax_l.set(xscale="log", xlabel="lr (base)", ylabel="final validation loss", title="final loss against the lr")
    ax_l.legend(fontsize=7)
    return save_figure(fig, out / "validate.png")


def _json_safe(x):
    """NaN (no seed-sd, no run yet) as null: JSON has no NaN."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("transfer_dir", nargs="?", help="a folder `windtunnel transfer` wrote (train.yaml, launch.sh)")
    p.add_argument("extra", nargs="*", help="KEY=VALUE overrides for every run (e.g. data.source=...)")
    p.add_argument("--out", help="results folder (runs/, logs, validate.json, report.md)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--deadline-s", type=float, default=math.inf, help="start no run that would end after this")
    p.add_argument("--est-s", type=float, default=300.0, help="one run's wall time until one is measured")
    p.add_argument("--summarize", metavar="OUT", help="only write the summary of OUT's finished runs")
    a = p.parse_intermixed_args(argv)
    if a.summarize:
        print(json.dumps({k: v for k, v in summarize(Path(a.summarize)).items() if k != "runs"}, indent=1))
        return 0
    if not a.transfer_dir or not a.out:
        print("validate: error: give TRANSFER_DIR and --out (or --summarize OUT)", file=sys.stderr)
        return 2
    if a.seeds < 1:
        print(f"validate: error: --seeds {a.seeds}: must be at least 1", file=sys.stderr)
        return 2
    train(Path(a.transfer_dir).resolve(), Path(a.out).resolve(), a.seeds, a.extra, a.deadline_s, a.est_s)
    print(json.dumps({k: v for k, v in summarize(Path(a.out).resolve()).items() if k not in ("runs", "table")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
