"""The findings a user acts on, with their intervals, read from the committed results.

    python -m windtunnel.bench.findings [--results results/windtunnel] [--write]

Prints a markdown table (results/windtunnel/README.md's findings) and, with --write, puts the same
numbers under "trust" in summary.json and the table into that README, so no figure is typed by hand.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import yaml

SEARCHES = ("mup_hp", "mup_hp_tpe400", "mup_hp_gp400")


def _confirm(results: Path) -> dict:
    out = {}
    for s in SEARCHES:
        f = results / f"{s}-confirm" / "confirm.csv"
        if not f.is_file():
            continue
        df = pd.read_csv(f)
        win = df[df.verdict == "winner"].iloc[0]
        top = df[df.config.str.startswith("top ") & ~df.config.str.contains("scales")]
        minicpm = df[df.config.str.contains("scale_emb=12")]
        pairs = df[df.config.str.contains("scales ×")]
        out[s] = {
            "winner": win.config, "mean": win["mean"], "ci": [win.ci_low, win.ci_high],
            "lr": win["optim.lr"], "init_std": win["model.init_std"], "ratio": win.scale_ratio,
            "top10_tied_with_winner": int((top.verdict == "tied").sum()),
            "minicpm_mean": None if minicpm.empty else minicpm["mean"].iloc[0],
            "minicpm_ci": None if minicpm.empty else [minicpm.ci_low.iloc[0], minicpm.ci_high.iloc[0]],
            "scale_pairs_tied": bool((pairs.verdict.isin(["tied", "winner"])).all()) if len(pairs) else None,
            "seeds": int(win.n),
        }
    return out


def collect(results: Path) -> dict:
    trust: dict = {"confirm": _confirm(results)}
    depth = results / "lr_depth" / "lr_depth_fit.json"
    if depth.is_file():
        trust["depth"] = {d["parametrization"]: {k: d[k] for k in ("low", "high", "octaves", "ci", "goal_met", "goal_met_95")}
                          for d in json.loads(depth.read_text())["drifts"] if d["axis"] == "depth"}
    horizon = results / "lr_horizon" / "horizon_law.json"
    if horizon.is_file():
        h = json.loads(horizon.read_text())
        trust["horizon"] = {"lr_exponent_b": h["b"], "b_ci": h["ci"]["b"], "r2": h["r2"],
                            "init_std_exponent_d": h.get("d"), "d_ci": h["ci"].get("d"),
                            "tokens": [p["tokens"] for p in h["points"]]}
    checks = {b: results / f"lr_validate_check{suffix}" / "lr_fit.json" for b, suffix in ((16, ""), (64, "_b64"))}
    if all(f.is_file() for f in checks.values()):
        opt = {b: json.loads(f.read_text())["optima"][0] for b, f in checks.items()}
        trust["lr_check"] = {"lr_opt": {b: o["lr_opt"] for b, o in opt.items()},
                             "ci": {b: o["lr_opt_ci"] for b, o in opt.items()},
                             "transferred_lr": yaml.safe_load((results / "validate_0.5b" / "train.yaml").read_text())["optim"]["lr"]}
        law = results / "lr_batch_fit.json"  # the two checks fitted together: what `transfer --lr-batch-scaling` reads
        if law.is_file():
            batch = next(d for d in json.loads(law.read_text())["drifts"] if d["axis"] == "batch")
            trust["lr_check"] |= {"batch_exponent": batch["per_doubling"], "batch_exponent_ci": batch["per_doubling_ci"]}
    # the tuned sweep (the winner's knobs) where it ran; wsd_prose trained at conf's lr 0.01
    wsd = next((f for f in (results / n / "wsd_fit.json" for n in ("wsd_prose_long", "wsd_prose_wide", "wsd_prose_tuned", "wsd_prose"))
                if f.is_file()), None)
    if wsd:
        fit = json.loads(wsd.read_text())
        best = yaml.safe_load((wsd.parent / "best.yaml").read_text())["trial"]
        pts = pd.DataFrame(fit["points"]).sort_values(["D", "N"])
        # token counts where a larger model is not better: the sizes were not trained alike
        worse = sorted(float(D) for D, g in pts.groupby("D") if (g["loss"].diff().dropna() > 0).any())
        trust["wsd_prose"] = {**{k: fit["scaling_law"].get(k) for k in ("E", "alpha", "beta", "tokens_per_param", "at_bound",
                                                                          "ci", "n_points", "compute")},
                              "lr": best["optim"]["lr"], "val_split": best["data"].get("val_split", "tail"),
                              "larger_not_better_at": worse, "n_max": float(pts["N"].max()), "sweep": wsd.parent.name}
        plan = results / "validate_0.5b_v2" / "plan.json"  # the target the validation transfers to
        if plan.is_file() and fit["scaling_law"].get("draws"):
            from windtunnel.config.trial import ModelConfig
            from windtunnel.fits import optimal_tokens, optimal_tokens_interval
            from windtunnel.model import count_params

            m = json.loads(plan.read_text())["transfer"]["model"]
            n = count_params(ModelConfig(**m), m["vocab_size"])
            trust["wsd_prose"]["at_target"] = {"N": n, "tokens_per_param": optimal_tokens(fit["scaling_law"], n) / n,
                                               "ci": optimal_tokens_interval(fit["scaling_law"], n)}
    for name, key in VALIDATIONS:
        v = results / name / "validate.json"
        summary = json.loads(v.read_text()) if v.is_file() else {}
        if summary.get("runs_done"):  # a planned validation with no run yet has no row
            trust[key] = {k: val for k, val in summary.items() if k != "runs"}
    hf = results / "export_hf" / "hf_check.json"
    if hf.is_file():
        trust["export_hf"] = json.loads(hf.read_text())
    return trust


# the validation text of every prose result so far (docs/data.md, "Where it lies matters")
PROSE_TAIL = "a loss on other text than the prose slice's tail (Java API pages: data.val_split=tail)"
# (folder, summary key) of each validation at the target's scale, and (what its row validates, what it does not show)
VALIDATIONS = (("validate_0.5b", "validate"), ("validate_0.5b_v2", "validate_v2"))
VALIDATION_ROWS = {
    "validate": ("transferred config (with the five-point horizon law, as transfer stood in session 17)",
                 "its 5 runs not made: the slice these trained on cannot be re-made (its tokenizer came from an "
                 "earlier corpus build kept nowhere), so `validate_0.5b_v2` validates anew; " + PROSE_TAIL + "; "),
    "validate_v2": ("the current transfer (depth law, lr ∝ batch^0.113 [0.084, 0.141], no horizon law), spread validation split,",
                    "the configurations and seeds not yet run; "),
}


def table(t: dict) -> str:
    ci = lambda c: f"[{c[0]:.3f}, {c[1]:.3f}]"  # noqa: E731
    rows = ["| finding | estimate (95% interval) | what it does not show |", "|---|---|---|"]
    for s, c in t.get("confirm", {}).items():
        rows.append(f"| `{s}` winner after {c['seeds']} seeds each | loss {c['mean']:.3f} {ci(c['ci'])}; lr {c['lr']:.2g}, "
                    f"init_std {c['init_std']:.2g}, scale ratio {c['ratio']:.1f}; {c['top10_tied_with_winner']} of the top 10 tied "
                    f"with it | which of the tied configurations is best: they are one basin |")
    if t.get("confirm"):
        m = [c for c in t["confirm"].values() if c["minicpm_mean"] is not None]
        if m:
            rows.append("| MiniCPM's published configuration (lr 0.01, init_std 0.1) on this proxy | loss "
                        + ", ".join(f"{c['minicpm_mean']:.3f} {ci(c['minicpm_ci'])}" for c in m)
                        + " vs winners ~3.82: worse in every search | whether it is worse at MiniCPM's own horizon and data |")
        pairs = [c["scale_pairs_tied"] for c in t["confirm"].values() if c["scale_pairs_tied"] is not None]
        if pairs:
            rows.append(f"| scale_emb and scale_depth both ×¼ and ×4 | tied with the winner in {sum(pairs)} of {len(pairs)} "
                        "searches: only the ratio matters | |")
    for p, d in t.get("depth", {}).items():
        verdict = "goal met by the estimate" if d["goal_met"] else "goal MISSED"
        verdict += ", but not by the whole interval" if d["goal_met"] and not d["goal_met_95"] else ""
        rows.append(f"| optimal lr drift, depth {d['low']:.0f} → {d['high']:.0f} layers, `{p}` | {d['octaves']:+.2f} octaves "
                    f"{ci(d['ci'])} ({verdict}; goal < 0.5) | depths beyond 32; horizons beyond 2M tokens |")
    h = t.get("horizon")
    if h:
        from windtunnel.fits import WEAK_R2

        weak = f" (WEAK: r² < {WEAK_R2}, no law to extrapolate)" if h["r2"] < WEAK_R2 else ""
        rows.append(f"| optimal lr vs training tokens, lr* ∝ T^-b ({h['tokens'][0]:.0e}–{h['tokens'][-1]:.0e} tokens) | "
                    f"b = {h['lr_exponent_b']:.3f} "
                    f"{ci(h['b_ci']) if h['b_ci'] else '(no interval: an lr next to an optimum has one seed)'}, "
                    f"r² {h['r2']:.2f}{weak}; init_std* ∝ T^-d, "
                    f"d = {h['init_std_exponent_d']:.2f}{' ' + ci(h['d_ci']) if h.get('d_ci') else ''} | a trend past 16× "
                    "of tokens (python-stdlib corpus repeated past "
                    "7M tokens); prose |")
    c = t.get("lr_check")
    if c:
        lo, hi = (c["lr_opt"][k] for k in sorted(c["lr_opt"], key=int))
        (b_lo, ci_lo), (b_hi, ci_hi) = sorted(((int(k), v) for k, v in c["ci"].items()))
        rows.append(f"| the proxy's optimal lr at the validation's data (prose), horizon (30M tokens) and batch | "
                    f"batch {b_lo}: {lo:.2e} [{ci_lo[0]:.2e}, {ci_lo[1]:.2e}]; batch {b_hi}: {hi:.2e} [{ci_hi[0]:.2e}, "
                    f"{ci_hi[1]:.2e}], ×{hi / lo:.2f} for {b_hi // b_lo}× the batch"
                    + (f" (lr ∝ batch^{c['batch_exponent']:.3f} {ci(c['batch_exponent_ci'])}, `lr_batch_fit.json`)"
                       if "batch_exponent" in c else "") + "; the lr transferred to the validation: "
                    f"{c['transferred_lr']:.2e} | whether the data or the horizon raises the lr here (no prose run at 2M); "
                    f"the batch factor at other sizes and horizons; 2 seeds an lr; {PROSE_TAIL} |")
    w = t.get("wsd_prose")
    if w:
        fixed = ", ".join(f"{k} {w[k]:.2f} {ci(w['ci'][k])}" for k in ("E", "alpha", "beta")
                          if k not in w["at_bound"] and w.get("ci"))
        tpp = f"{w['tokens_per_param']:.0f}" + (" [%.0f, %.0f]" % tuple(w["ci"]["tokens_per_param"]) if w.get("ci") else "")
        if w["at_bound"]:
            where = "its bound" if len(w["at_bound"]) == 1 else "their bounds"
            est = (f"NOT DETERMINED: {' and '.join(w['at_bound'])} on {where} (fit or 95% interval); tokens per "
                   f"parameter {tpp}, not a budget to launch" + (f"; {fixed}" if fixed else ""))
        else:
            # D_opt/N moves with N unless alpha = beta: the ratio holds at this compute, not at the target's
            est = (f"{fixed}; {tpp} tokens per parameter at the largest branch's compute ({w['compute']:.1e} FLOPs; "
                   "`transfer --scaling-law` gives the target's own)")
        at = w.get("at_target")
        if at and not w["at_bound"]:
            lo, hi = at["ci"]
            est += (f"; at the {at['N'] / 1e9:.2f}B validation target {at['tokens_per_param']:.0f} [{lo:.3g}, {hi:.3g}]"
                    + (": the law does not pin its budget" if hi > 10 * lo else ""))
        worse = ", ".join(f"{D:.2g}" for D in w["larger_not_better_at"])
        note = f"; at {worse} tokens a larger model is not better" if worse else ""
        rows.append(f"| data-model scaling law from WSD branches on prose (`{w.get('sweep', 'wsd_prose')}`: {w['n_points']} "
                    f"branches, lr {w['lr']:.2g}) | "
                    f"{est}{note} | sizes beyond the largest branch's ({w['n_max'] / 1e6:.0f}M parameters)"
                    f"{'; a loss floor' if 'E' in w['at_bound'] else ''}; one seed per size; an lr tuned "
                    f"per size (one lr, carried by μP){'; ' + PROSE_TAIL if w.get('val_split', 'tail') == 'tail' else ''} |")
    for name, key in VALIDATIONS:
        v = t.get(key)
        if not v:
            continue
        done = [r for r in v["table"] if r["n"]]
        losses = "; ".join(f"{r['config']} {r['mean']:.3f}" + (f" ±{r['sd']:.3f}" if r["n"] > 1 else "") for r in done)
        gap = v["transferred_minus_best"]
        gap = f"transferred − best {gap:+.3f}" if gap is not None else "transferred not run yet"
        one_seed = "one seed each, so no interval yet; " if all(r["n"] == 1 for r in done) else ""
        o = v.get("lr_optimum")
        if o:
            if o.get("at_edge"):  # the best lr tried so far is the largest (or smallest) run: a bound
                gap += f"; the target's optimal lr {'≥' if o['factor'] > 1 else '≤'} ×{o['factor']:.2f} the transferred"
            else:
                iv = (f" {ci(o['factor_ci'])}" if o["factor_ci"] else
                      " (no interval yet: an lr near it has one seed)" if o.get("thin") else "")
                gap += f"; the target's optimal lr ×{o['factor']:.2f}{iv} the transferred"
        rows.append(f"| {VALIDATION_ROWS[key][0]} at 0.48B, 30M tokens of prose, vs lr/init_std ×factors and MiniCPM's "
                    f"(`{name}`: {v['runs_done']} of {v['runs_planned']} runs) | {losses}; {gap}: {one_seed}{v['verdict']} "
                    f"(goal: within one seed-sd of the best) | {VALIDATION_ROWS[key][1]}longer horizons |")
    hf = t.get("export_hf")
    if hf:
        rows.append(f"| export-hf of a 200-step 0.5B run, loaded by transformers | loss gap {hf['relative_gap']:.1e} "
                    f"(goal < 1%) on {hf['device']} | |")
    return "\n".join(rows)


def with_table(readme: str, new: str) -> str:
    """The README's text with its findings table (the block of lines from the `| finding |` header on) replaced."""
    lines = readme.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("| finding |")), None)
    if start is None:
        raise SystemExit("findings: the README has no table starting '| finding |' to replace")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "".join(lines[:start]) + new + "\n" + "".join(lines[end:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results/windtunnel")
    p.add_argument("--write", action="store_true",
                   help="also store the numbers in summary.json under 'trust' and the table in the results' README.md")
    a = p.parse_args(argv)
    results = Path(a.results)
    t = collect(results)
    md = table(t)
    print(md)
    if a.write:
        from windtunnel.files import write_atomically

        f = results / "summary.json"
        summary = json.loads(f.read_text()) if f.is_file() else {}
        summary["trust"] = t
        text = json.dumps(summary, indent=1, default=float) + "\n"
        write_atomically(f, lambda tmp: Path(tmp).write_text(text))
        readme = results / "README.md"
        if readme.is_file():
            text_md = with_table(readme.read_text(), md)
            write_atomically(readme, lambda tmp: Path(tmp).write_text(text_md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
