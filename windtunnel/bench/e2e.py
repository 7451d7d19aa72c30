"""End to end: finished trials, best loss and trials per GPU-hour of one search, windtunnel against
what a user would run without it, each for the same number of trials on one GPU.

    python -m windtunnel.bench.e2e --trials 64 --procs 4 --data .cache/stdlib-bpe16k --out results/bench \\
        [--sweep mup_hp] [KEY=VALUE ...]

- `windtunnel`: `windtunnel sweep SWEEP n_trials=N` with the local executor (the population
  trainer, its pruner, its driver).
- `optuna-tpe`: an Optuna TPE loop with the sweep's own space and sampler settings, P processes
  sharing the GPU, each training one compiled trial at a time of the nanoGPT-style model
  (windtunnel/bench/nanogpt.py, with MiniCPM's μP knobs; transformers' Llama has none to search),
  asking and telling through one Optuna journal file: the Ray Tune pattern (fractional GPUs, an
  actor reused trial after trial) without Ray. Like Tune's OptunaSearch it prunes nothing, and
  it evaluates once, at the end of each trial, on the same validation windows.
- `windtunnel-time` (after optuna-tpe in --sides): `windtunnel sweep` given the Optuna loop's wall
  time instead of a trial count, then stopped: which side finds the better loss at equal cost.

KEY=VALUE overrides go to both sides (for instance train.tokens=2000000). A side's GPU-minutes is
its wall time from launch to its last process's exit, start-up and compilation included.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from windtunnel.bench import write_results
from windtunnel.config.trial import with_overrides

STUDY = "peer"
SIDES = ("windtunnel", "optuna-tpe", "windtunnel-time")
# windtunnel-time asks this many times --trials and stops at the Optuna loop's wall time
TIME_SIDE_TRIALS = 8


def _peer_storage(journal: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(journal)))


def worker(index: int, journal: Path, n_trials: int, compile: bool, sweep: str, overrides: list[str]) -> int:
    """One process of the Optuna loop: ask, train, tell, until the study holds n_trials."""
    from windtunnel.bench.peers import Trial
    from windtunnel.config.hydra import load_sweep
    from windtunnel.config.sweep import trial_seeds
    from windtunnel.search import distributions, fixed_params, make_sampler

    cfg = load_sweep(sweep, overrides)
    dists, fixed = distributions(cfg), fixed_params(cfg)
    # a seed per process: processes sharing one seed would draw the same random start-up points
    study = optuna.load_study(study_name=STUDY, storage=_peer_storage(journal),
                              sampler=make_sampler(cfg.sampler, cfg, seed=cfg.sampler.seed + index))
    runner = None
    while len(study.get_trials(deepcopy=False)) < n_trials:
        trial = study.ask(dists)
        if trial.number >= n_trials:  # another process asked the last one first
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            break
        init, data = trial_seeds(cfg.trial.train.seed, trial.number)  # the seeds the sweep's trial would get
        tcfg = with_overrides(cfg.trial, {"train.seed": init, "train.data_seed": data, **trial.params, **fixed})
        if runner is None:
            runner = Trial("nanogpt", tcfg)
            if compile:
                runner.compile()
        else:
            runner.start(tcfg)
        loss = runner.train()
        if math.isfinite(loss):
            study.tell(trial, loss)
        else:
            study.tell(trial, state=TrialState.FAIL)
    return 0


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM each process this script started, then SIGKILL what is left after grace seconds."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _run(procs: list[subprocess.Popen], timeout: float) -> bool:
    """Wait for them all; True if they ended by themselves within timeout seconds."""
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _stop(procs, grace=30)
            return False
    return True


def summary(side: str, how: str, trials: list, n_trials: int, seconds: float, launched: float, whole: bool) -> dict:
    """One table row from a side's finished study (surplus asks left out)."""
    trials = [t for t in trials if t.number < n_trials]
    count = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    ends = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete]
    finished = count[TrialState.COMPLETE] + count[TrialState.PRUNED]
    return {"side": side, "how": how, "asked": n_trials, "complete": count[TrialState.COMPLETE],
            "pruned": count[TrialState.PRUNED], "failed": count[TrialState.FAIL],
            "best_loss": min(values) if values else None, "gpu_minutes": seconds / 60,
            "trials_per_gpu_hour": finished / (seconds / 3600) if seconds > 0 else None,
            "first_result_s": min(ends) - launched if ends else None,
            "note": "" if whole else f"stopped at the {seconds:.0f} s limit"}


def run_peer(args, overrides: list[str], where: Path) -> dict:
    from windtunnel.config.hydra import load_sweep

    shutil.rmtree(where, ignore_errors=True)  # this script's own folder: a fresh study each run
    where.mkdir(parents=True)
    journal = where / "study.journal"
    optuna.create_study(study_name=STUDY, storage=_peer_storage(journal), direction="minimize")
    load_sweep(args.sweep, overrides)  # a bad override: one line here, not one per process
    launched = time.time()
    procs = [subprocess.Popen([sys.executable, "-P", "-m", "windtunnel.bench.e2e", "--worker", str(i),
                               "--journal", str(journal), "--trials", str(args.trials), "--sweep", args.sweep,
                               *(["--no-compile"] if args.no_compile else []), *overrides])
             for i in range(args.procs)]
    whole = _run(procs, args.timeout)
    seconds = time.time() - launched
    trials = optuna.load_study(study_name=STUDY, storage=_peer_storage(journal)).get_trials(deepcopy=False)
    how = f"{args.procs} processes, nanoGPT-style{'' if args.no_compile else ' compiled'}, TPE, no pruner"
    return summary("optuna-tpe", how, trials, args.trials, seconds, launched, whole)


