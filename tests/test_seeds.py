"""Each trial of a sweep draws its own init and data seeds (seeds=per_trial, the default), keeps
them through a retry, and a sweep may still ask for common random numbers (seeds=common). A study
made before seeds existed (every trial on train.seed) resumes only as common."""
import json

import optuna
import pytest

from windtunnel.config.hydra import load_sweep
from windtunnel.errors import ConfigError
from windtunnel.search import open_storage
from windtunnel.sweep import Driver
from windtunnel.config.sweep import trial_seeds

TS = optuna.trial.TrialState


def _driver(tmp_path, *overrides):
    cfg = load_sweep("quickstart", [f"results_dir={tmp_path}", "tracking.enabled=false", "data.max_bytes=300000",
                                    "population.size=2", *overrides])
    return Driver(cfg, progress=False)


def _asked(driver, n):
    driver.ask_bundles(n)
    return [t for b in driver.ready for t in b.trials]


def test_trial_seeds_are_distinct_per_trial_stream_and_sweep_seed_and_reproducible():
    """Catches a derivation that ignores the trial number, the stream (confirm's replicates would
    replay a search's draws) or the sweep's seed, or that is not a pure function."""
    seen = {trial_seeds(s, i, stream) for s in (0, 1) for i in range(50) for stream in (0, 1)}
    assert len(seen) == 200
    assert trial_seeds(3, 7, 1) == trial_seeds(3, 7, 1)
    init, data = trial_seeds(0, 0)
    assert init != data and all(0 <= x < 2**32 for x in (init, data))


def test_per_trial_seeds_by_default_kept_by_a_retry_and_common_on_request(tmp_path):
    """Catches: every trial on train.seed (the old behaviour, no noise between trials); a retry that
    draws new seeds (a worker's death would change the trial's result); seeds=common ignored."""
    d = _driver(tmp_path / "a", "train.seed=5")
    try:
        trials = _asked(d, 4)
        seeds = [(t.user_attrs["config"]["train"]["seed"], t.user_attrs["config"]["train"]["data_seed"]) for t in trials]
        assert seeds == [trial_seeds(5, t.number) for t in trials]
        assert len(set(seeds)) == 4
        first = d.ready[0].trials[0]
        d.ready.clear()
        d.fail_or_retry(first, "worker lost")
        again = _asked(d, 1)[0]
        assert again.user_attrs["retry_of"] == first.number and again.params == first.params
        assert again.user_attrs["config"]["train"]["seed"] == seeds[0][0]
        assert again.user_attrs["config"]["train"]["data_seed"] == seeds[0][1]
    finally:
        d._lock.close()
    d = _driver(tmp_path / "b", "seeds=common", "train.seed=5")
    try:
        assert {(t.user_attrs["config"]["train"]["seed"], t.user_attrs["config"]["train"]["data_seed"])
                for t in _asked(d, 3)} == {(5, -1)}
    finally:
        d._lock.close()
    # replicates as a search axis (the laws' grids): the space's seeds stand, data_seed follows them
    d = _driver(tmp_path / "c", "search.train.seed={type: categorical, choices: [0, 1]}")
    try:
        assert {(t.user_attrs["config"]["train"]["seed"], t.user_attrs["config"]["train"]["data_seed"])
                for t in _asked(d, 4)} <= {(0, -1), (1, -1)}
    finally:
        d._lock.close()


def test_a_study_from_before_seeds_resumes_only_as_common(tmp_path):
    """A study with trials but no `seeds` record ran them all on train.seed: resuming it with
    per-trial seeds would mix two noise models in one ranking, so it is refused, naming the field."""
    journal = tmp_path / "quickstart" / "study.journal"
    study = optuna.create_study(study_name="quickstart", storage=open_storage(str(journal)))
    study.tell(study.ask(), 3.0)
    with pytest.raises(ConfigError, match=r"^seeds: study 'quickstart' ran its trials with seeds=common"):
        _driver(tmp_path)
    d = _driver(tmp_path, "seeds=common")
    d._lock.close()
    assert d.study.user_attrs["seeds"] == "common"
    with pytest.raises(ConfigError, match=r"^command line: seeds: must be one of per_trial, common"):
        load_sweep("quickstart", [f"results_dir={tmp_path}", "seeds=each"])
    assert json.loads(d.study.user_attrs["sweep"])["seeds"] == "common"
