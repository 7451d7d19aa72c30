"""`windtunnel report` regenerates a sweep's files from its study alone, and `--mlflow` logs a
sweep that ran with tracking off into MLflow afterwards (as the GPU results were)."""
import subprocess
import sys

import mlflow

from windtunnel.tracking import local_uri


def test_report_regenerates_and_replays_to_mlflow(tmp_path):
    results = tmp_path / "results"
    sweep_cmd = [sys.executable, "-m", "windtunnel.cli", "sweep", "quickstart", "-q", "n_trials=3",
                 f"results_dir={results}", "train.tokens=20000", "train.eval_every=10000", "tracking.enabled=false",
                 "population.size=3", "pruner.type=none"]
    for _ in range(2):  # the second finds the sweep complete: its empty run is no "Run:" line of the report
        run = subprocess.run(sweep_cmd, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
    sweep = results / "quickstart"
    runs = [line for line in (sweep / "report.md").read_text().splitlines() if line.startswith("Run: ")]
    assert len(runs) == 1 and runs[0].startswith("Run: 3 trials in "), runs
    before = {name: (sweep / name).read_text() for name in ("trials.csv", "report.md")}
    for name in ("trials.csv", "report.md", "best.yaml", "history.png"):
        (sweep / name).unlink()
    assert not (sweep / "tracking").exists()
    rep = subprocess.run([sys.executable, "-m", "windtunnel.cli", "report", str(sweep), "--mlflow"],
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0 and "MLflow: delivered" in rep.stdout, rep.stdout + rep.stderr
    for name in ("trials.csv", "report.md", "best.yaml", "history.png", "curves.csv"):
        assert (sweep / name).stat().st_size > 0, name
    for name, text in before.items():  # from the study alone, the same tables the sweep wrote
        assert (sweep / name).read_text() == text, name
    client = mlflow.MlflowClient(local_uri(sweep / "tracking"))
    exp = client.get_experiment_by_name("quickstart")
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(int(r.data.tags["windtunnel.trial_number"]) for r in children) == [0, 1, 2]
    assert all(len(client.get_metric_history(r.info.run_id, "val_loss")) >= 2 for r in children)
