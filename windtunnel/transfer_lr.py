"""The lr steps of a transfer plan: the target's lr is the proxy winner's μP base lr times one factor
per way the target differs from the proxy, each a row of transfer.md with its formula, source and,
where the law was measured with seeds, its 95% interval:

    base_lr          the proxy's lr × width (1 under μP), depth (--depth-law) and horizon
                     (--horizon-law) factors
    lr_for_batch     × the batch factor (--lr-batch-scaling: none, sqrt, an exponent or a measured law)

windtunnel/transfer.py `plan` runs them between the other steps (windtunnel/transfer_steps.py).
"""
from __future__ import annotations

import math

from windtunnel.errors import ConfigError
from windtunnel.transfer_inputs import Laws
from windtunnel.transfer_steps import Derivation, fmt


def base_lr(d: Derivation, laws: Laws, D: int) -> float:
    """The target's base lr: the proxy's, then its width, depth and horizon factors (each a row)."""
    w, target = d.winner.trial, d.target
    if target.lr is not None:
        return d.row("optim.lr (base)", target.lr, "given in the target (no factor applied)", d.from_target)
    why = "the winner's μP base lr"
    if d.winner.tied_lr:  # confirm's replicates tell configurations apart only so far: the lr is pinned no closer
        lo, hi = d.lr_ci["proxy lr"] = d.winner.tied_lr
        why += (f"; the configurations confirm could not tell from it use {fmt(lo)}–{fmt(hi)} "
                f"(×{fmt(lo / w.optim.lr)}–×{fmt(hi / w.optim.lr)})")
    proxy = d.row("proxy lr", w.optim.lr, why, d.from_winner)
    d.row("lr width factor", 1.0, "1: μP's base lr is width-independent (hidden matrices get lr / m, below)",
          "windtunnel.parametrization.rule")
    fd = depth_factor(d, laws)
    if laws.horizon_law is not None:
        from windtunnel.fits import WEAK_R2, horizon_factor

        hl, T0 = laws.horizon_law, w.train.tokens
        why = f"(D / proxy tokens)^-b = ({fmt(D)} / {fmt(T0)})^-{fmt(hl['b'])} (lr*(T) = a · T^-b)"
        b_ci = (hl.get("ci") or {}).get("b")
        if b_ci and None not in b_ci:  # the factor's own interval, and how far past the fit's data it reaches
            lo, hi = d.lr_ci["lr horizon factor"] = tuple(sorted(horizon_factor({"b": b}, T0, D) for b in b_ci))
            why += f"; b's 95% interval gives {fmt(lo)}–{fmt(hi)}"
        elif hl.get("resamples"):  # seeds were run, but a point the law rests on lacks one: the lr range leaves b out
            why += "; b has no interval (an optimum it rests on has one seed), so the lr range below leaves it out"
        measured = [p["tokens"] for p in hl.get("points", []) if "tokens" in p]
        if measured and D > max(measured):
            why += f"; extrapolated {fmt(D / max(measured))}× past the longest measured run ({fmt(max(measured))} tokens)"
        f = d.row("lr horizon factor", horizon_factor(hl, T0, D), why, hl["source"])
        if hl.get("r2") is not None and hl["r2"] < WEAK_R2:
            d.warnings.append(f"--horizon-law: its r² is {fmt(hl['r2'])}: the power law explains little of how the "
                              f"proxy's optimum moved, and the lr horizon factor {fmt(f)} extrapolates it")
    else:
        f = d.row("lr horizon factor", 1.0, "1: off (give --horizon-law FILE.json from `windtunnel fit horizon --json`)",
                  "command line")
    return d.row("optim.lr (base)", proxy * fd * f, "proxy lr × width × depth × horizon factors", "above")


