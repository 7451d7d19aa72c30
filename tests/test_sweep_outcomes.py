"""What a sweep makes of its trials besides training them: the shipped sweep files ask valid
trials; the pruner stops bad trials early but never a finished one; the best trial's config,
re-run with `windtunnel trial`, gives its loss back; a trial past its time limit is retried, then
failed with its reason. And what `windtunnel sweep` says when it ends: failures, a complete
sweep, where the best is."""
import itertools
import os
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from helpers import quickstart_study
from windtunnel.config.trial import with_overrides
from windtunnel.config.hydra import load_sweep
from windtunnel.sweep import Driver
from windtunnel.config.space import grid_space, parse_search
from windtunnel.trainer import bundle_key

TS = optuna.trial.TrialState
SWEEPS = sorted(p.stem for p in (Path(__file__).parents[1] / "sweeps").glob("*.yaml"))
TOKENS = 60 * 1024  # quickstart's steps are 1024 tokens: evaluations at 10, 20, ... 59 steps


def _sweep(results, *overrides, rc=0, timeout=600) -> subprocess.CompletedProcess:
    """`windtunnel sweep quickstart` into results (a later override wins), which must exit rc."""
    cmd = [sys.executable, "-m", "windtunnel.cli", "sweep", "quickstart", "-q", f"results_dir={results}",
           "tracking.enabled=false", f"train.tokens={TOKENS}", "train.eval_every=10000", *overrides]
    run = subprocess.run(cmd, cwd=results.parent, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == rc, run.stdout[-2000:] + run.stderr[-2000:]
    return run


@pytest.mark.parametrize("name", SWEEPS)
def test_shipped_sweep_files_ask_valid_trials(tmp_path, name):
    """The GPU sweeps never run on CI: here each is loaded, its first bundles asked (a grid sweep's
    whole grid) and grouped; a sampled config its checks refuse would fail its trial at once."""
    cfg = load_sweep(name, [f"results_dir={tmp_path}", "tracking.enabled=false"])
    driver = Driver(cfg, progress=False)
    try:
        grid = cfg.sampler.type == "grid"
        n = cfg.n_trials if grid else min(cfg.n_trials, 2 * driver.K)
        driver.ask_bundles(n)
        failed = [(t.number, t.user_attrs.get("result")) for t in driver.study.get_trials(states=(TS.FAIL,))]
        assert not failed
        asked = [t for b in driver.ready for t in b.trials]
        assert len(asked) == n
        for b in driver.ready:  # a bundle is one population: same shapes, at most K trials
            keys = {bundle_key(with_overrides(cfg.trial, {**t.params, **driver.fixed})) for t in b.trials}
            assert len(keys) == 1 and len(b.trials) <= driver.K
        if grid:  # n_trials covers the grid exactly, each point once
            points = grid_space(parse_search(cfg.search, cfg.trial))
            assert cfg.n_trials == len(list(itertools.product(*points.values())))
            assert len({tuple(sorted(t.params.items())) for t in asked}) == n
    finally:
        driver._lock.close()


def test_pruning_stops_bad_trials_early_and_the_best_config_reproduces(tmp_path, capsys):
    """lr down to 1e-6 gives the median pruner bad trials to stop. A trial that reached its budget
    was pruned at its last evaluation (and lost its loss). best.yaml records how its trial was
    trained (a CPU's threads set the order of float sums); re-run, it gives the same loss."""
    results = tmp_path / "results"
    _sweep(results, "n_trials=8", "executor.workers=1", "population.size=1", "sampler.n_startup_trials=8",
           "search.optim.lr.low=1e-6", "pruner.type=median", "pruner.n_startup_trials=2", "pruner.n_warmup_evals=1")
    study = quickstart_study(results)
    trials = study.get_trials()
    pruned = [t for t in trials if t.state == TS.PRUNED]
    done = [t for t in trials if t.state == TS.COMPLETE]
    assert pruned and done and len(pruned) + len(done) == 8
    budget = done[0].user_attrs["result"]["tokens"]
    assert all(t.user_attrs["result"]["tokens"] == budget for t in done)
    assert all(t.user_attrs["result"]["tokens"] < budget for t in pruned)  # stopped early, never at the end
    df = pd.read_csv(results / "quickstart" / "trials.csv")
    assert sorted(df[df.state == "PRUNED"].number) == sorted(t.number for t in pruned)

    best = yaml.safe_load((results / "quickstart" / "best.yaml").read_text())
    assert best["value"] == study.best_value and best["trained_with"]["population"] == 1
    assert best["trained_with"]["threads"] == 1  # executor.threads_per_worker
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    rerun = subprocess.run([sys.executable, "-m", "windtunnel.cli", "trial", "--config",
                            str(results / "quickstart" / "best.yaml"), "--json"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout)["final_val_loss"] == study.best_value
    assert "1 CPU thread(s), as the sweep trained it" in rerun.stderr and "other tokens" not in rerun.stderr
    # re-run on other tokens, it says its loss will not come back
    from windtunnel.commands.trial import _as_trained
    from windtunnel.config.trial import trial_from_dict, with_overrides

    _as_trained(str(results / "quickstart" / "best.yaml"),
                with_overrides(trial_from_dict(best["trial"]), {"data.max_bytes": 20000}))
    assert "holds other tokens than the sweep trained this trial on (source_hash" in capsys.readouterr().err


def test_a_trial_past_its_time_limit_is_retried_then_failed_with_its_reason(tmp_path):
    results = tmp_path / "results"
    run = _sweep(results, "n_trials=1", "executor.workers=1", "population.size=1", "pruner.type=none",
                 "train.tokens=50000000", "executor.trial_timeout_s=4", "executor.retries=1", rc=1)
    assert "windtunnel sweep: all 1 trials of this run failed" in run.stderr
    trials = quickstart_study(results).get_trials()
    assert [t.state for t in trials] == [TS.FAIL, TS.FAIL]
    first, second = trials
    assert first.user_attrs["retried"] and "timed out after 4 s; retried" in first.user_attrs["reason"]
    assert second.user_attrs["retry_of"] == first.number and second.params == first.params
    assert second.user_attrs["result"]["reason"] == "timed out after 4 s (attempt 2, no retries left)"
    ps = subprocess.run(["pgrep", "-f", f"windtunnel.worker {results}"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""  # the cancelled workers are gone


QUICK = ("train.tokens=16000", "train.eval_every=8000")  # two evaluations: enough to end a sweep


def test_a_run_whose_every_trial_failed_exits_1_without_a_best(tmp_path):
    """It exited 0 and printed `best: .../best.yaml`, a file never written."""
    results = tmp_path / "results"
    # a vocab below the data's 256: every worker refuses it
    p = _sweep(results, *QUICK, "n_trials=2", "model.vocab_size=100", rc=1)
    assert "(0 ok, 0 pruned, 2 failed this run)" in p.stdout and "best:" not in p.stdout
    d = results / "quickstart"
    assert p.stderr.strip().splitlines()[-1] == (f"windtunnel sweep: all 2 trials of this run failed; their reasons: "
                                                 f"{d}/trials.csv, their workers' logs: {d}/bundles/*/worker.log")
    assert not (d / "best.yaml").exists() and list(d.glob("bundles/*/worker.log"))


def test_a_complete_sweep_says_so_and_how_to_add_trials(tmp_path):
    results = tmp_path / "results"
    p = _sweep(results, *QUICK, "n_trials=1")
    assert "best:" in p.stdout, p.stdout + p.stderr
    p = _sweep(results, *QUICK, "n_trials=1")
    assert p.stdout.splitlines()[0] == ("quickstart: already complete: 1 trials; raise n_trials (now 1) to add more, "
                                      "e.g. n_trials=2")
    assert "best:" in p.stdout

def test_wsd_branches_of_a_sweep_feed_the_scaling_law(tmp_path):
    """MiniCPM's data-model scaling from a real sweep: one stable run per size, decays branched at
    three token counts; the sweep writes every branch's loss to branches.csv, and `fit wsd` reads
    the folder. A law needs three sizes: with two it fits any exponent, so it is refused."""
    results = tmp_path / "results"
    _sweep(results, "n_trials=3", "sampler.type=grid", "pruner.type=none", "population.size=1",
           "train.branch_at=[15000,30000,45000]", "~search.optim.lr", "~search.model.init_std",
           "~search.model.scale_emb", "search.model.d_model={type: categorical, choices: [32, 48, 64]}")
    branches = pd.read_csv(results / "quickstart" / "branches.csv")
    assert len(branches) == 9 and sorted(branches["decay_from"].unique()) == [15000, 30000, 45000]

    def fit(*args):
        run = subprocess.run([sys.executable, "-m", "windtunnel.cli", "fit", *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        return run.returncode, run.stdout, run.stderr

    rc, out, err = fit("wsd", "--input", str(results / "quickstart"), "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert len(d["points"]) == 9 and {p["model"] for p in d["points"]} == {"d32", "d48", "d64"}
    law = d["scaling_law"]
    assert law["n_points"] == 9 and law["A"] > 0 and law["B"] > 0
    rc, out, err = fit("scaling-law", "--input", str(results / "quickstart"), "--json")  # the same rows, as N, D, loss
    assert rc == 0, err
    assert {k: json.loads(out)[k] for k in ("E", "alpha", "beta", "n_points")} == pytest.approx(
        {k: law[k] for k in ("E", "alpha", "beta", "n_points")}, rel=1e-6)
    two = branches[branches["model.d_model"] != 64].rename(columns={"n_params": "N", "tokens": "D",
                                                                    "final_val_loss": "loss"})
    two.to_csv(tmp_path / "two.csv", index=False)
    rc, out, err = fit("scaling-law", "--input", str(tmp_path / "two.csv"))
    assert rc == 2 and err.count("\n") == 1
    assert "columns 'N','D': >= 3 distinct values of each are needed" in err and "(got 2 N, 3 D)" in err
