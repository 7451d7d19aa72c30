"""`windtunnel fit KIND --input CSV|SWEEP_DIR [--input ...] [--json] [--plot FILE.png]`: fit one law
from a results table, or several stacked.

    lr-transfer   columns parametrization,width,lr,loss[,depth,batch,seed|run] -> optimal lr per
                  width, depth and batch; drift across width (lr-grid steps), depth (octaves, goal
                  < 1/2 over 8x) and batch (lr ∝ batch^beta: `transfer --lr-batch-scaling FILE.json`)
    batch-size    columns model,batch_size,tokens,loss[,lr,seed|run]     -> bs_opt = a / L^b (MiniCPM),
                  the lr tuned per batch size
    horizon       columns tokens,lr,loss[,init_std,seed|run]             -> lr*(T) = a · T^-b
    scaling-law   columns N,D,loss                       -> L = E + A/N^alpha + B/D^beta, N_opt, D_opt
    wsd           columns model,N,tokens,loss            -> loss vs data per size, and the scaling law

All but scaling-law also read what a sweep writes: its results folder or a table in it, e.g.
`windtunnel fit lr-transfer --input results/windtunnel/lr_width` (the committed sweep).
lr-transfer and horizon take trials.csv (model.parametrization, model.d_model, model.n_layers,
optim.lr, train.tokens, model.init_std, value; lr-transfer's batch is train.batch_size x
model.seq_len tokens); batch-size the folder's curves.csv (model.d_model, train.batch_size x
model.seq_len tokens, optim.lr, val_loss at every evaluation); wsd its
branches.csv (model.d_model, n_params, tokens and final_val_loss of every decay branch).
COMPLETE trials only. Several --input are stacked, each one's runs kept apart: e.g. the lr
sweeps of one model at two batch sizes give lr ∝ batch^beta. The scaling law needs >= 3 model
sizes and >= 3 token counts: along each axis E + A/N^alpha (or B/D^beta) has three unknowns.
Intervals (95%): lr-transfer, batch-size and horizon resample runs within each cell of the design
(seeds; --bootstrap resamples, default 1000; none with one run per cell), scaling-law and wsd
resample rows (--bootstrap K, default 0). docs/laws.md says how each law is measured.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex

from windtunnel import fits
from windtunnel.commands import stdout_may_close
from windtunnel.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("kind", choices=list(fits.COLUMNS), metavar="KIND", help=f"one of: {', '.join(fits.COLUMNS)}")
    parser.add_argument("--input", "-i", required=True, action="append", metavar="CSV|SWEEP_DIR",
                        help="a CSV of the kind's columns (extra columns are ignored), or for all but "
                             "scaling-law a sweep's results folder or a table in it; repeat to stack several")
    parser.add_argument("--json", action="store_true", help="print the fit as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a figure (.png, .pdf or .svg)")
    parser.add_argument("--compute", type=float, metavar="C",
                        help="scaling-law, wsd: FLOP budget C = 6ND for N_opt, D_opt (default: largest 6ND in the data)")
    parser.add_argument("--bootstrap", type=int, metavar="K",
                        help="resamples for 95%% intervals: scaling-law, wsd resample rows (default 0: none); "
                             f"the others runs within cells (default {fits.RESAMPLES}; 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else ""
    if isinstance(x, float):
        return str(int(x)) if x.is_integer() and abs(x) < 1e6 else f"{x:.4g}"  # 32768 tokens, not 3.277e+04
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
    for k in d.get("at_bound", ()):
        why = ("the data show no loss floor" if k == "E" else
               "does the loss fall with N and with D at every point, over sizes far enough apart?")
        out.append(f"NOT DETERMINED: {k} = {_fmt(d[k])}, or its 95% interval, is on its bound ({why}): the data do "
                   "not fix it, nor N_opt and D_opt; `transfer --scaling-law` refuses this fit")
    if "ci" in d:
        out.append("95% bootstrap intervals: " + ", ".join(f"{k} [{_fmt(lo)}, {_fmt(hi)}]" for k, (lo, hi) in d["ci"].items()))
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    kind = args.kind
    if kind not in ("scaling-law", "wsd") and args.compute is not None:
        raise ConfigError(f"--compute: applies to scaling-law and wsd only (got fit {kind})")
    if args.bootstrap is None:
        args.bootstrap = 0 if kind in ("scaling-law", "wsd") else fits.RESAMPLES
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise ConfigError(f"--bootstrap: must be 0 (no intervals) or >= 2 resamples (got {args.bootstrap})")
    if args.plot:
        from windtunnel.plots_fits import check_format

        check_format(args.plot)  # before the fit runs
    df = fits.load_inputs(args.input, kind)
    if kind == "lr-transfer":
        fit = fits.fit_lr_transfer(df, bootstrap_n=args.bootstrap, seed=args.seed)
    elif kind == "batch-size":
        fit = fits.fit_batch_size(df, bootstrap_n=args.bootstrap, seed=args.seed)
    elif kind == "horizon":
        fit = fits.fit_horizon(df, bootstrap_n=args.bootstrap, seed=args.seed)
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
        elif kind == "horizon":
            plots_fits.plot_horizon(fit, df, args.plot)
        elif kind == "scaling-law":
            plots_fits.plot_scaling_law(fit, df, args.plot)
        else:
            plots_fits.plot_wsd(fit, args.plot)

    with stdout_may_close():
        _print(args, kind, d)
    return 0


def _ci(ci, f=None) -> str:
    """' [lo, hi]' of a 95% interval, '' without one."""
    f = f or _fmt
    return f" [{f(ci[0])}, {f(ci[1])}]" if ci else ""


def _print(args: argparse.Namespace, kind: str, d: dict) -> None:
    if args.json:
        print(json.dumps(d, indent=2, allow_nan=False))
        return
    if kind == "lr-transfer":
        _print_lr_transfer(d)
    elif kind == "batch-size":
        _print_batch_size(d)
    elif kind == "horizon":
        _print_horizon(d)
    elif kind == "scaling-law":
        print(_law_text(d))
    else:
        print(_table(d["points"], ["model", "N", "D", "loss"]))
        print(_law_text(d["scaling_law"]) if d["scaling_law"] else
              f"no scaling law: needs >= {fits.MIN_LEVELS} model sizes and >= {fits.MIN_LEVELS} token counts")
    if args.plot:
        print(f"wrote {shlex.quote(str(args.plot))}")


def _no_interval(d: dict, cell: str, thin: list[str] = ()) -> None:
    if not d["resamples"]:
        print(f"no intervals: one run per {cell}, or --bootstrap 0 (replicate seeds to get them)")
    elif thin:  # a resample would move only the other cells: too narrow an interval, so none
        print("no interval where an optimum rests on an lr with one run while others have several: "
              + "; ".join(thin) + " (run its missing seeds)")


def _edges(what: str, names: list[str]) -> None:
    if names:
        print(f"optimum on the {what} grid's edge (a bound, not an optimum; extend the grid past it): " + "; ".join(names))


def _group(o: dict) -> str:
    """An lr optimum's group, as a user names it: 'mup width 256 depth 32'."""
    return (f"{o['parametrization']} width {_fmt(o['width'])}" + (f" depth {_fmt(o['depth'])}" if o["depth"] else "")
            + (f" batch {_fmt(o['batch'])}" if o["batch"] else ""))