def depth_factor(d: Derivation, laws: Laws) -> float:
    """2^(drift per doubling × log2(target layers / proxy layers)) from a depth sweep's fit, for the
    winner's parametrization and depth scaling; 1 without --depth-law."""
    w, target = d.winner.trial, d.target
    if laws.depth_law is None:
        return d.row("lr depth factor", 1.0, "1: off; scale_depth / sqrt(n_layers) is meant to keep the lr, and how far "
                     "it drifts is measured by `windtunnel fit lr-transfer` on sweeps/lr_depth.yaml (--depth-law)",
                     "command line")
    m = w.model
    r, doublings = winners_rate(d, laws.depth_law, "--depth-law"), math.log2(target.n_layers / m.n_layers)
    why = f"2^({fmt(r['per_doubling'])} octaves per doubling × log2({target.n_layers} / {m.n_layers} layers))"
    if r["ci"]:
        lo, hi = d.lr_ci["lr depth factor"] = tuple(sorted(2.0 ** (c * doublings) for c in r["ci"]))
        why += f"; the drift's 95% interval gives {fmt(lo)}–{fmt(hi)}"
    if not r["low"] <= target.n_layers <= r["high"]:
        why += f"; extrapolated past the measured {fmt(r['low'])}–{fmt(r['high'])} layers"
    return d.row("lr depth factor", 2.0 ** (r["per_doubling"] * doublings), why, laws.depth_law["source"])


def winners_rate(d: Derivation, law: dict, opt: str) -> dict:
    """A drift law's rate for the winner's parametrization, labelled as `fit lr-transfer` labels it."""
    m = d.winner.trial.model
    label = m.parametrization if m.depth_scaling == "sqrt" else f"{m.parametrization}/depth:{m.depth_scaling}"
    if label not in law["rates"]:
        raise ConfigError(f"{opt}: {law['source']} has no drift for the winner's {label!r} "
                          f"(it has {', '.join(sorted(law['rates']))})")
    return law["rates"][label]


def lr_for_batch(d: Derivation, laws: Laws, lr: float, batch_tokens: int) -> float:
    """MiniCPM keeps μP's lr whatever the batch; PanGu-π Pro scales it with sqrt(batch ratio); a
    measured exponent (docs/laws.md, "The lr and the batch") scales it with (batch ratio)^beta."""
    w = d.winner.trial
    proxy_bs = d.row("proxy batch size (tokens)", w.train.batch_size * w.model.seq_len, "proxy batch_size × seq_len",
                     d.from_winner)
    beta, opt, ratio = laws.lr_batch_exponent, f"--lr-batch-scaling {laws.lr_batch_scaling}", batch_tokens / proxy_bs
    if laws.lr_batch_law is not None:
        r = winners_rate(d, laws.lr_batch_law, "--lr-batch-scaling")
        why = f"(batch tokens / proxy batch tokens)^{fmt(r['per_doubling'])}, beta measured"
        if r["ci"]:
            lo, hi = d.lr_ci["lr batch factor"] = tuple(sorted(ratio ** c for c in r["ci"]))
            why += f"; beta's 95% interval {fmt(r['ci'][0])}–{fmt(r['ci'][1])} gives {fmt(lo)}–{fmt(hi)}"
        if not 1 / (r["high"] / r["low"]) <= ratio <= r["high"] / r["low"]:
            why += f"; extrapolated: the batch ratio {fmt(ratio)} is past the measured ×{fmt(r['high'] / r['low'])}"
        f = d.row("lr batch factor", ratio ** r["per_doubling"], why, laws.lr_batch_law["source"])
    elif beta == 0:
        f = d.row("lr batch factor", 1.0, "1: kept (MiniCPM: μP's lr does not follow the batch)", opt)
    else:
        how = "sqrt(batch tokens / proxy batch tokens) (PanGu-π Pro)" if beta == 0.5 else \
            f"(batch tokens / proxy batch tokens)^{beta:g}"
        f = d.row("lr batch factor", ratio ** beta, how, opt)
    return d.row("optim.lr", lr * f, "base lr × lr batch factor" + lr_interval(d, lr * f), "above")


def lr_interval(d: Derivation, lr: float) -> str:
    """The lr with every measured number it is a product of at its range's ends at once: each comes from
    its own experiment, so this is wider than a joint interval would be."""
    if not d.lr_ci:
        return ""
    point = {r.name: r.value for r in d.rows}
    lo = hi = lr
    for name, (a, b) in d.lr_ci.items():
        lo, hi = lo * a / point[name], hi * b / point[name]
    parts = ["the proxy lr's tie range" if n == "proxy lr" else f"the {n.removeprefix('lr ')}'s 95% interval"
             for n in d.lr_ci]
    which = (", ".join(parts[:-1]) + " and " + parts[-1]) if len(parts) > 1 else parts[0]
    return f"; with {which} at {'their' if len(parts) > 1 else 'its'} ends at once: {fmt(lo)}–{fmt(hi)}"
