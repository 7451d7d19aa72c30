"""`windtunnel sync` after `report --mlflow` to a server that never came: copying the records to
the local store adds no second copy of the sweep's runs; the dead server's records are named as
pending until `sync --drop` stops waiting for it."""
import subprocess
import sys

import mlflow

from conftest import free_port
from windtunnel.tracking.store import local_uri


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "windtunnel.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _runs(sweep):
    client = mlflow.MlflowClient(local_uri(sweep / "tracking"))
    exp = client.get_experiment_by_name("quickstart")
    return [(r.info.run_name, r.data.tags.get("mlflow.parentRunId") is not None)
            for r in client.search_runs([exp.experiment_id], max_results=100)]


def test_sync_after_a_replay_to_a_dead_server(tmp_path):
    results = tmp_path / "results"
    run = _cli("sweep", "quickstart", "-q", "n_trials=3", f"results_dir={results}", "train.tokens=20000",
               "train.eval_every=10000", "population.size=1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    sweep = results / "quickstart"
    before = _runs(sweep)
    assert sorted(child for _, child in before) == [False, True, True, True]  # the invocation, 3 trials

    dead = f"http://127.0.0.1:{free_port()}"
    _cli("report", sweep, "--mlflow", dead, cwd=tmp_path)  # nothing listens: its records wait
    copy = _cli("sync", sweep, "--uri", "", cwd=tmp_path)
    assert copy.returncode == 0 and copy.stdout.strip().endswith("0 pending"), copy.stdout + copy.stderr
    assert sorted(_runs(sweep)) == sorted(before)  # the replay's copy of the same runs is not added

    waiting = _cli("sync", sweep, cwd=tmp_path)
    assert waiting.returncode == 1 and f"sent 0, 6 pending for {dead}" in waiting.stdout, waiting.stdout
    dropped = _cli("sync", sweep, "--drop", dead, cwd=tmp_path)
    assert dropped.returncode == 0 and f"dropped 6 pending for {dead}" in dropped.stdout, dropped.stdout
    done = _cli("sync", sweep, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("sent 0, 0 pending"), done.stdout


def test_a_replay_of_an_untracked_sweep_is_copied_and_a_drop_names_known_servers(tmp_path):
    """With tracking off the replay is the sweep's only copy: `sync --uri` copies it. --drop takes
    the URI as `sync` prints it, and refuses one no record goes to."""
    results = tmp_path / "results"
    assert _cli("sweep", "quickstart", "-q", "n_trials=2", f"results_dir={results}", "train.tokens=20000",
                "train.eval_every=10000", "population.size=1", "tracking.enabled=false", cwd=tmp_path).returncode == 0
    sweep = results / "quickstart"
    dead = f"http://127.0.0.1:{free_port()}"
    _cli("report", sweep, "--mlflow", dead, cwd=tmp_path)
    assert _cli("sync", sweep, "--uri", "", cwd=tmp_path).returncode == 0
    assert sorted(child for _, child in _runs(sweep)) == [False, True, True]  # the replay's invocation, 2 trials
    typo = _cli("sync", sweep, "--drop", dead + "/", cwd=tmp_path)
    assert typo.returncode == 2 and f"--drop: {sweep}'s records go to no '{dead}/' (allowed: '{dead}')" in typo.stderr
    assert _cli("sync", sweep, "--drop", dead, cwd=tmp_path).returncode == 0
    assert _cli("sync", sweep, cwd=tmp_path).returncode == 0