def _print_lr_transfer(d: dict) -> None:
    rows = [{**o, "95% interval": _ci(o["lr_opt_ci"]).strip()} for o in d["optima"]]
    depth = any(o["depth"] is not None for o in rows)
    batch = len({o["batch"] for o in rows}) > 1  # one batch is a setting of the sweep, not an axis
    cols = ["parametrization", "width"] + (["depth"] if depth else []) + (["batch"] if batch else [])
    print(_table(rows, cols + ["lr_opt", "95% interval", "loss_opt", "at_edge"]))
    if any(v is not None for v in d["drift_steps"].values()):
        print("drift of the optimum, smallest -> largest width, in lr-grid steps: "
              + ", ".join(f"{p} {_fmt(v)}" for p, v in d["drift_steps"].items()))
    for r in (r for r in d["drifts"] if r["axis"] == "batch"):
        pd_ci = r["per_doubling_ci"]
        print(f"drift across batch {_fmt(r['low'])} -> {_fmt(r['high'])} tokens (width {_fmt(r['at'])}), "
              f"{r['parametrization']}: {r['octaves']:+.3f} octaves{_ci(r['ci'], lambda v: f'{v:+.3f}')}; "
              + ("not measured: an optimum sat on the lr grid's edge" if r["edge"] else
                 f"lr ∝ batch^{r['per_doubling']:.3f}{_ci(pd_ci, lambda v: f'{v:.3f}')} "
                 "(this fit's --json is `transfer --lr-batch-scaling FILE.json`)"))
    for r in (r for r in d["drifts"] if r["axis"] == "depth"):
        verdict = ("not measured: an optimum sat on the lr grid's edge" if r["goal_met"] is None else
                   ("met" if r["goal_met"] else "NOT met")
                   + ("" if r["goal_met_95"] is None else
                      f"; the whole 95% interval inside ±{_fmt(r['goal_octaves'])}: {'yes' if r['goal_met_95'] else 'no'}"))
        print(f"drift across depth {_fmt(r['low'])} -> {_fmt(r['high'])} (width {_fmt(r['at'])}), {r['parametrization']}: "
              f"{r['octaves']:+.3f} octaves{_ci(r['ci'], lambda v: f'{v:+.3f}')}; goal |drift| < "
              f"{_fmt(r['goal_octaves'])} octave: {verdict}")
    _edges("lr", [_group(o) for o in d["optima"] if o["at_edge"]])
    _no_interval(d, "(parametrization, width, depth, batch, lr)", [_group(o) for o in d["optima"] if o["thin"]])


