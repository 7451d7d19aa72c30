"""results/windtunnel/summary.json from the committed artifacts of the GPU wind tunnel (each
made by a command in results/windtunnel/calls.json):

    python -m windtunnel.bench.showcase [--dir results/windtunnel]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna

from windtunnel.files import write_atomically, write_json
from windtunnel.fits import fit_batch_size, fit_lr_transfer, sweep_frame
from windtunnel.search import open_storage


def _study(d: Path) -> optuna.Study:
    return optuna.load_study(study_name=d.name, storage=open_storage(str(d / "study.journal")))


def search_run(d: Path) -> dict:
    """How one search ran: trials, GPU-minutes, the shares of them spent waiting on the driver and training."""
    study = _study(d)
    runs = study.user_attrs["invocations"]
    wall = sum(i["wall_s"] * i["slots"] for i in runs)

    def share(key: str) -> float:  # a per-invocation fraction, weighted by slot time, in %
        return round(100 * sum(i[key] * i["wall_s"] * i["slots"] for i in runs) / wall, 3)
    out = {"sampler": runs[-1]["sampler"], "n_trials": sum(i["trials"] for i in runs),
           "gpu_minutes": round(wall / 60, 2), "driver_wait_pct": share("driver_wait_frac"),
           "device": study.trials[0].user_attrs["result"]["provenance"]["device"]}
    if all("train_frac" in i for i in runs):  # recorded since 2026-12-01
        out["train_pct"] = share("train_frac")
    if all("ask_frac" in i for i in runs):  # the driver's time asking the sampler, since session 6
        out["driver_asking_pct"] = round(100 * sum(i["ask_frac"] * i["wall_s"] for i in runs) / sum(i["wall_s"] for i in runs), 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="results/windtunnel")
    root = Path(p.parse_args(argv).dir)
    # the frames `windtunnel fit KIND --input <sweep folder>` reads, kept beside each sweep
    lr = sweep_frame(root / "lr_width", "lr-transfer")
    write_atomically(root / "lr_width" / "lr_width.csv", lambda p: lr.to_csv(p, index=False))
    drift = fit_lr_transfer(lr).drift_steps
    bs_df = sweep_frame(root / "batch_size", "batch-size")
    write_atomically(root / "batch_size" / "batch_size.csv", lambda p: bs_df.to_csv(p, index=False))
    bs = fit_batch_size(bs_df)
    hp = _study(root / "mup_hp")
    done = [t for t in hp.get_trials(deepcopy=False) if t.state.is_finished() and not t.user_attrs.get("retried")]
    hours = sum(i["wall_s"] * i["slots"] for i in hp.user_attrs["invocations"]) / 3600
    transfer = json.loads((root / "transfer" / "transfer_check.json").read_text())
    calls = json.loads((root / "calls.json").read_text())
    device = hp.trials[0].user_attrs["result"]["provenance"]["device"]
    summary = {"mup_lr_drift_steps": drift["mup"], "sp_lr_drift_steps": drift["sp"], "n_trials": len(done),
               "trials_per_gpu_hour": len(done) / hours, "transfer_gap_pct": transfer["transfer_gap_pct"],
               "bs_law": {"a": bs.a, "b": bs.b}, "device": device,
               "gpu_minutes": sum(c["showcase_s"] for c in calls) / 60,
               "best": {**hp.best_trial.params, "value": hp.best_value},
               # each full 400-trial search of mup_hp, by sampler (issue 6: < 15 GPU-min, wait < 5%)
               "searches": {name: search_run(root / name) for name in ("mup_hp", "mup_hp_tpe400", "mup_hp_gp400")}}
    write_json(root / "summary.json", summary)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
