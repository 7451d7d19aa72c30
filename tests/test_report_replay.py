"""`windtunnel report --mlflow` run again (by accident, or after more trials finished) adds each
trial to a tracking server once: the second replay logs only trials the server does not hold or
wait for yet, and nothing at all (no parent run) when there are none. Another server gets its own
full copy. Against the session's real MLflow server and a SQLite store; the study is a real Optuna
journal the trials are told to, as a sweep's driver tells them."""
import subprocess
import sys
import uuid

import mlflow
import optuna
import pytest

from conftest import free_port
from windtunnel.search import open_storage
from windtunnel.tracking.sweep import replay_to_mlflow
from windtunnel.tracking.store import local_uri
from windtunnel.tracking.sync import sync


def tell(study: optuna.Study, numbers) -> None:
    """Finished trials as a driver tells them: a config and a result with a loss curve."""
    for n in numbers:
        lr = 10 ** -(2 + n / 10)
        trial = optuna.trial.create_trial(
            params={"lr": lr}, distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)},
            value=5.0 - 0.1 * n,
            user_attrs={"config": {"optim": {"lr": lr}}, "attempt": 1,
                        "result": {"status": "ok", "tokens": 2048, "seconds": 1.0,
                                   "curve": [{"step": s, "tokens": (s + 1) * 1024, "val_loss": 5.0 - s - 0.1 * n}
                                             for s in range(2)]}})
        study.add_trial(trial)


def runs(uri: str, experiment: str) -> tuple[int, list[int]]:
    """(parent runs, sorted trial numbers of the child runs) of the experiment at uri."""
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], max_results=1000)
    children = sorted(int(r.data.tags["windtunnel.trial_number"]) for r in found if "mlflow.parentRunId" in r.data.tags)
    return len(found) - len(children), children


@pytest.fixture
def sweep(tmp_path):
    """A sweep folder whose study (a unique name: the server is shared) holds 3 finished trials."""
    d = tmp_path / "results" / "sw"
    study = optuna.create_study(study_name=f"replay-{uuid.uuid4().hex[:8]}", direction="minimize",
                                storage=open_storage(str(d / "study.journal")))
    tell(study, range(3))
    return d, study


@pytest.mark.mlflow_server
def test_a_second_replay_adds_only_new_trials(sweep, mlflow_server, tmp_path):
    d, study = sweep
    assert replay_to_mlflow(study, d, mlflow_server) == (3, True)
    assert replay_to_mlflow(study, d, mlflow_server) == (0, True)  # the same again: nothing, no parent run
    assert runs(mlflow_server, study.study_name) == (1, [0, 1, 2])

    tell(study, range(3, 5))  # more trials finished
    assert replay_to_mlflow(study, d, mlflow_server) == (2, True)
    assert runs(mlflow_server, study.study_name) == (2, [0, 1, 2, 3, 4])

    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"  # another server: its own full copy, once
    assert replay_to_mlflow(study, d, other) == (5, True)
    assert replay_to_mlflow(study, d, other) == (0, True)
    assert runs(other, study.study_name) == (1, [0, 1, 2, 3, 4])
    assert runs(mlflow_server, study.study_name) == (2, [0, 1, 2, 3, 4])


def test_a_server_is_known_by_its_copies_and_its_resolved_uri(sweep, tmp_path):
    """The local store named by its path is the store '' names; a store `sync --uri` copied the
    replay to holds its trials; records waiting for a dead server are not appended again."""
    d, study = sweep
    assert replay_to_mlflow(study, d) == (3, True)
    store = local_uri(d / "tracking")
    again = subprocess.run([sys.executable, "-m", "windtunnel.cli", "report", str(d), "--mlflow", store],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines()[-1] == (f"report: all 3 finished trials of {study.study_name} are already in "
                                             f"MLflow at {store}; nothing to replay")
    assert runs(store, study.study_name) == (1, [0, 1, 2])

    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    assert sync(d, other) == (6, 0)  # tracking was off: the replay (parent, 3 trials, artifacts, end) is copied
    assert replay_to_mlflow(study, d, other) == (0, True)
    assert runs(other, study.study_name) == (1, [0, 1, 2])

    dead = f"http://127.0.0.1:{free_port()}"
    assert replay_to_mlflow(study, d, dead) == (3, False)  # nothing listens: its records wait
    size = (d / "tracking" / "outbox.jsonl").stat().st_size
    assert replay_to_mlflow(study, d, dead) == (0, False)
    assert (d / "tracking" / "outbox.jsonl").stat().st_size == size
