"""`windtunnel sweep SWEEP [KEY=VALUE ...]`: run (or resume) a sweep."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("sweep", help="a name in sweeps/ (quickstart, mup_hp, lr_width, lr_depth, lr_horizon, batch_size, wsd_branches) "
                                 "or a path to a sweep YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides: n_trials=50 executor.workers=2 model.d_model=128 results_dir=/tmp/r "
                        "executor=ray executor.address=auto tracking.uri=http://127.0.0.1:5000")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from windtunnel.config.hydra import load_sweep

    cfg = load_sweep(args.sweep, args.overrides)  # every error is raised before anything is written
    from windtunnel.config.sweep import doubtful
    from windtunnel.symmetry import ridge_warning

    ridge = ridge_warning(cfg.search, cfg.model.parametrization)
    for warning in [*doubtful(cfg), *([ridge] if ridge else [])]:
        print(f"windtunnel sweep: warning: {warning}", file=sys.stderr, flush=True)
    from windtunnel.sweep import run_sweep

    return summary(cfg, run_sweep(cfg, progress=not args.quiet))


def summary(cfg, out: dict) -> int:
    """What a sweep says when it ends, every path shell-quoted as printed (results_dir may hold
    spaces or quotes), and its exit status."""
    d = Path(out["dir"])
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    ran = out["ok"] + out["pruned"] + out["failed"]
    if not ran and out["finished"] >= cfg.n_trials:
        print(f"{cfg.name}: already complete: {out['finished']} trials; raise n_trials (now {cfg.n_trials}) to add "
              f"more, e.g. n_trials={out['finished'] + cfg.n_trials}")
    else:
        print(f"{cfg.name}: {out['finished']} trials finished ({out['ok']} ok, {out['pruned']} pruned, "
              f"{out['failed']} failed this run)")
    print(f"  table:   {q(d / 'trials.csv')}")
    print(f"  report:  {q(d / 'report.md')}   (plots: {q(d)}/*.png)")
    if Path(d, "best.yaml").exists():  # written only once a trial completed
        print(f"  best:    {q(d / 'best.yaml')}   (windtunnel trial --config {q(d / 'best.yaml')})")
    if cfg.tracking.enabled:
        print(f"  MLflow:  {cfg.tracking.uri or 'windtunnel ui ' + q(cfg.results_dir)}")
    if ran and out["failed"] == ran:
        print(f"windtunnel sweep: all {ran} trials of this run failed; their reasons: {q(d / 'trials.csv')}, "
              f"their workers' logs: {q(d / 'bundles')}/*/worker.log", file=sys.stderr)
        return 1
    return 0
