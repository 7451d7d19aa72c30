"""Which WSD runs would fix the data-model law? Simulated from the law a sweep already fitted.

    python -m windtunnel.bench.wsd_design results/windtunnel/wsd_prose_wide/wsd_fit.json [--draws 200] [--out DIR]
        [--at-n N]

Takes what `windtunnel fit wsd --json` wrote (the law and its branches' N, D), draws each design's
losses from that law with the fit's own noise (its log residuals' sd), refits every draw and reports
how often E lands on its floor and the middle 95% of E, alpha and tokens per parameter over the draws,
beside each design's GPU work relative to the runs as made; with --at-n, also the compute-optimal
tokens per parameter of a model of N parameters (a target's budget, which `transfer --scaling-law`
sets). Only as good as the fitted law: a design
that pins this law need not pin the true one, but one that cannot pin it here will not there either.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from windtunnel.bench import write_results
from windtunnel.fits import fit_scaling_law, optimal_tokens, predict_loss

PARAMS = 5  # E, A, B, alpha, beta: the residuals' degrees of freedom


def designs(N: np.ndarray, D: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Sizes and branch token counts: as run, one or two sizes more (×3, ×9 the largest), or branches
    doubling on to 2×, 4× and 8× the last one's tokens (the prose slice that travels to the GPU holds
    64M tokens: 2× of a 30M-token sweep is one epoch, more repeats it)."""
    longer = {f"+ branches to {k}× the tokens": (N, np.r_[D, D.max() * 2.0 ** np.arange(1, int(np.log2(k)) + 1)])
              for k in (2, 4, 8)}
    return {"as run": (N, D), "+ size ×3 the largest": (np.r_[N, 3 * N.max()], D),
            "+ sizes ×3, ×9 the largest": (np.r_[N, 3 * N.max(), 9 * N.max()], D), **longer}


def gpu_work(N: np.ndarray, D: np.ndarray, decay: float = 0.1) -> float:
    """6·N tokens per size: its stable run to the last branch, and each branch's decay (sweeps/wsd_branches.yaml's
    schedule.decay: 10% of the branch's tokens)."""
    return float(sum(6 * n * (D.max() + decay * D.sum()) for n in N))


def simulate(fit_json: dict, draws: int, seed: int = 0, at_n: float | None = None) -> tuple[list[dict], float]:
    law, pts = fit_json["scaling_law"], pd.DataFrame(fit_json["points"])
    resid = np.log(pts["loss"]) - np.log(predict_loss(law, pts["N"], pts["D"]))
    noise = float(np.sqrt(np.sum(resid**2) / (len(pts) - PARAMS)))
    N, D = np.sort(pts["N"].unique()), np.sort(pts["D"].unique())
    rng = np.random.default_rng(seed)
    base_work = gpu_work(N, D)
    rows = []
    for name, (n, d) in designs(N, D).items():
        grid = pd.DataFrame([(a, b) for a in n for b in d], columns=["N", "D"])
        true = predict_loss(law, grid["N"], grid["D"])
        got = []
        for _ in range(draws):
            df = grid.assign(loss=true * np.exp(rng.normal(0, noise, len(grid))))
            f = fit_scaling_law(df, compute=law["compute"])  # one compute: tokens per parameter compare
            at = optimal_tokens(f, at_n) / at_n if at_n and f.alpha > 0 and f.beta > 0 else np.nan
            got.append((f.E, f.alpha, f.tokens_per_param, "E" in f.at_bound, at))
        E, alpha, tpp, floor, at = (np.array(c) for c in zip(*got))
        rows.append({"design": name, "sizes": len(n), "branches": len(d), "gpu_work": gpu_work(n, d) / base_work,
                     "E_floor": float(floor.mean()), "E": _mid95(E), "alpha": _mid95(alpha),
                     "tokens_per_param": _mid95(tpp)} | ({"tokens_per_param_at_n": _mid95(at)} if at_n else {}))
    return rows, noise


def _mid95(x: np.ndarray) -> list[float]:
    return [float(v) for v in np.nanpercentile(x, [2.5, 97.5])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fit", help="a `windtunnel fit wsd --json` output (wsd_fit.json)")
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--out", help="write wsd_design.md/.json here")
    p.add_argument("--at-n", type=float, metavar="N", help="also the tokens per parameter at N parameters (a target's)")
    a = p.parse_args(argv)
    if a.draws < 2:
        p.error(f"--draws {a.draws}: must be at least 2 (the middle 95% needs several draws)")
    if a.at_n is not None and not a.at_n > 0:
        p.error(f"--at-n {a.at_n}: must be a parameter count > 0")
    try:
        with open(a.fit) as fh:
            fit_json = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"wsd_design: {a.fit}: cannot read it as JSON ({e})") from None
    if not isinstance(fit_json, dict) or not (fit_json.get("scaling_law") and fit_json.get("points")):
        raise SystemExit(f"wsd_design: {a.fit}: no 'scaling_law' and 'points' (the output of `windtunnel fit wsd --json`)")
    rows, noise = simulate(fit_json, a.draws, at_n=a.at_n)
    law = fit_json["scaling_law"]
    lines = [f"Truth in every draw: the fitted law, E {law['E']:.2f}, alpha {law['alpha']:.2f}, "
             f"{law['tokens_per_param']:.0f} tokens per parameter at {law['compute']:.3g} FLOPs; noise sd "
             f"{noise:.4f} in log loss (the fit's residuals); {a.draws} draws a design"
             + (f"; at N = {a.at_n:.3g} the law gives {optimal_tokens(law, a.at_n) / a.at_n:.0f} tokens per parameter."
                if a.at_n else "."), "",
             "| design | sizes × branches | GPU work (× as run) | E on its floor | E (middle 95%) | alpha | "
             "tokens per parameter |" + (f" at N = {a.at_n:.3g} |" if a.at_n else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if a.at_n else "")]
    lines += [f"| {r['design']} | {r['sizes']} × {r['branches']} | {r['gpu_work']:.1f} | {r['E_floor']:.0%} | "
              f"[{r['E'][0]:.2f}, {r['E'][1]:.2f}] | [{r['alpha'][0]:.2f}, {r['alpha'][1]:.2f}] | "
              f"[{r['tokens_per_param'][0]:.0f}, {r['tokens_per_param'][1]:.0f}] |"
              + (" [%.3g, %.3g] |" % tuple(r["tokens_per_param_at_n"]) if a.at_n else "") for r in rows]
    table = "\n".join(lines)
    print(table)
    if a.out:
        cmd = f"python -m windtunnel.bench.wsd_design {a.fit} --draws {a.draws} --out {a.out}" + (
            f" --at-n {a.at_n:.0f}" if a.at_n else "")
        write_results(a.out, "wsd_design", {"noise": noise, "law": law, "designs": rows},
                      f"# Which WSD runs would fix the law\n\nCommand: `{cmd}` (CPU, seeded)\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
