"""A grid sweep's lr axis grows past an edge optimum (sweep option `extend`, windtunnel/grid_extend.py):
which trials are added, once per replicate, never twice, never past max_steps; and a real sweep runs
them after its grid and stops with each optimum inside its grid or max_steps spent."""
import subprocess
import sys

import optuna
import pandas as pd
import pytest

from windtunnel.config.hydra import load_sweep
from windtunnel.errors import ConfigError
from windtunnel.grid_extend import MARK, edge_points
from windtunnel.search import distributions

LRS = [0.001, 0.002, 0.004]
GRID = ("sampler.type=grid", "pruner.type=none", "~search.model.init_std", "~search.model.scale_emb",
        f"search.optim.lr={{type: float, values: {LRS}}}",
        "search.model.d_model={type: categorical, choices: [32, 64]}",
        "search.train.seed={type: categorical, choices: [0, 1]}", "n_trials=12")


def config(tmp_path, *more):
    return load_sweep("quickstart", [f"results_dir={tmp_path}", "tracking.enabled=false", *GRID,
                                     "extend.param=optim.lr", "extend.max_steps=2", *more])


def add(study, cfg, lr, d, seed, loss=None, diverged=False):
    params = {"optim.lr": lr, "model.d_model": d, "train.seed": seed}
    dists = distributions(cfg)
    state = optuna.trial.TrialState.FAIL if diverged else optuna.trial.TrialState.COMPLETE
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions={k: dists[k] for k in params}, state=state,
        value=None if diverged else loss, user_attrs={"result": {"status": "diverged" if diverged else "ok"}}))


def test_edge_points_extend_each_edge_group_once_per_replicate_and_stop(tmp_path):
    """Width 32's loss falls with lr (best at the grid's top): lr 0.008 is added for both seeds;
    width 64's best is interior: nothing. Catches: an edge taken from one seed, a replicate
    forgotten, a point asked twice while it waits, a diverged point read as a finite loss, and a
    group extended past max_steps."""
    cfg = config(tmp_path)
    study = optuna.create_study()
    for seed in (0, 1):
        for lr in LRS:
            add(study, cfg, lr, 32, seed, 3.0 - lr)
            add(study, cfg, lr, 64, seed, 3.0 + (lr - 0.002) ** 2)
    new = edge_points(study, cfg)
    assert sorted((p["optim.lr"], p["model.d_model"], p["train.seed"], side) for p, side in new) == [
        (0.008, 32, 0, "high"), (0.008, 32, 1, "high")]
    for p, side in new:  # waiting in the queue: not asked again
        study.enqueue_trial(p, user_attrs={MARK: side})
    assert edge_points(study, cfg) == []

    study = optuna.create_study()  # the added points diverged: the optimum is interior after all
    for seed in (0, 1):
        for lr in LRS:
            add(study, cfg, lr, 32, seed, 3.0 - lr)
        add(study, cfg, 0.008, 32, seed, diverged=True)
    assert edge_points(study, cfg) == []

    study = optuna.create_study()  # still falling after max_steps (2) points past the grid: stop
    for lr in LRS + [0.008, 0.016]:
        add(study, cfg, lr, 32, 0, 3.0 - lr)
    assert edge_points(study, cfg) == []
    study = optuna.create_study()  # the low edge likewise
    for lr in LRS:
        add(study, cfg, lr, 64, 1, 3.0 + lr)
    assert [(p["optim.lr"], side) for p, side in edge_points(study, cfg)] == [(0.0005, "low"), (0.0005, "low")]


def test_extend_needs_a_float_axis_of_a_grid(tmp_path):
    with pytest.raises(ConfigError, match="extend.param"):
        config(tmp_path, "sampler.type=tpe")
    with pytest.raises(ConfigError, match="extend.param"):
        config(tmp_path, "extend.param=model.d_model")
    with pytest.raises(ConfigError, match="extend.factor"):
        config(tmp_path, "extend.factor=1")


@pytest.mark.slow
def test_a_sweep_runs_its_extension_after_the_grid(tmp_path):
    """lrs far too small for 16k tokens: the loss falls with lr (common seeds: no init noise between
    trials), so the sweep adds x2 points above the grid, one round after the other, until max_steps
    (2): 3 grid + 2 extension trials, all finished and told; a second run adds none. Catches a
    driver that stops at n_trials, or keeps adding past max_steps."""
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "windtunnel.cli", "sweep", "quickstart", "-q", f"results_dir={results}",
           "tracking.enabled=false", "train.tokens=16000", "train.eval_every=8000", "sampler.type=grid",
           "pruner.type=none", "~search.model.init_std", "~search.model.scale_emb", "population.size=3",
           "search.optim.lr={type: float, values: [1.0e-6, 2.0e-6, 4.0e-6]}", "n_trials=3",
           "extend.param=optim.lr", "extend.max_steps=2", "seeds=common"]
    for _ in range(2):
        run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        trials = pd.read_csv(results / "quickstart" / "trials.csv")
        assert sorted(trials["optim.lr"]) == pytest.approx([1e-6, 2e-6, 4e-6, 8e-6, 1.6e-5])
        assert (trials["state"] == "COMPLETE").all()


def test_two_axes_grow_from_the_groups_best_cell():
    """extend.param 'optim.lr,model.init_std': the best cell is (lr 0.002, init_std 0.05), init_std on
    its grid's low edge: init_std 0.025 is added at every lr (a whole row) for each seed, nothing for
    the interior lr. Catches the second axis ignored, or a row left incomplete."""
    cfg = load_sweep("quickstart", ["results_dir=/tmp/unused", "tracking.enabled=false", "sampler.type=grid",
                                    "pruner.type=none", "~search.model.scale_emb",
                                    f"search.optim.lr={{type: float, values: {LRS}}}",
                                    "search.model.init_std={type: float, values: [0.05, 0.1, 0.2]}",
                                    "search.train.seed={type: categorical, choices: [0, 1]}", "n_trials=18",
                                    "extend.param='optim.lr,model.init_std'"])
    dists = distributions(cfg)
    assert dists["model.init_std"].low < 0.05 / 8 and dists["optim.lr"].high > 0.004 * 8
    study = optuna.create_study()
    for lr in LRS:
        for std in (0.05, 0.1, 0.2):
            for seed in (0, 1):
                params = {"optim.lr": lr, "model.init_std": std, "train.seed": seed}
                study.add_trial(optuna.trial.create_trial(
                    params=params, distributions={k: dists[k] for k in params},
                    value=3.0 + 100 * (lr - 0.002) ** 2 + 0.1 * std))
    new = edge_points(study, cfg)
    assert sorted((p["optim.lr"], p["model.init_std"], p["train.seed"], side) for p, side in new) == [
        (lr, 0.025, seed, "low") for lr in LRS for seed in (0, 1)]
