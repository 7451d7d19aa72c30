"""`windtunnel report RESULTS_DIR/SWEEP`: regenerate a sweep's tables, plots and report."""
from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("sweep_dir", help="a sweep's results folder, e.g. results/quickstart")


def run(args) -> int:
    import optuna

    from windtunnel.errors import ConfigError
    from windtunnel.results import write_report
    from windtunnel.search import open_storage

    d = Path(args.sweep_dir)
    journal = d / "study.journal"
    if not journal.exists():
        raise ConfigError(f"{d}: holds no study.journal (allowed: a folder `windtunnel sweep` wrote)")
    storage = open_storage(str(journal))
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    study = optuna.load_study(study_name=names[0], storage=storage)
    for f in write_report(study, d):
        print(f)
    return 0
