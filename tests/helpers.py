"""Small trial configs for fast CPU tests."""
from windtunnel.config.trial import (DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig,
                               TrialConfig)


def tiny_trial(**train) -> TrialConfig:
    return TrialConfig(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, kernels="torch"),
        data=DataConfig(max_bytes=300_000),
        optim=OptimConfig(lr=0.01),
        schedule=ScheduleConfig(kind="wsd", warmup=0.1, decay=0.2, decay_shape="exp"),
        train=TrainConfig(**{"tokens": 30 * 8 * 32, "batch_size": 8, "eval_every": 5 * 8 * 32,
                             "eval_tokens": 512, "device": "cpu", **train}),
    )


def quickstart_study(results, name: str = "quickstart"):
    """The study `name` (the quickstart sweep's, or that sweep run as name=NAME) under results/,
    or None while the driver has not created it yet."""
    import optuna

    from windtunnel.search import open_storage

    journal = results / name / "study.journal"
    if not journal.exists():
        return None
    try:
        return optuna.load_study(study_name=name, storage=open_storage(str(journal)))
    except KeyError:
        return None


def finished_count(results, name: str = "quickstart") -> int:
    study = quickstart_study(results, name)
    return 0 if study is None else sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def wait_for(cond, timeout: float, what: str, proc=None, poll_s: float = 0.2):
    """cond()'s first truthy value, polled every poll_s; fails the test on timeout, or when `proc`
    (a driver whose stdout is a pipe) ends first: a scenario that never happened must not pass."""
    import subprocess
    import time

    import pytest

    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            try:  # bounded: a child of the process may still hold its pipes open
                out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                              for x in proc.communicate(timeout=10))
            except subprocess.TimeoutExpired:
                out = "(its output pipes are still held open)"
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}: {out[-3000:]}")
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def check_accounted(results, n: int, states=("COMPLETE", "PRUNED")):
    """Exactly n finished non-retried trials, each in `states` (FAIL only where a test expects it)
    and at least one COMPLETE with a finite value, each with one trials.csv row and one MLflow
    child run (in the sweep's local store); a replaced trial was re-run once, with the same
    parameters."""
    import math

    import mlflow
    import optuna
    import pandas as pd

    from windtunnel.tracking.store import local_uri

    sweep = results / "quickstart"
    trials = quickstart_study(results).get_trials(deepcopy=False)
    final = [t for t in trials if not t.user_attrs.get("retried")]
    summary = [(t.number, t.state.name, t.user_attrs.get("reason")) for t in trials]
    assert len(final) == n and all(t.state.name in states for t in final), summary
    assert any(t.state == optuna.trial.TrialState.COMPLETE and math.isfinite(t.value) for t in final), summary
    for t in trials:
        if t.user_attrs.get("retried") and "config" in t.user_attrs:
            again = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
            assert len(again) == 1 and again[0].params == t.params
    df = pd.read_csv(sweep / "trials.csv")
    assert df.number.is_unique  # one row per trial: a retried attempt is counted in its retry's row
    assert sorted(df.number) == sorted(t.number for t in final)
    client = mlflow.MlflowClient(local_uri(sweep / "tracking"))
    exp = client.get_experiment_by_name("quickstart")
    children = [r for r in client.search_runs([exp.experiment_id], max_results=1000) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(int(r.data.tags["windtunnel.trial_number"]) for r in children) == sorted(t.number for t in final)
    return trials