def _print_batch_size(d: dict) -> None:
    print(_table(d["points"], ["model", "tokens", "batch_size_opt", "loss_opt", "at_edge"]))
    print(f"bs_opt = {_fmt(d['a'])} / L^{_fmt(d['b'])}   (r2 {_fmt(d['r2'])}; edge optima not fitted)")
    if d["ci"]:
        print(f"95% intervals over runs: a{_ci(d['ci']['a'])}, b{_ci(d['ci']['b'])}")
    _no_interval(d, "(model, batch size, lr)", [f"{p['model']} tokens {_fmt(p['tokens'])}" for p in d["points"] if p["thin"]])
    if not d["lr_tuned"]:
        print("the lr was not tuned: one lr per batch size (sweep an lr grid per batch size: sweeps/batch_size.yaml)")
    else:
        _edges("lr", [f"{t['model']} batch {_fmt(t['batch_size'])}" for t in d["lr_optima"] if t["at_edge"]])


def _print_horizon(d: dict) -> None:
    rows = [{**p, "95% interval": _ci(p["lr_opt_ci"]).strip()} for p in d["points"]]
    std = any(p["init_std_opt"] is not None for p in rows)
    print(_table(rows, ["tokens", "lr_opt", "95% interval", "loss_opt", "at_edge"] + (["init_std_opt"] if std else [])))
    ci = d["ci"] or {}
    print(f"lr*(T) = {_fmt(d['a'])} · T^{_fmt(-d['b'])}   (r2 {_fmt(d['r2'])}; b{_ci(ci.get('b')) or ' without interval'}; "
          "edge optima not fitted)")
    if d["r2"] is not None and d["r2"] < fits.WEAK_R2:
        print(f"WEAK: r2 {_fmt(d['r2'])} < {fits.WEAK_R2}: the power law explains little of how the optimum moves; "
              "`transfer --horizon-law` would extrapolate it (and says so)")
    if d["c"] is not None:
        print(f"init_std*(T) = {_fmt(d['c'])} · T^{_fmt(-d['d'])}   (d{_ci(ci.get('d')) or ' without interval'})")
    _edges("lr", [f"tokens {_fmt(p['tokens'])}" for p in d["points"] if p["at_edge"]])
    # lr*(T) is read at each budget's best init_std: one on its grid's edge leaves lr*(T) a bound too
    _edges("init_std", [f"tokens {_fmt(p['tokens'])} (init_std {_fmt(p['init_std_opt'])})" for p in d["points"]
                        if p["init_std_at_edge"]])
    _no_interval(d, "(tokens, lr, init_std)", [f"tokens {_fmt(p['tokens'])}" for p in d["points"] if p["thin"]])
