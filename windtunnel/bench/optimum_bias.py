"""How far the grid optimum (fits.optimum.parabola_min) lands from the true optimum, by how many
neighbours each side its parabola takes, on loss curves shaped like the committed lr sweeps.

    python -m windtunnel.bench.optimum_bias [--draws 2000] [--out results/windtunnel] [--sweeps DIR ...]

--sweeps: each committed lr sweep's optima both ways, what taking 3 points instead of 5 moved.

Each draw samples a curve in log2(lr) on a ×2 grid of 7 points at a random offset from the true
optimum, adds Gaussian noise to each point, and takes the vertex. A loss curve with a cliff on the
high-lr side (lr_validate_check's 30M-token curve: the loss rose 1.1 nats one ×2 step past its
lowest point, having fallen 0.06 the step before) pulls a parabola over five points towards low lrs.
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy.optimize import minimize_scalar

from windtunnel.bench import write_results
from windtunnel.fits.optimum import parabola_min

SHAPES = {  # loss(x), x = log2(lr / lr*) before the cliff term moves the optimum
    "symmetric parabola": lambda x: 0.1 * x**2,
    "mild asymmetry": lambda x: 0.08 * x**2 + 0.02 * np.exp(1.5 * (x - 1.0)),
    "cliff on the high side": lambda x: 0.08 * x**2 + 0.05 * np.exp(2.5 * (x - 1.0)),
}
NOISE = (0.0, 0.015)  # sd of a grid point's mean loss (2 seeds at the proxy's ~0.004-0.03 seed-sd)


def measure(draws: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for name, f in SHAPES.items():
        x0 = minimize_scalar(f, bounds=(-4, 4), method="bounded").x
        for noise in NOISE:
            err = {1: [], 2: []}
            for _ in range(draws):
                x = np.arange(-3, 4) + rng.uniform(0, 1)
                y = f(x) + rng.normal(0, noise, len(x))
                for hw in err:
                    err[hw].append(parabola_min(x, y, half_window=hw)[0] - x0)
            for hw, e in err.items():
                e = np.asarray(e)
                rows.append({"shape": name, "noise": noise, "points": 2 * hw + 1, "bias": float(e.mean()),
                             "rmse": float(np.sqrt(np.mean(e**2)))})
    return rows


def sweep_rows(paths: list[str]) -> list[dict]:
    """Per (parametrization, width, depth) of each lr sweep: the optimum through 5 and through 3 points."""
    from windtunnel import fits

    rows = []
    for path in paths:
        df = fits.load_csv(path, "lr-transfer")
        keys = [k for k in ("parametrization", "width", "depth") if k in df.columns]
        for group, d in df.groupby(keys):
            m = d.groupby("lr")["loss"].mean()
            x, y = np.log2(m.index.to_numpy()), m.to_numpy()
            five, three = (2.0 ** parabola_min(x, y, half_window=hw)[0] for hw in (2, 1))
            rows.append({"sweep": path, "group": " ".join(str(g) for g in group), "lr_5": five, "lr_3": three,
                         "octaves": float(np.log2(three / five))})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--out", help="write optimum_bias.md/.json here")
    p.add_argument("--sweeps", nargs="*", default=[], metavar="DIR", help="committed lr sweeps to fit both ways")
    a = p.parse_args(argv)
    rows = measure(a.draws)
    lines = ["| loss curve | noise sd | parabola through | bias (octaves) | rms error (octaves) |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['noise']} | {r['points']} points | {r['bias']:+.2f} | {r['rmse']:.2f} |" for r in rows]
    swept = sweep_rows(a.sweeps)
    if swept:
        lines += ["", "| sweep | group | optimum, 5 points | optimum, 3 points | moved (octaves) |", "|---|---|---|---|---|"]
        lines += [f"| {r['sweep']} | {r['group']} | {r['lr_5']:.3g} | {r['lr_3']:.3g} | {r['octaves']:+.2f} |" for r in swept]
    table = "\n".join(lines)
    print(table)
    if a.out:
        cmd = " ".join(["python -m windtunnel.bench.optimum_bias", f"--draws {a.draws}", f"--out {a.out}",
                        *(["--sweeps", *a.sweeps] if a.sweeps else [])])
        write_results(a.out, "optimum_bias", {"draws": rows, "sweeps": swept},
                      f"# Where the grid optimum lands\n\nCommand: `{cmd}` (CPU, seeded)\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
