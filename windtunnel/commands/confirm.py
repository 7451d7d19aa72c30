"""`windtunnel confirm RESULTS_DIR/SWEEP --top K --seeds N [--add K=V,K=V ...] [--scale-pairs C,C] [KEY=VALUE ...]`:
re-run a finished sweep's best configurations (and named ones) with N seeds each; mean, sd and a 95%
interval per configuration, the winner and those tied with it (windtunnel/confirm.py)."""
from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("sweep_dir", help="a finished sweep's results folder, e.g. results/quickstart")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="settings for every replicate: data.source=/path/to/shards (the sweep's best.yaml may name "
                        "a folder of another machine), train.device=cpu, executor.workers=2, population.size=8, "
                        "tracking.uri=http://127.0.0.1:5000, name=NAME (the folder beside the sweep's)")
    p.add_argument("--top", type=int, default=10, help="the sweep's best K distinct configurations (default 10)")
    p.add_argument("--seeds", type=int, default=5, help="replicates of each configuration, >= 2 (default 5)")
    p.add_argument("--add", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE...]",
                   help="one more configuration: the sweep's winner with these values; repeatable, e.g. "
                        "--add model.scale_emb=12,model.scale_depth=1.4,model.init_std=0.1,optim.lr=0.01 (MiniCPM's)")
    p.add_argument("--scale-pairs", default="", metavar="C[,C...]",
                   help="the winner with scale_emb and scale_depth both ×C, one configuration per C, e.g. 0.25,4 "
                        "(the same ratio: they should tie with it)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from windtunnel.config.trial import SECTIONS
    from windtunnel.confirm import (ConfirmDriver, candidates, confirm_sweep, parse_add, parse_factors,
                                    summary_frame, table_lines)
    from windtunnel.config.overrides import parse_value, split
    from windtunnel.errors import ConfigError
    from windtunnel.results import open_sweep_study

    if args.top < 1:
        raise ConfigError(f"--top: must be >= 1 (got {args.top})")
    if args.seeds < 2:
        raise ConfigError(f"--seeds: must be >= 2, as a 95% interval needs two replicates at least (got {args.seeds})")
    adds = [parse_add(a) for a in args.add]
    factors = parse_factors(args.scale_pairs) if args.scale_pairs else []
    pairs = [split(item, example="data.source=/path/to/shards") for item in args.overrides]
    trial_overrides = {k: parse_value(v) for k, v in pairs if k.partition(".")[0] in SECTIONS}
    d = Path(args.sweep_dir)
    study = open_sweep_study(d)
    if "request" in study.user_attrs:
        raise ConfigError(f"sweep_dir: {d} holds a confirmation; name the sweep it confirmed "
                          f"(e.g. {d.parent / study.study_name.removesuffix('-confirm')})")
    cands = candidates(study, args.top, adds, factors, trial_overrides)
    cfg = confirm_sweep(study, d.resolve(), args.overrides, len(cands) * args.seeds)
    searched = study.user_attrs.get("data")  # replicates on other tokens would not confirm this search
    if searched and cfg.executor.type == "local":  # elsewhere the driver checks each worker's result against it
        from windtunnel import data

        changed = data.identity_changes(searched, data.identity(data.load(cfg.trial.data).manifest))
        if changed:
            raise ConfigError(f"data.source: {cfg.trial.data.source} holds other tokens than the search {d} trained on "
                              f"({'; '.join(changed)}); confirm it on its own data, or search these")
    from windtunnel.sweep import run_sweep

    out = run_sweep(cfg, progress=not args.quiet,
                    driver=lambda c, progress, stop: ConfirmDriver(c, cands, args.seeds, progress, stop, searched))
    folder = Path(out["dir"])
    print("\n".join(table_lines(summary_frame(open_sweep_study(folder)))))
    print(f"\n{len(cands)} configurations × {args.seeds} seeds: {out['finished']} replicates finished "
          f"({out['ok']} ok, {out['failed']} failed this run)")
    print(f"  table:   {folder}/confirm.csv   (each replicate: {folder}/replicates.csv)")
    print(f"  report:  {folder}/report.md")
    if (folder / "best.yaml").exists():
        print(f"  best:    {folder}/best.yaml   (with its interval; windtunnel transfer {folder})")
    if cfg.tracking.enabled:
        print(f"  MLflow:  {cfg.tracking.uri or f'windtunnel ui {cfg.results_dir}'}")
    if out["failed"] and out["failed"] == out["ok"] + out["failed"]:
        print(f"windtunnel confirm: every replicate of this run failed; reasons: {folder}/replicates.csv, "
              f"workers' logs: {folder}/bundles/*/worker.log", file=sys.stderr)
        return 1
    return 0