def run_windtunnel(args, overrides: list[str], where: Path, budget_s: float | None = None) -> dict:
    """`windtunnel sweep` for args.trials trials; with budget_s (windtunnel-time), as many as finish
    in that many seconds, stopped then: a bundle still training counts for nothing."""
    from windtunnel.search import open_storage

    shutil.rmtree(where, ignore_errors=True)
    name = "e2e"
    n_trials = args.trials if budget_s is None else TIME_SIDE_TRIALS * args.trials
    launched = time.time()
    proc = subprocess.Popen([sys.executable, "-P", "-m", "windtunnel.cli", "sweep", args.sweep, "-q",
                             f"n_trials={n_trials}", f"results_dir={where}", f"name={name}",
                             "tracking.enabled=false", *overrides])
    whole = _run([proc], args.timeout if budget_s is None else budget_s) and proc.returncode == 0
    seconds = time.time() - launched
    journal = where / name / "study.journal"
    trials = optuna.load_study(study_name=name, storage=open_storage(str(journal))).get_trials(deepcopy=False) \
        if journal.exists() else []
    bundles: dict[str, int] = {}  # trials per bundle: the population size the sweep chose
    for t in trials:
        if "bundle" in t.user_attrs:
            bundles[t.user_attrs["bundle"]] = bundles.get(t.user_attrs["bundle"], 0) + 1
    how = f"`windtunnel sweep {args.sweep}`, local executor, population trainer (K ≤ {max(bundles.values(), default=0)})"
    row = summary("windtunnel" if budget_s is None else "windtunnel-time", how, trials, n_trials, seconds, launched, whole)
    if budget_s is not None:
        row["note"], row["asked"] = f"given the Optuna loop's {budget_s:.0f} s, then stopped", None
    elif not whole and proc.returncode not in (0, None, -signal.SIGTERM):
        row["note"] = f"the sweep exited {proc.returncode}"
    return row


def table(rows: list[dict]) -> str:
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    lines = ["| side | how | trials | complete | pruned | failed | best val loss | GPU-minutes | trials per GPU-hour "
             "| first result after (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        how = r["how"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"| {r['side']} | {how} | {fmt(r['asked'], 'd')} | {r['complete']} | {r['pruned']} | {r['failed']} | "
                     f"{fmt(r['best_loss'], '.4f')} | {fmt(r['gpu_minutes'], '.2f')} | "
                     f"{fmt(r['trials_per_gpu_hour'], ',.0f')} | {fmt(r['first_result_s'], '.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings for both sides' trials and search")
    p.add_argument("--trials", type=int, default=64, help="N: trials each side runs")
    p.add_argument("--procs", type=int, default=4, help="the Optuna loop's processes sharing the GPU")
    p.add_argument("--sweep", default="mup_hp", help="the sweep file whose space both sides search")
    p.add_argument("--data", help="data.source for both sides (prepared shards)")
    p.add_argument("--sides", default="windtunnel,optuna-tpe",
                   help="comma list of windtunnel, optuna-tpe, windtunnel-time (the sweep given the Optuna loop's "
                        "wall time: which finds the better loss at equal cost; after optuna-tpe)")
    p.add_argument("--timeout", type=float, default=600, help="seconds each side may run; what finished is reported")
    p.add_argument("--no-compile", action="store_true", help="the Optuna loop's trials eager (a CPU check)")
    p.add_argument("--out", help="folder for e2e.json, e2e.md and each side's study")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--journal", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides: {bad[0]!r} is not KEY=VALUE")
    if args.trials < 1 or args.procs < 1:
        p.error("--trials and --procs: must be >= 1")
    sides = [s for s in args.sides.split(",") if s]
    if not sides or set(sides) - set(SIDES):
        p.error(f"--sides: {args.sides!r}; allowed: a comma list of {', '.join(SIDES)}")
    if "windtunnel-time" in sides and "optuna-tpe" not in sides[:sides.index("windtunnel-time")]:
        p.error("--sides: windtunnel-time takes the Optuna loop's wall time, so optuna-tpe must come before it")
    overrides = [*([f"data.source={args.data}"] if args.data else []), *args.overrides]
    if args.worker is not None:
        return worker(args.worker, Path(args.journal), args.trials, not args.no_compile, args.sweep, overrides)
    out = Path(args.out or "e2e-out")
    rows = []
    for side in sides:
        where = out / "e2e-runs" / side
        if side == "optuna-tpe":
            rows.append(run_peer(args, overrides, where))
        else:  # windtunnel-time: the Optuna loop's GPU time, the same search at equal cost
            peer = next((r for r in rows if r["side"] == "optuna-tpe"), None)
            rows.append(run_windtunnel(args, overrides, where, peer["gpu_minutes"] * 60 if side != "windtunnel" else None))
        print(json.dumps(rows[-1]), flush=True)
        write_results(out, "e2e", rows, "# One search end to end: windtunnel against an Optuna loop (one GPU)\n\n"
                      f"Command: `python -m windtunnel.bench.e2e {' '.join(argv if argv is not None else sys.argv[1:])}`"
                      "\n\n" + table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
