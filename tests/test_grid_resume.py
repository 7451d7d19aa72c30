"""A grid sweep resumed across drivers runs every point of its grid once. Optuna's GridSampler
shuffles its points by its seed and stores only a point's index: a resumed driver that reseeded it
(as the random samplers must be) ran some points twice and others never; `lr_horizon`'s study lost
27 of its 144 points that way. The driver now keeps the grid's seed, runs the points a damaged
study never ran (grid_extend.missing_points), and the tables read a repeated run as REPEAT."""
import itertools
import subprocess
import sys

import optuna
import pandas as pd
import pytest

from windtunnel.config.hydra import load_sweep
from windtunnel.config.space import grid_space, parse_search
from windtunnel.fits.frames import sweep_frame
from windtunnel.grid_extend import MARK, missing_points
from windtunnel.results import trials_frame
from windtunnel.search import _GridSampler, distributions, open_study

GRID = ("sampler.type=grid", "pruner.type=none", "~search.model.init_std", "~search.model.scale_emb",
        "search.optim.lr={type: float, values: [0.001, 0.002, 0.004]}",
        "search.model.d_model={type: categorical, choices: [32, 64]}",
        "search.train.seed={type: categorical, choices: [0, 1]}", "n_trials=12")


def key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def grid_points(cfg) -> set:
    g = grid_space(parse_search(cfg.search, cfg.trial))
    return {key(dict(zip(g, v))) for v in itertools.product(*g.values())}


def ask_and_tell(study, cfg, n):
    for _ in range(n):
        t = study.ask(distributions(cfg))
        study.tell(t, 3.0)


def test_a_resumed_grid_study_asks_each_point_once(tmp_path):
    """5 points, then a resume (open_study again) asks the other 7: the 12 are the grid. Catches a
    resumed sampler seeded anew (before: 2-4 of the 12 repeated, as many never asked)."""
    cfg = load_sweep("quickstart", [f"results_dir={tmp_path}", "tracking.enabled=false", *GRID])
    ask_and_tell(open_study(cfg, tmp_path), cfg, 5)
    study = open_study(cfg, tmp_path)
    ask_and_tell(study, cfg, 7)
    asked = [key(t.params) for t in study.get_trials(deepcopy=False)]
    assert len(set(asked)) == 12 and set(asked) == grid_points(cfg)


def damaged(cfg) -> optuna.Study:
    """A study as the reseeding driver left it: every grid index used once, some points twice."""
    study = optuna.create_study()
    g = grid_space(parse_search(cfg.search, cfg.trial))
    for seed, n in ((0, 5), (5, 7)):
        study.sampler = _GridSampler(g, seed=seed)
        ask_and_tell(study, cfg, n)
    return study


def test_missing_points_are_the_grid_points_no_trial_ran_and_each_is_asked_once(tmp_path):
    cfg = load_sweep("quickstart", [f"results_dir={tmp_path}", "tracking.enabled=false", *GRID])
    study = damaged(cfg)
    ran = {key(t.params) for t in study.get_trials(deepcopy=False)}
    missing = missing_points(study, cfg)
    assert missing and {key(p) for p in missing} == grid_points(cfg) - ran
    for p in missing:  # waiting in the queue: not asked again
        study.enqueue_trial(p, user_attrs={MARK: "missing"})
    assert missing_points(study, cfg) == []
    partial = optuna.create_study(sampler=_GridSampler(grid_space(parse_search(cfg.search, cfg.trial))))
    ask_and_tell(partial, cfg, 5)  # a grid not yet covered: its other points are the sampler's to ask
    assert missing_points(partial, cfg) == []


def test_a_repeated_run_reads_repeat_and_the_fits_leave_it_out(tmp_path):
    """Same parameters and seed twice: the same run, not a replicate; the later one reads REPEAT in
    trials.csv (naming the first) and the fits' frame keeps one row per run."""
    cfg = load_sweep("quickstart", [f"results_dir={tmp_path}", "tracking.enabled=false", *GRID])
    study = damaged(cfg)
    df = trials_frame(study)
    n_repeats = len(study.get_trials(deepcopy=False)) - len({key(t.params) for t in study.get_trials(deepcopy=False)})
    assert n_repeats > 0 and (df.state == "REPEAT").sum() == n_repeats
    first, reason = {}, dict(zip(df.number, df.reason))
    for t in study.get_trials(deepcopy=False):
        n = first.setdefault(key(t.params), t.number)
        assert (df.state[df.number == t.number].item() == "REPEAT") == (n != t.number)
        assert n == t.number or reason[t.number] == f"repeats trial {n} (same parameters and seeds)"
    df["model.parametrization"], df["model.n_layers"] = "mup", 2
    df.to_csv(tmp_path / "trials.csv", index=False)
    assert len(sweep_frame(tmp_path / "trials.csv", "lr-transfer")) == 12 - n_repeats


@pytest.mark.parametrize("first_seed", [0, 1])
def test_a_grid_sweep_stopped_partway_and_resumed_runs_its_grid_once(tmp_path, first_seed):
    """The driver through the CLI: 3 of a 6-point grid, then the same sweep to its end: every point
    run and COMPLETE once. With the first run's sampler.seed 1 (then 0) the two runs number the
    grid differently, as a reseeded driver did: the second runs points the first ran, and the
    driver then runs the ones left out (missing_points); the repeats read REPEAT."""
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "windtunnel.cli", "sweep", "quickstart", "-q", f"results_dir={results}",
           "tracking.enabled=false", "train.tokens=8000", "train.eval_every=8000", "sampler.type=grid",
           "pruner.type=none", "~search.model.init_std", "~search.model.scale_emb", "population.size=3",
           "search.optim.lr={type: float, values: [0.001, 0.002, 0.004]}",
           "search.train.seed={type: categorical, choices: [0, 1]}"]
    for n, seed in ((3, first_seed), (6, 0)):
        run = subprocess.run(cmd + [f"n_trials={n}", f"sampler.seed={seed}"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    trials = pd.read_csv(results / "quickstart" / "trials.csv")
    done = trials[trials.state == "COMPLETE"]
    assert sorted(zip(done["optim.lr"], done["train.seed"])) == [
        (lr, s) for lr in (0.001, 0.002, 0.004) for s in (0, 1)]
    assert set(trials.state) == ({"COMPLETE", "REPEAT"} if first_seed else {"COMPLETE"})
