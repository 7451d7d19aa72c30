"""`windtunnel fit KIND --input CSV|SWEEP_DIR [--json] [--plot FILE.png]`: fit one law from a results table.

    lr-transfer   columns parametrization,width,lr,loss  -> optimal lr per width, drift in grid steps
    batch-size    columns model,batch_size,tokens,loss   -> bs_opt = a / L^b (MiniCPM)
    scaling-law   columns N,D,loss                       -> L = E + A/N^alpha + B/D^beta, N_opt, D_opt
    wsd           columns model,N,tokens,loss            -> loss vs data per size, and the scaling law

lr-transfer, batch-size and wsd also read what a sweep writes: its results folder or a table in
it, e.g. `windtunnel fit lr-transfer --input results/windtunnel/lr_width` (the committed sweep).
lr-transfer takes trials.csv (model.parametrization, model.d_model, optim.lr, value); batch-size
the folder's curves.csv (model.d_model, train.batch_size x model.seq_len tokens, val_loss at every
evaluation); wsd its branches.csv (model.d_model, n_params, tokens and final_val_loss of every
decay branch).
COMPLETE trials only. The scaling law needs >= 3 model sizes and >= 3 token counts: along each
axis E + A/N^alpha (or B/D^beta) has three unknowns.
"""
from __future__ import annotations

import argparse
import json
import math

from windtunnel import fits
from windtunnel.commands import stdout_may_close
from windtunnel.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("kind", choices=list(fits.COLUMNS), metavar="KIND", help=f"one of: {', '.join(fits.COLUMNS)}")
    parser.add_argument("--input", "-i", required=True, metavar="CSV|SWEEP_DIR",
                        help="a CSV of the kind's columns (extra columns are ignored), or for lr-transfer, "
                             "batch-size and wsd a sweep's results folder or a table in it")
    parser.add_argument("--json", action="store_true", help="print the fit as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a figure (.png, .pdf or .svg)")
    parser.add_argument("--compute", type=float, metavar="C",
                        help="scaling-law, wsd: FLOP budget C = 6ND for N_opt, D_opt (default: largest 6ND in the data)")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="K",
                        help="scaling-law, wsd: K row resamples for 95%% intervals (default 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _table(rows: list[dict], cols: list[str]) -> str:
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), *(line(r) for r in cells)])


def _law_text(d: dict) -> str:
    out = [
        f"L(N, D) = {_fmt(d['E'])} + {_fmt(d['A'])}/N^{_fmt(d['alpha'])} + {_fmt(d['B'])}/D^{_fmt(d['beta'])}"
        f"   ({d['n_points']} points)",
        f"at C = {_fmt(d['compute'])} FLOPs: N_opt = {_fmt(d['N_opt'])}, D_opt = {_fmt(d['D_opt'])}, "
        f"tokens/param = {_fmt(d['tokens_per_param'])}",
    ]
    if "ci" in d:
        out.append("95% bootstrap intervals: " + ", ".join(f"{k} [{_fmt(lo)}, {_fmt(hi)}]" for k, (lo, hi) in d["ci"].items()))
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    kind = args.kind
    if kind in ("lr-transfer", "batch-size"):
        for opt, val, default in (("--compute", args.compute, None), ("--bootstrap", args.bootstrap, 0)):
            if val != default:
                raise ConfigError(f"{opt}: applies to scaling-law and wsd only (got fit {kind})")
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap: must be >= 0 (got {args.bootstrap})")
    if args.plot:
        from windtunnel.plots_fits import check_format

        check_format(args.plot)  # before the fit runs
    df = fits.load_csv(args.input, kind)
    if kind == "lr-transfer":
        fit = fits.fit_lr_transfer(df)
    elif kind == "batch-size":
        fit = fits.fit_batch_size(df)
    elif kind == "scaling-law":
        fit = fits.fit_scaling_law(df, compute=args.compute, bootstrap=args.bootstrap, seed=args.seed)
    else:
        fit = fits.fit_wsd(df, compute=args.compute, bootstrap=args.bootstrap, seed=args.seed)
    d = fit.to_dict()

    if args.plot:
        from windtunnel import plots_fits

        if kind == "lr-transfer":
            plots_fits.plot_lr_transfer(fit, df, args.plot)
        elif kind == "batch-size":
            plots_fits.plot_batch_size(fit, df, args.plot)
        elif kind == "scaling-law":
            plots_fits.plot_scaling_law(fit, df, args.plot)
        else:
            plots_fits.plot_wsd(fit, args.plot)

    with stdout_may_close():
        _print(args, kind, d)
    return 0


def _print(args: argparse.Namespace, kind: str, d: dict) -> None:
    if args.json:
        print(json.dumps(d, indent=2, allow_nan=False))
        return
    if kind == "lr-transfer":
        print(_table(d["optima"], ["parametrization", "width", "lr_opt", "loss_opt", "at_edge"]))
        print("drift of the optimum, smallest -> largest width, in lr-grid steps: "
              + ", ".join(f"{p} {_fmt(v)}" for p, v in d["drift_steps"].items()))
    elif kind == "batch-size":
        print(_table(d["points"], ["model", "tokens", "batch_size_opt", "loss_opt", "at_edge"]))
        print(f"bs_opt = {_fmt(d['a'])} / L^{_fmt(d['b'])}   (r2 {_fmt(d['r2'])}; edge optima not fitted)")
    elif kind == "scaling-law":
        print(_law_text(d))
    else:
        print(_table(d["points"], ["model", "N", "D", "loss"]))
        print(_law_text(d["scaling_law"]) if d["scaling_law"] else
              f"no scaling law: needs >= {fits.MIN_LEVELS} model sizes and >= {fits.MIN_LEVELS} token counts")
    if args.plot:
        print(f"wrote {args.plot}")
