"""What a resumed study keeps: fresh sampler draws, its search space, its trial settings."""
import pytest

from windtunnel.config.hydra import load_sweep
from windtunnel.errors import ConfigError
from windtunnel.results import open_sweep_study
from windtunnel.search import distributions, open_study


def _asked(cfg, sweep_dir, n):
    """Open (or resume) the study, ask n trials and tell each a loss; their parameters."""
    study = open_study(cfg, sweep_dir)
    params = []
    for _ in range(n):
        t = study.ask(distributions(cfg))
        study.tell(t, 3.0)
        params.append(tuple(sorted(t.params.items())))
    return params


@pytest.mark.parametrize("sampler", ["tpe", "random", "gp"])
def test_a_resumed_study_draws_new_points(tmp_path, sampler):
    """Each driver builds its sampler from sampler.seed: resumed with that seed, a sampler's random
    startup draws repeated the first run's points, trial for trial (same losses, wasted compute)."""
    cfg = load_sweep("quickstart", [f"results_dir={tmp_path}", f"sampler.type={sampler}", "tracking.enabled=false"])
    first = _asked(cfg, tmp_path, 3)
    again = _asked(cfg, tmp_path, 3)
    assert len(set(first + again)) == 6, (first, again)
    # and reproducibly so: the same history resumed the same way draws the same points
    other = tmp_path / "copy"
    assert _asked(cfg, other, 3) == first and _asked(cfg, other, 3) == again


def test_a_resumed_study_keeps_its_search_space_and_trial_settings(tmp_path):
    base = [f"results_dir={tmp_path}", "tracking.enabled=false"]
    _asked(load_sweep("quickstart", base + ["train.tokens=30000"]), tmp_path, 1)
    # what only changes how trials run may change
    _asked(load_sweep("quickstart", base + ["train.tokens=30000", "train.eval_every=10000", "train.device=cpu",
                                            "model.kernels=torch", "n_trials=40"]), tmp_path, 1)
    with pytest.raises(ConfigError) as e:  # results under another budget or width would be ranked as one
        open_study(load_sweep("quickstart", base + ["train.tokens=60000", "model.d_model=128"]), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.d_model: study 'quickstart' ran its trials with other settings")
    assert "model.d_model 64 -> 128" in msg and "train.tokens 30000 -> 60000" in msg and "results_dir=" in msg
    with pytest.raises(ConfigError) as e:  # said in a short line: what changed, not both spaces whole
        open_study(load_sweep("quickstart", base + ["train.tokens=30000", "search.optim.lr.high=0.5",
                                                    "~search.model.scale_emb"]), tmp_path)
    assert str(e.value) == ("search.model.scale_emb: study 'quickstart' searched another space "
                            "(search.model.scale_emb removed; search.optim.lr.high 0.05 -> 0.5); "
                            "set it back, or use a new name= or results_dir=")


def test_a_resumed_study_may_change_its_sampler(tmp_path):
    """Optuna keeps no sampler state in the storage: another sampler continues from the same trials."""
    base = [f"results_dir={tmp_path}", "tracking.enabled=false"]
    _asked(load_sweep("quickstart", base), tmp_path, 2)
    assert len(_asked(load_sweep("quickstart", base + ["sampler.type=random"]), tmp_path, 1)) == 1
    study = open_study(load_sweep("quickstart", base + ["sampler.type=gp"]), tmp_path)
    assert len(study.trials) == 3 and type(study.sampler).__name__ == "GPSampler"


def test_a_stop_before_the_first_ask_ends_at_once_with_an_empty_report(tmp_path):
    """Ctrl-C while the driver starts (Ray's startup, a first GP ask): it asked nothing more and
    looped forever on its free slots; then the report of an empty study raised a KeyError."""
    import threading

    from windtunnel.sweep import Driver

    driver = Driver(load_sweep("quickstart", [f"results_dir={tmp_path}", "tracking.enabled=false"]), progress=False)
    driver.stop.requested = True
    raised = []
    t = threading.Thread(target=lambda: raised.append(_raises(driver.run)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the stopped driver spins"
    assert raised == [KeyboardInterrupt]
    report = (tmp_path / "quickstart" / "report.md").read_text()
    assert "0 trials: 0 complete, 0 pruned, 0 failed" in report and (tmp_path / "quickstart" / "trials.csv").exists()


def _raises(fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 (KeyboardInterrupt is what is expected)
        return type(e)
    return None


def test_a_study_stored_before_data_val_split_existed_ran_with_the_tail(tmp_path):
    """Its stored settings lack the field: resumed with the spread split it would rank losses on other text as one."""
    base = [f"results_dir={tmp_path}", "tracking.enabled=false"]
    study = open_study(load_sweep("quickstart", base), tmp_path)
    stored = dict(study.user_attrs["trial_settings"])
    del stored["data.val_split"]
    study.set_user_attr("trial_settings", stored)
    with pytest.raises(ConfigError, match="data.val_split 'tail' -> 'spread'"):  # today's default
        open_study(load_sweep("quickstart", base), tmp_path)
    open_study(load_sweep("quickstart", base + ["data.val_split=tail"]), tmp_path)


def test_a_study_resumed_over_other_tokens_at_the_same_path_is_refused(tmp_path):
    """A fresh machine prepares data.source again (the GPU's prose slice is re-packed each session):
    other text there would be ranked with the first trials as if one data set."""
    import shutil

    from windtunnel.data import prepare
    from windtunnel.sweep import Driver

    shards, text = tmp_path / "shards", tmp_path / "a.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    prepare(str(text), shards)
    base = [f"results_dir={tmp_path}", "tracking.enabled=false", f"data.source={shards}", "n_trials=1",
            "population.size=1", "train.tokens=4096", "train.eval_every=2048", "train.eval_tokens=1024"]
    first = Driver(load_sweep("quickstart", base), progress=False)
    first.run()
    tokens = first.study.user_attrs["data"]
    assert first.study.trials[0].user_attrs["result"]["provenance"]["data"] == tokens
    Driver(load_sweep("quickstart", base + ["n_trials=2"]), progress=False).run()  # the same tokens: resumed
    shutil.rmtree(shards)
    text.write_text("def g(y):\n    return y * 2\n" * 400)
    prepare(str(text), shards)
    with pytest.raises(ConfigError) as e:
        Driver(load_sweep("quickstart", base + ["n_trials=3"]), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.source: study 'quickstart' trained its trials on other "
                                              f"tokens (source_hash {tokens['source_hash'][:12]!r} -> ")
    # a worker that reads other tokens than the study's (a cluster node's copy: the driver reads none
    # there) fails its trials with the reason and stops the sweep
    other = Driver(load_sweep("quickstart", base + ["name=other"]), progress=False)
    other.study.set_user_attr("data", tokens)
    with pytest.raises(ConfigError, match="^data.source: study 'other' trained its trials on other tokens"):
        other.run()
    [t] = other.study.trials
    assert t.state.name == "FAIL" and t.user_attrs["result"]["reason"].startswith("data.source: study 'other'")
    # a confirmation's driver is given its search's tokens: its new study takes them, so every worker's
    # result is held to the search's data on any executor; here the driver's own read refuses first
    with pytest.raises(ConfigError, match="^data.source: study 'third' trained its trials on other tokens"):
        Driver(load_sweep("quickstart", base + ["name=third"]), progress=False, tokens=tokens)
    assert open_sweep_study(tmp_path / "third").user_attrs["data"] == tokens
