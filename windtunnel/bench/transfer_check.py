"""Does the proxy's winner transfer? Rescale it to a wider target with `windtunnel transfer`
(μP through windtunnel/parametrization.py), then train the transferred config beside a small
lr sweep at the target width, all at one token budget, as one population.

    python -m windtunnel.bench.transfer_check results/windtunnel/mup_hp --target proxy-8x \\
        --tokens 4000000 --out results/windtunnel/transfer

The gap: (transferred loss − best loss in the sweep) / best loss.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from windtunnel.config.trial import to_dict, with_overrides
from windtunnel.files import write_json
from windtunnel.config.target import load_target
from windtunnel.transfer import Laws, load_winner, plan
from windtunnel.trainer import Population

LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("winner", help="RESULTS_DIR/SWEEP or a best.yaml")
    p.add_argument("--target", default="proxy-8x")
    p.add_argument("--tokens", type=int, default=4_000_000)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (the proxy's)")
    p.add_argument("--data", default="", help="data.source for the runs (default: the winner's)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    winner = load_winner(args.winner)
    target = load_target(args.target)
    pl = plan(winner, target, Laws(batch_size=args.batch_size * target.seq_len, tokens=args.tokens))
    trial = pl.trial  # the transfer module's output: μP base values, the target's shape
    over = {"train.tokens": args.tokens, "train.batch_size": args.batch_size, "train.eval_every": args.tokens // 4,
            "train.device": "auto", "train.save_at": [], "train.checkpoint_dir": "", "train.checkpoint_every": 0}
    if args.data:
        over["data.source"] = args.data
    base = with_overrides(trial, over)
    cfgs = [with_overrides(base, {"optim.lr": base.optim.lr * f}) for f in LR_FACTORS]
    results = Population(cfgs).run()
    rows = [{"lr_factor": f, "lr": c.optim.lr, "status": r.status, "final_val_loss": r.final_val_loss,
             "transferred": f == 1.0} for f, c, r in zip(LR_FACTORS, cfgs, results)]
    ok = [r for r in rows if r["final_val_loss"] is not None]
    best = min(ok, key=lambda r: r["final_val_loss"])
    mine = next(r for r in rows if r["transferred"])
    gap = 100 * (mine["final_val_loss"] - best["final_val_loss"]) / best["final_val_loss"] \
        if mine["final_val_loss"] is not None else None
    summary = {"proxy_d_model": winner.trial.model.d_model, "target_d_model": base.model.d_model,
               "width_ratio": base.model.d_model / winner.trial.model.d_model, "tokens": args.tokens,
               "params": results[0].params, "transfer_gap_pct": gap, "runs": rows,
               "trial": to_dict(base)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "transfer_check.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "trial"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
