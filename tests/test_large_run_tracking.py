"""The large run's MLflow tracking (windtunnel/tracking/large_run.py): statuses that say how the run ended,
the trials' metric names against tokens, provenance tags, one run across relaunches; and a server
stopped mid-run neither slows nor stops the run, and gets every metric when it returns."""
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import wait_for
from windtunnel.config.trial import DataConfig, ModelConfig, OptimConfig, TrainConfig, TrialConfig, to_dict

mlflow = pytest.importorskip("mlflow")


def write_config(tmp_path: Path, uri: str, steps: int, name: str = "r") -> Path:
    """A one-process large run of a tiny model: `steps` steps of 8 sequences of 16 tokens."""
    cfg = TrialConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=16, kernels="torch"),
                      data=DataConfig(max_bytes=300_000), optim=OptimConfig(lr=0.01),
                      train=TrainConfig(device="cpu", batch_size=8, tokens=steps * 8 * 16, eval_every=4 * 8 * 16,
                                        eval_tokens=8 * 16, checkpoint_every=4 * 8 * 16))
    d = {**to_dict(cfg), "large_run": {"run_name": name, "micro_batch": 8, "tracking_uri": uri, "experiment": "lr",
                                       "source_sweep": "mup_hp", "source_trial": 392}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def the_run(uri: str):
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("lr").experiment_id])
    return client, run


def train(config: Path, *overrides, monkeypatch=None):
    from windtunnel import large_run

    return large_run.main(config, list(overrides))


def test_statuses_metrics_and_tags(tmp_path, monkeypatch):
    """KILLED when a SIGTERM's flag stops the run, FAILED on an exception, FINISHED only when the run
    completes; one MLflow run across the relaunches, RUNNING again on each. Catches end_run in a
    finally (a crashed run FINISHED), per-step `loss` instead of the trials' train_loss/val_loss
    against tokens, missing git/version/sweep tags or system metrics."""
    from windtunnel import large_run

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    config = write_config(tmp_path, uri, steps=16)
    monkeypatch.setattr(large_run.LargeRun, "_stop_requested", lambda self: self.step == 4)  # SIGTERM's flag
    train(config)
    assert the_run(uri)[1].info.status == "KILLED"
    monkeypatch.undo()

    real_step = large_run.LargeRun.train_step

    def failing(self):
        if self.step == 6:
            raise RuntimeError("boom")
        return real_step(self)

    monkeypatch.setattr(large_run.LargeRun, "train_step", failing)
    with pytest.raises(RuntimeError, match="boom"):
        train(config)
    assert the_run(uri)[1].info.status == "FAILED"
    monkeypatch.undo()

    assert train(config)["done"]
    client, run = the_run(uri)  # the same one run, finished
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["windtunnel.sweep"] == "mup_hp" and tags["windtunnel.trial_number"] == "392"
    assert tags["windtunnel.version.torch"] and tags["windtunnel.version.mlflow"] == mlflow.__version__
    assert tags["mlflow.source.git.commit"] and tags["windtunnel.git"].startswith(tags["mlflow.source.git.commit"])
    history = {k: client.get_metric_history(run.info.run_id, k) for k in ("train_loss", "val_loss", "lr")}
    assert sorted({m.step for m in history["val_loss"]}) == [512 * i for i in range(1, 5)]
    assert sorted({m.step for m in history["train_loss"]}) == [128 * i for i in range(1, 17)]
    assert "loss" not in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics


@pytest.mark.slow
def test_ctrl_c_is_killed(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) mid-run ends the MLflow run KILLED, not FAILED or FINISHED."""
    from windtunnel import large_run

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    config = write_config(tmp_path, uri, steps=16)
    real_step = large_run.LargeRun.train_step

    def interrupted(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(large_run.LargeRun, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    assert the_run(uri)[1].info.status == "KILLED"


@pytest.mark.slow
@pytest.mark.mlflow_server
def test_server_down_mid_run_neither_slows_nor_stops_it(tmp_path, mlflow_server, mlflow_server_control):
    """The server stops after step 20 and returns after 12 steps and 15 s or more: the run goes on
    at its pace, spends < 3% of its time in tracking, finishes with exit 0, and every val_loss and
    train_loss point reaches the server. Catches a blocking log call (each would wait out the HTTP
    timeout), an exception from the client ending the run, points dropped while the server was away."""
    # enough steps that 15 s of the server away fall inside the run on a fast, quiet machine (~40 steps/s)
    n_steps = 1200
    config = write_config(tmp_path, mlflow_server, steps=n_steps, name="down")
    proc = subprocess.Popen([sys.executable, "-m", "windtunnel.cli", "train", str(config)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "runs" / "down" / "loss.jsonl"

    def steps() -> int:
        return log.read_text().count('"loss"') if log.exists() else 0

    wait_for(lambda: steps() >= 20, 180, "20 steps", proc)
    mlflow_server_control.stop()
    down_from, t0 = steps(), time.monotonic()
    wait_for(lambda: steps() >= down_from + 12 and time.monotonic() - t0 >= 15, 300, "12 steps without the server", proc)
    down_to = steps()
    mlflow_server_control.start()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    seconds = {r["step"]: r["seconds"] for r in records if "seconds" in r}
    pace = lambda a, b: statistics.median(seconds[s + 1] - seconds[s] for s in range(a, b))  # noqa: E731
    assert down_to - down_from >= 10, "too few steps while the server was down to judge"
    assert pace(down_from, down_to - 1) < 2 * pace(2, down_from - 1), "steps slowed while the server was down"
    assert result["tracking_s"] < 0.03 * seconds[max(seconds)], result
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("lr").experiment_id
    [run] = client.search_runs([exp], filter_string="tags.`windtunnel.large_run` = 'down'")
    assert run.info.status == "FINISHED"
    vals = {r["tokens"] for r in records if "val_loss" in r}
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_loss")} == vals
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == n_steps
