"""`windtunnel coord-check`: the μP coordinate check (windtunnel/coord_check.py). Exit status 1
when μP fails it (the lines say which activation moved how far)."""
from __future__ import annotations

import json
import math
import shlex


def add_arguments(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the base trial config")
    p.add_argument("--widths", default="64,128,256,512", help="comma-separated d_model values")
    p.add_argument("--steps", type=int, default=5, help="training steps per width (default 5)")
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: the coordinate check's 0.01)")
    p.add_argument("--parametrizations", default="sp,mup", help="comma-separated, of sp and mup (default sp,mup)")
    p.add_argument("--sp-init-std", type=float, default=0.02,
                   help="sp's one init std (default 0.02, GPT-2's); mup uses model.init_std")
    p.add_argument("--json", action="store_true", help="print rows {parametrization, width, step, layer, value}: "
                   "step 0 the activation's size mean |x_0|, step t its change mean |x_t - x_0|")
    p.add_argument("--plot", metavar="FILE.png", help="draw mean |Δactivation| vs width per layer")


def run(args) -> int:
    from windtunnel.config.hydra import trial_config
    import sys

    from windtunnel.coord_check import coord_check, mup_violations, plot, summary
    from windtunnel.errors import ConfigError

    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        raise ConfigError(f"--widths: must be comma-separated integers (got {args.widths!r})") from None
    if len(set(widths)) < 2:  # the check is a comparison across widths: one has nothing to compare
        raise ConfigError(f"--widths: must name at least two different widths (got {args.widths!r})")
    # checked here, so the error names the flag (not train.tokens or model.init_std); --lr 0 was the default lr
    if args.steps < 1:
        raise ConfigError(f"--steps: must be >= 1 (got {args.steps})")
    for flag, value in (("--lr", args.lr), ("--sp-init-std", args.sp_init_std)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag}: must be a finite number > 0 (got {value})")
    if args.plot:
        from windtunnel.plots_fits import check_format

        check_format(args.plot)  # before the check runs, not after
    rows = coord_check(trial_config(args.overrides), widths=widths, steps=args.steps, lr=args.lr,
                       parametrizations=args.parametrizations.split(","), sp_init_std=args.sp_init_std)
    print(json.dumps(rows) if args.json else summary(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {shlex.quote(str(args.plot))}", file=sys.stderr if args.json else sys.stdout)
    broken = mup_violations(rows)
    if "mup" in args.parametrizations.split(",") and len(set(widths)) > 1:
        print("μP check: " + ("; ".join(broken) if broken else "every activation's size and change hold across widths"),
              file=sys.stderr if args.json else sys.stdout)
    return 1 if broken else 0
