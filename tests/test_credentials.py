"""A password in a tracking URI is never stored or shown (windtunnel/credentials.py): not in the
study journal, the tracking outbox or state, printed lines, error messages or exported configs;
the files that name the server are the owner's only."""
import os
import stat

import pytest

from windtunnel import credentials
from windtunnel.config.hydra import load_sweep
from windtunnel.errors import ConfigError

SECRET = "s3cretpw"


@pytest.fixture
def env(monkeypatch):
    """MLflow's credential variables, restored after the test (take() sets them)."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "x")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "x")
    return os.environ


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_password_in_the_tracking_uri_reaches_mlflow_and_no_file(tmp_path, env, capsys):
    """The mutant: TrackingConfig keeping the URI as given puts the password in the journal's
    `sweep` attribute, every outbox record, state.json and the 'MLflow:' line."""
    from windtunnel.search import open_study
    from windtunnel.tracking.tracker import Tracker

    cfg = load_sweep("quickstart", [f"tracking.uri=http://alice:{SECRET}@127.0.0.1:5999", f"results_dir={tmp_path}"])
    assert cfg.tracking.uri == "http://127.0.0.1:5999"
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("alice", SECRET)
    d = tmp_path / "quickstart"
    study = open_study(cfg, d)
    from windtunnel.config.trial import to_dict
    import json

    study.set_user_attr("sweep", json.dumps(to_dict(cfg), default=str))  # as the driver stores it
    tracker = Tracker(cfg.tracking.uri, experiment=cfg.name, outbox=d / "tracking" / "outbox.jsonl")
    tracker.start_invocation(params={"n_trials": 1}, tags={})
    tracker.flush(timeout=1)
    tracker.close(timeout=1)
    files = [p for p in d.rglob("*") if p.is_file()]
    assert [p.name for p in files if SECRET.encode() in p.read_bytes()] == []
    for name in ("study.journal", "tracking/outbox.jsonl"):
        assert _mode(d / name) == 0o600, name
    if (d / "tracking" / "state.json").exists():
        assert _mode(d / "tracking" / "state.json") == 0o600
    # the delivery process's command line (ps shows it to every user) names the clean URI
    assert SECRET not in " ".join(tracker._proc.args)


def test_credentials_are_stripped_everywhere_a_uri_enters(env):
    assert credentials.take("https://bob:p%40ss@mlflow.example.com/path?x=1") == "https://mlflow.example.com/path?x=1"
    assert env["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
    assert credentials.take("http://[::1]:5000") == "http://[::1]:5000"
    assert credentials.take("postgresql://u:pw@db:5432/mlflow") == "postgresql://db:5432/mlflow"
    assert credentials.take("") == "" and credentials.take("sqlite:///a@b/mlflow.db") == "sqlite:///a@b/mlflow.db"
    from windtunnel.config.large_run import LargeRunConfig

    assert LargeRunConfig(tracking_uri=f"http://a:{SECRET}@h:1").tracking_uri == "http://h:1"


def test_a_refused_uri_does_not_echo_its_password(tmp_path, env):
    with pytest.raises(ConfigError) as e:
        load_sweep("quickstart", [f"tracking.uri=ftp://alice:{SECRET}@host/x", f"results_dir={tmp_path}"])
    assert "tracking.uri: must be" in str(e.value) and "ftp://***@host/x" in str(e.value) and SECRET not in str(e.value)
