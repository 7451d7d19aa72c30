"""`windtunnel report` regenerates a sweep's files from its study alone, and `--mlflow` logs a
sweep that ran with tracking off into MLflow afterwards (as the GPU results were)."""
import subprocess
import sys

import mlflow

from windtunnel.tracking.store import local_uri


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


def test_trials_csv_shows_each_trial_once_and_the_plots_read_right(tmp_path, monkeypatch):
    """A retried trial was a row per attempt (26 rows for a 20-trial sweep), trials a stopped driver
    left read RUNNING, loss_vs_params.png said "colour = trial number" with no colour bar and
    history.png had ticks at trial 2.5. Mutants caught: retried rows kept, no attempt count,
    RUNNING without a driver, no colour bar, fractional ticks."""
    import json

    import matplotlib.pyplot as plt
    import optuna

    from windtunnel.results import trials_frame, write_report

    TS = optuna.trial.TrialState
    dist = optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)

    def add(state, value, lr, **attrs):
        study.add_trial(optuna.trial.create_trial(state=state, value=value, params={"optim.lr": lr},
                                                  distributions={"optim.lr": dist}, user_attrs=attrs))

    study = optuna.create_study(study_name="s")
    study.set_user_attr("space", json.dumps({"search": {"optim.lr": {"type": "float", "low": 1e-3, "high": 0.1,
                                                                     "log": True}}}))
    add(TS.FAIL, None, 0.01, retried=True, reason="worker lost; retried")  # 0, retried as 1, then as 2
    add(TS.FAIL, None, 0.01, retried=True, retry_of=0, attempt=2)
    add(TS.COMPLETE, 3.0, 0.01, retry_of=1, attempt=3, config={})
    for i, lr in enumerate((0.002, 0.03, 0.05)):  # 3, 4, 5
        add(TS.COMPLETE, 3.5 - 0.1 * i, lr, config={})
    add(TS.RUNNING, None, 0.04)  # 6: its driver stopped (or runs it)
    df = trials_frame(study)
    assert list(df.number) == [2, 3, 4, 5, 6] and list(df.attempts) == [3, 1, 1, 1, 1]
    assert list(df.state) == ["COMPLETE"] * 4 + ["STOPPED"]
    assert list(trials_frame(study, driver_running=True).state)[-1] == "RUNNING"

    monkeypatch.setattr(plt, "close", lambda *a: None)  # keep the figures to look at
    plt.close("all")
    write_report(study, tmp_path)
    figs = {f.get_suptitle() or f.axes[0].get_title(): f for f in map(plt.figure, plt.get_fignums())}
    params = figs["s: loss vs each searched hyperparameter"]
    bars = [ax for ax in params.axes if ax.get_ylabel() == "trial"]
    assert len(bars) == 1 and all(float(t).is_integer() for t in bars[0].get_yticks())
    history = figs["s: optimization history"].axes[0]
    lo, hi = history.get_xlim()
    ticks = [t for t in history.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    line = (tmp_path / "report.md").read_text().splitlines()[2]
    assert line.startswith("5 trials: 4 complete, 0 pruned, 0 failed, 1 unfinished (") and "(2 more were retried)" in line
