"""Device minutes a grid sweep will take, from the population trainer's measured throughput, before
running it (issue 24: estimate each stage first).

    python -m windtunnel.bench.estimate SWEEP [KEY=VALUE ...] [--population K]

Each bundle (trials of one shape, at most K together, run one after another on one GPU) takes the
longer of its FLOPs at the calibrated rate and its steps at a floor per population step, plus a
start-up. Calibration (results/windtunnel/calls.json, H200): mup_hp, 400 trials of 2M tokens at
d_model 256, 8 layers, K = 64, trained in ~241 s, i.e. ~270 TFLOP/s of model FLOPs (evaluations
included) besides ~8 s to start each bundle; the committed batch_size sweep's 1,024-token
steps ran at ~45k tokens/s a process, four processes at once, ~5.7 ms a step: the floor for a step
too small to fill the GPU. An H100 has the H200's bf16 peak and ~0.7x its memory bandwidth: count
the figures as H200's, H100 ~10-20% more. Trials the sweep's `extend` adds past an edge come on top
(each round: the bundles of the groups on an edge).
"""
from __future__ import annotations

import argparse
import itertools
import math
from collections import Counter

from windtunnel.config.trial import with_overrides
from windtunnel.model import flops_per_token

STEP_FLOOR_S = 5.7e-3
BUNDLE_START_S = 8.0
MUP_HP_FLOPS = 400 * 2_007_040 * 6 * (8 * (4 * 256**2 + 3 * 256 * 704) + 16384 * 256) * 1.0
RATE = MUP_HP_FLOPS / (241.5 - 7 * BUNDLE_START_S)
"""Model FLOP/s the population trainer sustained over mup_hp's 7 bundles, less their start-ups
(~2.7e14; attention left out, as it is below)."""


def estimate(cfg, population: int = 64) -> dict:
    """{'trials', 'bundles', 'tokens', 'seconds', 'by_shape': [(shape, trials, seconds)]} of cfg's grid."""
    from windtunnel.config.space import grid_space, parse_search
    from windtunnel.trainer import PER_TRIAL

    space = parse_search(cfg.search, cfg.trial)
    fixed = {n: p.value for n, p in space.items() if p.type == "fixed"}
    per_trial = {f"{s}.{n}" for s, names in PER_TRIAL.items() for n in names}
    shapes: Counter = Counter()
    if cfg.sampler.type != "grid":  # sampled: n_trials of the base shape (a searched shape is not estimated)
        shapes[tuple(sorted((k, v) for k, v in fixed.items() if k not in per_trial))] = cfg.n_trials
    else:
        grid = grid_space(space)
        for point in itertools.product(*grid.values()):
            params = {**dict(zip(grid, point)), **fixed}
            shapes[tuple(sorted((k, v) for k, v in params.items() if k not in per_trial))] += 1
    total_s, total_tokens, rows, bundles = 0.0, 0, [], 0
    for shape, n in sorted(shapes.items()):
        t = with_overrides(cfg.trial, dict(shape))
        vocab = t.model.vocab_size or 16384
        fpt = flops_per_token(t.model, vocab) - 6 * t.model.n_layers * t.model.d_model * t.model.seq_len
        steps = math.ceil(t.train.tokens / (t.train.batch_size * t.model.seq_len))
        seconds = 0.0
        for k in range(0, n, population):
            size = min(population, n - k)
            seconds += max(size * t.train.tokens * fpt / RATE, steps * STEP_FLOOR_S) + BUNDLE_START_S
            bundles += 1
        rows.append((dict(shape), n, seconds))
        total_s += seconds
        total_tokens += n * t.train.tokens
    return {"trials": sum(shapes.values()), "bundles": bundles, "tokens": total_tokens, "seconds": total_s,
            "by_shape": rows}


def main(argv: list[str] | None = None) -> int:
    from windtunnel.config.hydra import load_sweep

    ap = argparse.ArgumentParser(prog="python -m windtunnel.bench.estimate", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--population", type=int, default=64, help="trials per bundle (population.size auto: <= 64)")
    args = ap.parse_args(argv)
    cfg = load_sweep(args.sweep, args.overrides)
    e = estimate(cfg, args.population)
    for shape, n, s in e["by_shape"]:
        print(f"{n:4d} trials  {s / 60:6.2f} min  " + " ".join(f"{k}={v}" for k, v in shape.items()))
    print(f"{cfg.name}: {e['trials']} trials in {e['bundles']} bundles, {e['tokens'] / 1e9:.2f}G tokens, "
          f"~{e['seconds'] / 60:.1f} device-minutes on an H200 (grid only; extension rounds on top)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
