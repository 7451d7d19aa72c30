"""`windtunnel sweep SWEEP [KEY=VALUE ...]`: run (or resume) a sweep."""
from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("sweep", help="a name in sweeps/ (quickstart, mup_hp, lr_width, batch_size, wsd_branches) "
                                 "or a path to a sweep YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides: n_trials=50 executor.workers=2 model.d_model=128 results_dir=/tmp/r "
                        "executor=ray executor.address=auto tracking.uri=http://127.0.0.1:5000")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from windtunnel.configure import load_sweep

    cfg = load_sweep(args.sweep, args.overrides)  # every error is raised before anything is written
    from windtunnel.sweep import run_sweep

    out = run_sweep(cfg, progress=not args.quiet)
    d = out["dir"]
    print(f"{cfg.name}: {out['finished']} trials finished ({out['ok']} ok, {out['pruned']} pruned, "
          f"{out['failed']} failed this run)")
    print(f"  table:   {d}/trials.csv")
    print(f"  report:  {d}/report.md   (plots: {d}/*.png)")
    print(f"  best:    {d}/best.yaml   (windtunnel trial --config {d}/best.yaml)")
    if cfg.tracking.enabled:
        where = cfg.tracking.uri or f"windtunnel ui {cfg.results_dir}"
        print(f"  MLflow:  {where}")
    return 0
