"""The sweep driver's own cost per trial (ask + tell + tracking) with 1,000 finished trials
already in the study, for each sampler and storage. No training runs: this is the time a
GPU would wait on the driver between bundles.

    python -m windtunnel.bench.driver [--trials 1000] [--measure 30] [--bundle 52] [--out results/bench]

Then the driver's real pattern: a whole bundle asked at once, its trials pending (no tell between
the asks), with 400 and --trials finished trials in the study.

The design anchors (measured before windtunnel existed): Optuna alone cost 43 ms per ask+tell
with SQLite and 9 ms in memory, with 4 float parameters; the search space here is the same four
(mup_hp's μP knobs).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import optuna

from windtunnel.bench import write_results
from windtunnel.config.hydra import load_sweep
from windtunnel.search import distributions
from windtunnel.sweep import Driver

# MiniCPM's four μP knobs: the design anchors' Optuna measurement had 4 float parameters
SPACE = ["optim.lr", "model.init_std", "model.scale_emb", "model.scale_depth"]


def _prefill(driver: Driver, n: int, seed: int = 0) -> None:
    """n finished trials, written through the storage like real ones (not timed)."""
    import random

    rng = random.Random(seed)
    dists = distributions(driver.cfg)
    trials = []
    for _ in range(n):
        params = {k: (d.low * (d.high / d.low) ** rng.random() if d.log else rng.uniform(d.low, d.high))
                  for k, d in dists.items()}
        trials.append(optuna.trial.create_trial(params=params, distributions=dists, value=2 + rng.random(),
                                                user_attrs={"result": {"status": "ok", "tokens": 1}}))
    driver.study.add_trials(trials)


def measure(sampler: str, storage: str, prefill: int, n: int, tracking: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        st = {"journal": "", "sqlite": f"sqlite:///{tmp}/study.db"}[storage]
        overrides = [f"results_dir={tmp}", f"sampler.type={sampler}", "sampler.n_startup_trials=10",
                     f"tracking.enabled={str(tracking).lower()}", "population.size=1"]
        if st:
            overrides.append(f"storage={st}")
        cfg = load_sweep("mup_hp", overrides)
        cfg.search = {k: cfg.search[k] for k in SPACE}
        driver = Driver(cfg, progress=False)
        _prefill(driver, prefill)
        result = {"status": "ok", "tokens": 4_000_000, "seconds": 60.0, "tokens_per_s": 66_666.0,
                  "curve": [{"step": s, "tokens": s * 8192, "lr": 0.01, "train_loss": 3.0, "val_loss": 3.1}
                            for s in range(1, 11)]}
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            driver.ask_bundles(1)
            b = driver.ready.pop()
            for t in b.trials:
                driver._tell(t, "ok", 3.0, result)
            times.append(time.perf_counter() - t0)
        delivered = driver.tracking.close(timeout=300) is None if driver.tracking else True
    return {"sampler": sampler, "storage": storage, "tracking": tracking, "trials_in_study": prefill,
            "ms_per_trial": 1000 * statistics.median(times), "ms_p90": 1000 * sorted(times)[int(0.9 * len(times))],
            "tracking_delivered": delivered, "device": f"cpu ({platform.processor() or platform.machine()})"}


def measure_bundle(sampler: str, prefill: int, k: int) -> dict:
    """One bundle of k trials asked at once, as the driver asks ahead: no tell between the asks,
    so the k trials are pending while the sampler proposes the next (GP conditions on them)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_sweep("mup_hp", [f"results_dir={tmp}", f"sampler.type={sampler}", "tracking.enabled=false",
                                    f"population.size={k}"])
        driver = Driver(cfg, progress=False)
        _prefill(driver, prefill)
        t0 = time.perf_counter()
        driver.ask_bundles(k)
        seconds = time.perf_counter() - t0
    return {"sampler": sampler, "storage": "journal", "tracking": False, "trials_in_study": prefill, "bundle": k,
            "s_per_bundle": seconds, "ms_per_trial": 1000 * seconds / k,
            "device": f"cpu ({platform.processor() or platform.machine()})"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=1000, help="finished trials in the study before timing")
    p.add_argument("--measure", type=int, default=30, help="trials timed per row (GP: at most 5)")
    p.add_argument("--bundle", type=int, default=52, help="trials per bundle for the bundle rows (mup_hp's auto K on an H100)")
    p.add_argument("--out", help="folder for driver.json and driver.md")
    args = p.parse_args(argv)
    rows = []
    for sampler in ("tpe", "gp"):
        for storage in ("journal", "sqlite"):
            n = args.measure if sampler == "tpe" else min(5, args.measure)
            rows.append(measure(sampler, storage, args.trials, n, tracking=True))
            print(json.dumps(rows[-1]), flush=True)
    rows.append(measure("tpe", "journal", args.trials, args.measure, tracking=False))
    bundles = []
    for sampler in ("tpe", "gp"):
        for prefill in sorted({400, args.trials}):
            bundles.append(measure_bundle(sampler, prefill, args.bundle))
            print(json.dumps(bundles[-1]), flush=True)
    header = "| sampler | storage | tracking | trials in study | ms per trial (median) | p90 |\n|---|---|---|---|---|---|"
    lines = [header] + [f"| {r['sampler']} | {r['storage']}{' (default)' if r['storage'] == 'journal' else ''} | "
                        f"{'MLflow' if r['tracking'] else 'off'} | {r['trials_in_study']} | {r['ms_per_trial']:.1f} | "
                        f"{r['ms_p90']:.1f} |" for r in rows]
    lines += ["", f"A bundle of {args.bundle} trials asked at once (all of mup_hp's five knobs, no tracking):", "",
              "| sampler | trials in study | seconds per bundle | ms per trial |", "|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['trials_in_study']} | {r['s_per_bundle']:.1f} | {r['ms_per_trial']:.0f} |"
              for r in bundles]
    rows += bundles
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_results(args.out, "driver", rows,
            "# Driver overhead per trial (ask + tell + tracking)\n\n"
            f"Command: `python -m windtunnel.bench.driver --trials {args.trials} --measure {args.measure} --bundle {args.bundle} --out {args.out}`\n"
            f"Machine: {rows[0]['device']}, 2 cores.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
