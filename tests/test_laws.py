"""Issues 23 and 24's laws: depth transfer, the batch-size law with the lr tuned per size, the
training-horizon law, and the bootstrap every interval comes from. Synthetic data from a known law:
the fit recovers it within its interval; a fit whose optimum is not inside its grid says so."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from windtunnel import fits
from windtunnel.cli import main
from windtunnel.errors import ConfigError

N_BOOT = 300
LRS = 2.0 ** np.arange(-12.0, -3.9, 1.0)  # 9 lrs, x2 apart
DEPTHS = (4, 8, 16, 32)
DRIFT = {"mup": 0.2, "mup/depth:none": -1.5}  # octaves over 4 -> 32 layers (3 doublings)


def depth_sweep(seeds=(0, 1), noise=2e-3, seed=0) -> pd.DataFrame:
    """Loss a parabola in log2 lr around lr*(L) = 2^(-8.3 + drift · log2(L/4) / 3), per run."""
    rng = np.random.default_rng(seed)
    rows = []
    for p, drift in DRIFT.items():
        for depth in DEPTHS:
            x0 = -8.3 + drift * np.log2(depth / 4) / 3
            for lr in LRS:
                for s in seeds:
                    loss = 3.5 - 0.05 * np.log2(depth) + 0.03 * (np.log2(lr) - x0) ** 2 + noise * rng.standard_normal()
                    rows.append({"parametrization": p, "width": 256, "depth": depth, "lr": lr, "seed": s, "loss": loss})
    return pd.DataFrame(rows)


def test_depth_transfer_recovers_the_drift_within_its_interval_and_judges_the_goal():
    """μP drifts +0.2 octave over 8x depth (goal: < 0.5, met); the control -1.5 (not met). Catches
    a drift taken across width instead of depth, a sign flip, intervals that miss the truth, and a
    goal judged on the wrong side. (With 2 seeds the 95% interval held the truth in ~85% of 40 such
    data sets: docs/laws.md; this one, seed 2, is among them.)"""
    fit = fits.fit_lr_transfer(depth_sweep(seed=2), bootstrap_n=N_BOOT)
    assert fit.resamples == N_BOOT and len(fit.optima) == 8
    for p, truth in DRIFT.items():
        d = fit.drift(p, "depth")
        assert (d.low, d.high, d.at) == (4, 32, 256) and d.goal_octaves == pytest.approx(0.5)
        assert d.octaves == pytest.approx(truth, abs=0.1)
        assert d.ci[0] <= truth <= d.ci[1] and d.ci[1] - d.ci[0] < 0.3, d
        assert fit.drift(p, "width") is None and fit.drift_steps[p] is None
    assert fit.drift("mup", "depth").goal_met and fit.drift("mup", "depth").goal_met_95
    assert fit.drift("mup/depth:none", "depth").goal_met is False
    for o in fit.optima:
        lo, hi = o.lr_opt_ci
        assert lo < o.lr_opt < hi and not o.at_edge
    one_seed = fits.fit_lr_transfer(depth_sweep(seeds=(0,)), bootstrap_n=N_BOOT)  # no replicate: no interval
    assert one_seed.resamples == 0 and one_seed.drift("mup", "depth").ci is None
    assert one_seed.drift("mup", "depth").goal_met_95 is None and one_seed.drift("mup", "depth").goal_met


def test_an_optimum_whose_parabola_rests_on_a_one_seed_lr_gets_no_interval(tmp_path, capsys):
    """Resampling moves only the cells with several runs: with a second seed missing at an lr next to
    the optimum the interval would hold half the noise (validate_0.5b_v2 had [1.70, 1.74] so). A lr
    with one seed far from the optimum (a diverged or lost run) leaves the interval as it was."""
    df = depth_sweep(seed=2)
    one = (df["parametrization"] == "mup") & (df["depth"] == 4)
    x0 = np.log2(df["lr"])
    near = one & (x0 == -8.0) & (df["seed"] == 1)  # the lr closest to the optimum 2^-8.3
    far = one & (x0 == -12.0) & (df["seed"] == 1)  # the grid's smallest lr
    full = fits.fit_lr_transfer(df, bootstrap_n=N_BOOT)
    thin = fits.fit_lr_transfer(df[~near], bootstrap_n=N_BOOT)
    o = next(o for o in thin.optima if o.parametrization == "mup" and o.depth == 4)
    assert o.thin and o.lr_opt_ci is None
    assert thin.drift("mup", "depth").ci is None and thin.drift("mup/depth:none", "depth").ci is not None
    assert all(not o.thin and o.lr_opt_ci for o in thin.optima if (o.parametrization, o.depth) != ("mup", 4))
    lost_far = fits.fit_lr_transfer(df[~far], bootstrap_n=N_BOOT)
    assert [o.lr_opt_ci is not None and not o.thin for o in lost_far.optima] == [True] * 8
    assert lost_far.drift("mup", "depth").ci == pytest.approx(full.drift("mup", "depth").ci, abs=0.05)
    df[~near].to_csv(tmp_path / "thin.csv", index=False)
    assert main(["fit", "lr-transfer", "-i", str(tmp_path / "thin.csv"), "--bootstrap", "50"]) == 0
    assert "rests on an lr with one run while others have several: mup width 256 depth 4 (run" in capsys.readouterr().out


def test_depth_goal_is_not_judged_when_an_optimum_sits_on_the_edge(tmp_path, capsys):
    df = depth_sweep()
    cut = (df["parametrization"] == "mup") & (df["depth"] == 32) & (np.log2(df["lr"]) > -9.5)
    fit = fits.fit_lr_transfer(df[~cut], bootstrap_n=0)
    d = fit.drift("mup", "depth")
    assert d.edge and d.goal_met is None
    df[~cut].to_csv(tmp_path / "depth.csv", index=False)
    assert main(["fit", "lr-transfer", "-i", str(tmp_path / "depth.csv"), "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "not measured: an optimum sat on the lr grid's edge" in out
    assert "optimum on the lr grid's edge" in out and "mup width 256 depth 32" in out
    assert "mup/depth:none: -1.5" in out and "NOT met" in out


def test_lr_transfer_reads_depth_and_the_control_from_a_sweeps_trials(tmp_path, capsys):
    """trials.csv of sweeps/lr_depth.yaml: n_layers is the depth, depth_scaling none a parametrization
    of its own, each trial a run (its number)."""
    df = depth_sweep()
    p = df["parametrization"]
    t = pd.DataFrame({"number": range(len(df)), "state": "COMPLETE", "value": df["loss"], "optim.lr": df["lr"],
                      "model.d_model": 256, "model.n_layers": df["depth"], "model.parametrization": "mup",
                      "model.depth_scaling": np.where(p == "mup", "sqrt", "none"), "train.seed": df["seed"]})
    t.to_csv(tmp_path / "trials.csv", index=False)
    assert main(["fit", "lr-transfer", "-i", str(tmp_path), "--json", "--bootstrap", "50"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {o["parametrization"] for o in d["optima"]} == set(DRIFT) and d["resamples"] == 50
    assert {o["depth"] for o in d["optima"]} == set(DEPTHS)


# ----------------------------------------------------------------------------- batch size

BS = 2.0 ** np.arange(11, 17)  # 2k .. 64k tokens
A_BS, B_BS = 4.0e7, 6.0


def bs_curves(seeds=(0, 1), lrs=2.0 ** np.arange(-12.0, -4.9), seed=0) -> pd.DataFrame:
    """Per (model, tokens): loss = L0 + 0.015 ln(bs/bs_opt)^2 + 0.02 (log2 lr - log2 lr*(bs))^2, bs_opt
    = a / L0^b, lr*(bs) ∝ sqrt(bs); each run its own offset (shared by its evaluations) and a little
    noise per evaluation."""
    rng = np.random.default_rng(seed)
    rows, run = [], 0
    for m, n in (("d128", 1.0), ("d256", 2.0), ("d512", 4.0)):
        for bs in BS:
            for lr in lrs:
                for s in seeds:
                    offset = 3e-3 * rng.standard_normal()
                    for t in (1e6, 2e6, 4e6, 8e6):
                        L0 = 2.6 + 0.6 / n**0.3 + 0.5 * (1e6 / t) ** 0.3
                        bs_opt = A_BS / L0**B_BS
                        x0 = np.log2(0.004 * np.sqrt(bs / 8192))
                        loss = (L0 + 0.015 * np.log(bs / bs_opt) ** 2 + 0.02 * (np.log2(lr) - x0) ** 2 + offset
                                + 5e-4 * rng.standard_normal())
                        rows.append({"model": m, "batch_size": bs, "tokens": t, "lr": lr, "run": run, "loss": loss})
                    run += 1
    return pd.DataFrame(rows)


def test_batch_size_law_with_the_lr_tuned_per_size_lies_in_its_interval():
    """The known a, b lie in the 95% intervals over runs; every lr optimum is interior. Catches the
    lr not tuned (its best lr moves with the batch size, so one lr's curve misplaces the optimum),
    and intervals from evaluations (a run's offset then counts once per evaluation)."""
    fit = fits.fit_batch_size(bs_curves(), bootstrap_n=150)
    assert fit.lr_tuned and fit.resamples == 150 and fit.r2 > 0.95
    assert fit.ci["b"][0] <= B_BS <= fit.ci["b"][1], (fit.b, fit.ci)
    assert fit.ci["a"][0] <= A_BS <= fit.ci["a"][1], (fit.a, fit.ci)
    assert len(fit.lr_optima) == 3 * len(BS) and not any(t.at_edge for t in fit.lr_optima)
    # a and b move together: the batch at a given loss has its own interval, from the refits; the JSON keeps them
    L = float(np.median([p.loss_opt for p in fit.points]))
    lo, hi = fits.batch_size_interval(json.loads(json.dumps(fit.to_dict())), L)
    assert lo < A_BS / L**B_BS < hi and lo < fit.batch_size_opt(L) < hi
    corners = sorted(a / L**b for a in fit.ci["a"] for b in fit.ci["b"])
    assert hi / lo < corners[-1] / corners[0]  # narrower than the separate intervals' corners
    one_lr = bs_curves()
    one_lr = one_lr[one_lr["lr"] == 2.0**-8]
    untuned = fits.fit_batch_size(one_lr.drop(columns="lr"), bootstrap_n=150)
    assert not untuned.lr_tuned and not untuned.ci["b"][0] <= B_BS <= untuned.ci["b"][1]


def test_a_batch_size_law_resting_on_a_one_run_cell_has_no_interval():
    """A lost seed at the best (batch size, lr) of one model: the law rests on that cell, and a resample
    would hold only the other cells' noise, so a, b and a batch's interval at a loss are None; a lost
    seed at the grid's smallest lr leaves them."""
    df = bs_curves()
    d = df[(df["model"] == "d256") & (df["tokens"] == 8e6)]
    best = d.groupby(["batch_size", "lr"])["loss"].mean().idxmin()
    cell = (df["model"] == "d256") & (df["batch_size"] == best[0])
    near = df["run"] == df[cell & (df["lr"] == best[1])]["run"].max()
    far = df["run"] == df[cell & (df["lr"] == df["lr"].min())]["run"].max()
    thin = fits.fit_batch_size(df[~near], bootstrap_n=100)
    assert thin.ci == {"a": None, "b": None} and any(p.thin for p in thin.points if p.model == "d256")
    assert not any(p.thin for p in thin.points if p.model != "d256")
    assert fits.batch_size_interval(json.loads(json.dumps(thin.to_dict())), 3.0) is None
    lost_far = fits.fit_batch_size(df[~far], bootstrap_n=100)
    assert not any(p.thin for p in lost_far.points) and lost_far.ci["b"][0] <= B_BS <= lost_far.ci["b"][1]


def test_batch_size_reports_lr_optima_on_the_edge(tmp_path, capsys):
    df = bs_curves(lrs=2.0 ** np.arange(-11.0, -7.9))  # too small for the big batches: best lr at the top
    fit = fits.fit_batch_size(df, bootstrap_n=0)
    edges = {t.batch_size for t in fit.lr_optima if t.at_edge}
    assert max(BS) in edges and min(BS) not in edges
    df.to_csv(tmp_path / "bs.csv", index=False)
    assert main(["fit", "batch-size", "-i", str(tmp_path / "bs.csv"), "--bootstrap", "0"]) == 0
    out = capsys.readouterr().out
    assert "optimum on the lr grid's edge" in out and "d512 batch 65536" in out and "no intervals" in out


# ----------------------------------------------------------------------------- horizon


def horizon(lrs=2.0 ** np.arange(-12.0, -4.9), noise=1e-3, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for t in (1e6, 4e6, 1.6e7):
        x0 = np.log2(0.5 * t**-0.3)  # 0.0079 at 1M, 0.0035 at 16M
        for lr in lrs:
            for s in (0, 1):
                rows.append({"tokens": t, "lr": lr, "seed": s,
                             "loss": 3 - 0.1 * np.log10(t) + 0.03 * (np.log2(lr) - x0) ** 2 + noise * rng.standard_normal()})
    return pd.DataFrame(rows)


def test_horizon_law_lies_in_its_interval_and_edges_are_said():
    """The known a, b in their intervals (with 2 seeds that held in 24 of 30 such data sets; this is
    seed 1); an optimum past the grid's end is flagged and left out of the law; too few interior
    optima or budgets: a one-line error naming the column. Catches a factor the wrong way round."""
    fit = fits.fit_horizon(horizon(seed=1), bootstrap_n=N_BOOT)
    assert fit.ci["b"][0] <= 0.3 <= fit.ci["b"][1] and fit.ci["a"][0] <= 0.5 <= fit.ci["a"][1], fit.ci
    assert fit.lr_at(4e6) == pytest.approx(0.5 * 4e6**-0.3, rel=0.03) and fit.c is None
    assert fits.horizon_factor(fit.to_dict(), 1e6, 1.6e7) == pytest.approx(16**-fit.b)
    df = horizon()
    cut = (df["tokens"] == 1e6) & (df["lr"] > 0.006)  # 1M's optimum above the grid
    edged = fits.fit_horizon(df[~cut], bootstrap_n=0)
    assert [p.at_edge for p in edged.points] == [True, False, False] and edged.b == pytest.approx(0.3, abs=0.02)
    with pytest.raises(ConfigError, match="edge at tokens 1e\\+06, 4e\\+06"):
        fits.fit_horizon(df[~(cut | ((df["tokens"] == 4e6) & (df["lr"] > 0.004)))], bootstrap_n=0)
    with pytest.raises(ConfigError, match="'tokens': 2 token budgets; >= 3"):
        fits.fit_horizon(df[df["tokens"] < 1e7])


def test_a_horizon_point_resting_on_a_one_run_cell_gives_neither_it_nor_the_law_an_interval():
    """lr_horizon had it: at 1M and 4M tokens the best lr's cell held one run among cells of two or
    three, and the law's b printed [0.005, 0.061], an interval holding only the other cells' noise."""
    df = horizon(seed=1)
    x = np.log2(df["lr"])
    near = (df["tokens"] == 4e6) & (x == np.round(np.log2(0.5 * 4e6**-0.3))) & (df["seed"] == 1)
    far = (df["tokens"] == 4e6) & (x == -12.0) & (df["seed"] == 1)
    thin = fits.fit_horizon(df[~near], bootstrap_n=N_BOOT)
    assert [p.thin for p in thin.points] == [False, True, False] and thin.points[1].lr_opt_ci is None
    assert thin.ci == {"a": None, "b": None} and thin.points[0].lr_opt_ci is not None
    lost_far = fits.fit_horizon(df[~far], bootstrap_n=N_BOOT)
    assert not any(p.thin for p in lost_far.points) and lost_far.ci["b"][0] <= 0.3 <= lost_far.ci["b"][1]


# ----------------------------------------------------------------------------- bootstrap and estimate


def test_bootstrap_resamples_whole_runs_within_cells_and_stretches_for_few_seeds():
    """A run's rows move together (one unit); cells keep their count; with 2 runs a cell the spread
    is stretched by sqrt(2); one run a cell gives no interval; the same seed the same interval."""
    df = pd.DataFrame({"cell": [0, 0, 0, 0, 1, 1], "run": [0, 0, 1, 1, 2, 3], "y": [0.0, 0.0, 1.0, 1.0, 5.0, 5.0]})
    groups = fits.units(df, ["cell"], ["run"])
    assert [sorted(map(sorted, map(list, us))) for us in groups] == [[[0, 1], [2, 3]], [[4], [5]]]
    y = df["y"].to_numpy()
    stat = lambda idx: {"mean0": y[idx][idx < 4].mean(), "rows": float(len(idx))}  # noqa: E731
    b = fits.bootstrap(groups, stat, n=400, seed=1)
    assert b["rows"] == (6.0, 6.0)
    lo, hi = b["mean0"]  # resampled means 0, 0.5, 1 around 0.5: percentiles 0 and 1, stretched by sqrt(2)
    assert (lo, hi) == pytest.approx((0.5 - 0.5 * 2**0.5, 0.5 + 0.5 * 2**0.5))
    assert fits.bootstrap(groups, stat, n=400, seed=1).intervals == b.intervals
    single = fits.units(df.drop_duplicates("cell"), ["cell"], ["run"])
    assert fits.bootstrap(single, stat, n=400).intervals == {"mean0": None, "rows": None}


def test_estimate_is_calibrated_on_mup_hp_and_grows_with_depth():
    from windtunnel.bench.estimate import estimate
    from windtunnel.config.hydra import load_sweep

    mup = estimate(load_sweep("mup_hp", ["train.tokens=2000000", "n_trials=400"]))
    assert mup["seconds"] == pytest.approx(241.5, rel=0.01)  # the measured sweep it is calibrated on
    depth = estimate(load_sweep("lr_depth", []))
    secs = [s for _, _, s in depth["by_shape"]]
    assert depth["trials"] == 144 and secs == sorted(secs) and secs[-1] > 2 * secs[0]


@pytest.mark.parametrize("sweep", sorted(f.stem for f in (Path(__file__).parents[1] / "sweeps").glob("*.yaml")))
def test_every_sweep_file_composes_into_a_full_grid(sweep):
    """A sweep file that would first fail on the lent GPU fails here: it composes, and a grid's
    n_trials covers every cell of it (a sweep past its grid is refused; one short of it leaves cells out)."""
    from windtunnel.bench.estimate import estimate
    from windtunnel.config.hydra import load_sweep

    cfg = load_sweep(sweep, [])
    e = estimate(cfg)
    if cfg.sampler.type == "grid":
        assert e["trials"] == cfg.n_trials, (e["trials"], cfg.n_trials)


def test_batch_size_reads_the_lr_and_each_run_from_a_sweeps_curves(tmp_path, capsys):
    """curves.csv of sweeps/batch_size.yaml: optim.lr tunes, the trial number is the run (its
    evaluations one unit), so 2 seeds a cell give intervals. Catches the lr column dropped (lr not
    tuned) and runs taken from rows (every evaluation a unit)."""
    df = bs_curves()
    curves = pd.DataFrame({"number": df["run"], "state": "COMPLETE", "model.d_model": df["model"].str[1:].astype(int),
                           "train.batch_size": (df["batch_size"] // 1024).astype(int), "optim.lr": df["lr"],
                           "tokens": df["tokens"].astype(int), "val_loss": df["loss"]})
    curves.to_csv(tmp_path / "curves.csv", index=False)
    (tmp_path / "best.yaml").write_text("trial:\n  model: {seq_len: 1024}\n  train: {eval_every: 1000000}\n")
    assert main(["fit", "batch-size", "-i", str(tmp_path), "--json", "--bootstrap", "40"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["lr_tuned"] and d["resamples"] == 40 and d["ci"]["b"][0] < d["b"] < d["ci"]["b"][1]
    want = fits.fit_batch_size(df, bootstrap_n=40).to_dict()
    assert d["b"] == pytest.approx(want["b"]) and d["ci"]["b"] == pytest.approx(want["ci"]["b"])
