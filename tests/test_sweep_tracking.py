"""A real sweep against a real MLflow server on 127.0.0.1, taken down for part of the sweep:
the sweep keeps going and, once the server is back, every trial's metrics arrive exactly once."""
import json
import subprocess
import sys
import uuid

import mlflow
import pytest

from helpers import finished_count, wait_for

pytestmark = pytest.mark.mlflow_server
N = 6


def test_server_down_for_part_of_a_sweep(tmp_path, mlflow_server, mlflow_server_control):
    """The quickstart sweep under a name (so its MLflow experiment) of its own: the server is the
    session's, and another test, or this one run again, must not add runs to what it counts."""
    results = tmp_path / "results"
    name = f"tracking-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "windtunnel.cli", "sweep", "quickstart", "-q", f"name={name}", f"n_trials={N}",
           f"results_dir={results}", "train.tokens=60000", "train.eval_every=20000", "executor.workers=2",
           "population.size=1", "pruner.type=none", f"tracking.uri={mlflow_server}"]
    driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: finished_count(results, name) >= 2, 240, "two finished trials", driver)
    mlflow_server_control.stop()  # down while the rest of the sweep runs
    wait_for(lambda: finished_count(results, name) >= N - 1, 240, f"{N - 1} finished trials", driver)
    # the outage left records undelivered: the outbox reaches past the offset delivered to the server
    tracking = results / name / "tracking"
    state = json.loads((tracking / "state.json").read_text()) if (tracking / "state.json").exists() else {}
    delivered = state.get("targets", {}).get(mlflow_server, {}).get("offsets", {}).get("own", 0)
    assert (tracking / "outbox.jsonl").stat().st_size > delivered, (delivered, state.get("targets", {}).keys())
    mlflow_server_control.start()
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out.decode()[-3000:]
    # whatever the driver could not deliver before it exited, `windtunnel sync` sends now
    sync = subprocess.run([sys.executable, "-m", "windtunnel.cli", "sync", str(results / name)],
                          capture_output=True, text=True, timeout=300)
    assert sync.returncode == 0, sync.stdout + sync.stderr

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    numbers = sorted(int(r.data.tags["windtunnel.trial_number"]) for r in children)
    assert numbers == list(range(N))  # every trial, once
    for r in children:
        assert len(client.get_metric_history(r.info.run_id, "val_loss")) == 3
        assert r.data.metrics["final_val_loss"] > 0
