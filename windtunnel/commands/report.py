"""`windtunnel report RESULTS_DIR/SWEEP`: regenerate a sweep's tables, plots and report."""
from __future__ import annotations

import shlex
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("sweep_dir", help="a sweep's results folder, e.g. results/quickstart")
    p.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                   help="also log the study's trials to MLflow (default: the sweep's local store), e.g. for "
                        "a sweep that ran with tracking.enabled=false; trials already there are not logged again")


def run(args) -> int:
    from windtunnel import locks
    from windtunnel.results import open_sweep_study, write_report
    from windtunnel.config.sweep import check_tracking_uri

    from windtunnel import credentials

    check_tracking_uri(args.mlflow, "--mlflow")  # a bare word was a folder MLflow refused, record by record
    args.mlflow = credentials.take(args.mlflow)
    d = Path(args.sweep_dir)
    study = open_sweep_study(d)
    if "request" in study.user_attrs:  # a `windtunnel confirm` folder: its own tables and report
        from windtunnel.confirm import write_outputs

        files = write_outputs(study, d)
    else:
        try:  # a driver running this sweep: its RUNNING trials run (else they stopped with their driver)
            locks.probe(d / "driver.lock")
            driving = False
        except locks.Held:
            driving = True
        files = write_report(study, d, driver_running=driving)
    for f in files:
        print(shlex.quote(str(f)))
    if args.mlflow is not None:
        from windtunnel.results import counts_as_finished
        from windtunnel.tracking.store import resolve_uri
        from windtunnel.tracking.sweep import replay_to_mlflow

        new, ok = replay_to_mlflow(study, d, args.mlflow)
        uri = resolve_uri(d / "tracking", args.mlflow)
        if not new:  # run again, or before any trial finished: each trial is in MLflow once
            n = sum(counts_as_finished(t) for t in study.get_trials(deepcopy=False))
            held = f"all {n} finished trials of {study.study_name} are already in MLflow at {uri}" if n \
                else f"{study.study_name} has no finished trials"
            print(f"report: {held}{'' if ok else ' (some wait in the outbox: windtunnel sync)'}; nothing to replay")
        else:
            print(f"MLflow: delivered {new} trials to {uri}" if ok
                  else "MLflow: some records wait in the outbox (windtunnel sync)")
    return 0
