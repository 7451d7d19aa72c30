"""Kill the driver mid-sweep, re-run the same command: exactly n_trials finished trials, each with
one MLflow child run and one row in trials.csv; nothing lost, nothing duplicated."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

from helpers import check_accounted, finished_count, quickstart_study, wait_for
from windtunnel.search import open_storage
from windtunnel.worker import RESULT

N = 6


def _cmd(results):
    return [sys.executable, "-m", "windtunnel.cli", "sweep", "quickstart", "-q", f"n_trials={N}",
            f"results_dir={results}", "train.tokens=60000", "train.eval_every=20000", "executor.workers=2",
            "population.size=1", "pruner.type=none"]


def _wait_gone(pattern: str, what: str, timeout: float = 30):
    """Fails unless no process matches `pattern` (pgrep -f) within `timeout`: a dying process
    takes a moment to leave the table."""
    wait_for(lambda: subprocess.run(["pgrep", "-f", pattern], capture_output=True).stdout == b"", timeout,
             f"{what} to exit")


def test_sigkill_driver_then_resume(tmp_path):
    results = tmp_path / "results"
    driver = subprocess.Popen(_cmd(results), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: finished_count(results) >= 2, 240, "two finished trials", driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # the killed driver's workers die with it (PR_SET_PDEATHSIG): nothing keeps training
    _wait_gone(f"windtunnel.worker {results}", "the killed driver's workers")

    rerun = subprocess.run(_cmd(results), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]

    trials = check_accounted(results, N)
    replaced = [t for t in trials if t.user_attrs.get("retried")]
    assert replaced, "the killed driver left running trials; they must be failed and replaced"
    # a stopped driver is no fault of its trials: their copies keep the attempt (and its retries);
    # a trial the kill caught while it was being asked has no config and no copy (it is asked anew)
    copies = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    assert all(copies[t.number].user_attrs["attempt"] == t.user_attrs.get("attempt", 1)
               for t in replaced if "config" in t.user_attrs)
    assert all("config" in t.user_attrs or t.number not in copies for t in replaced)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials if not t.user_attrs.get("retried"))

    import mlflow

    from windtunnel.tracking.store import local_uri

    client = mlflow.MlflowClient(local_uri(results / "quickstart" / "tracking"))
    exp = client.get_experiment_by_name("quickstart")
    children = [r for r in client.search_runs([exp.experiment_id], max_results=1000) if "mlflow.parentRunId" in r.data.tags]
    for r in children:
        if r.data.tags.get("windtunnel.state") == "COMPLETE":
            hist = client.get_metric_history(r.info.run_id, "val_loss")
            assert len(hist) == 3 and hist[-1].step == 59 * 1024  # evals at 20, 40, 59 steps of 1024 tokens


def test_a_second_driver_on_a_running_sweep_stops_and_touches_nothing(tmp_path):
    """One driver per sweep: a second one started while the first runs would take the first's
    running trials for a dead driver's and fail or re-run them. It stops with one line naming the
    first, and the first finishes undisturbed; the lock dies with its holder (SIGKILL included)."""
    results = tmp_path / "results"
    cmd = _cmd(results) + ["tracking.enabled=false", "executor.workers=1"]
    cmd[cmd.index(f"n_trials={N}")] = "n_trials=2"
    cmd[cmd.index("train.tokens=60000")] = "train.tokens=300000"  # seconds a trial: the first outlives the second
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lock = results / "quickstart" / "driver.lock"
    wait_for(lambda: lock.exists() and lock.read_text(), 120, "the first driver's lock", first)
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first driver must still be running for this test to mean anything"
    assert second.returncode == 2 and second.stdout == "", second.stdout[-2000:] + second.stderr[-2000:]
    msg = second.stderr.strip()
    assert "\n" not in msg and "another driver is running this sweep" in msg and f"pid {first.pid} " in msg, msg
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out.decode()[-2000:]
    trials = quickstart_study(results).get_trials(deepcopy=False)
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert not any(t.user_attrs.get("retried") for t in trials)

    # the lock goes with its holder, even a SIGKILLed one: the next driver starts (and resumes)
    cmd[cmd.index("n_trials=2")] = "n_trials=3"
    killed = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: f"pid {killed.pid} " in lock.read_text(), 120, "the next driver to take the lock", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert sum(t.state.is_finished() and not t.user_attrs.get("retried")
               for t in quickstart_study(results).get_trials(deepcopy=False)) == 3


def complete(results) -> int:
    study = quickstart_study(results)
    return 0 if study is None else sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def test_stopped_twice_then_resumed_no_trial_fails_and_the_tables_say_what_finished(tmp_path):
    """SIGTERM (Ctrl-C's twin) twice mid-sweep, then a re-run: the interrupted trials run again
    with their attempt (so their retries) untouched, and each stop leaves trials.csv and
    report.md that count the trials finished by then."""
    import pandas as pd

    results = tmp_path / "results"
    cmd = _cmd(results) + ["tracking.enabled=false", "executor.retries=1"]
    for stop in (1, 2):
        driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for(lambda: complete(results) >= 2 * stop, 240, f"{2 * stop} complete trials", driver)
        driver.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=120)
        assert driver.returncode == 130 and b"interrupted" in out, out.decode()[-2000:]
        trials = quickstart_study(results).get_trials(deepcopy=False)
        table = pd.read_csv(results / "quickstart" / "trials.csv")
        kept = [t for t in trials if not t.user_attrs.get("retried")]
        # a trial once, RUNNING only while a driver runs it: after the stop, STOPPED (a re-run runs it)
        assert dict(zip(table.number, table.state)) == {
            t.number: "STOPPED" if t.state.name == "RUNNING" else t.state.name for t in kept}
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in kept)
        running = sum(t.state == optuna.trial.TrialState.RUNNING for t in kept)
        line = (results / "quickstart" / "report.md").read_text().splitlines()[2]
        assert line.startswith(f"{len(kept)} trials: {done} complete, ") and done >= 2 * stop, line
        assert (f", {running} unfinished (" in line) == (running > 0), line
    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    trials = quickstart_study(results).get_trials(deepcopy=False)
    final = [t for t in trials if not t.user_attrs.get("retried")]
    assert len(final) == N and all(t.state == optuna.trial.TrialState.COMPLETE for t in final)
    assert all(t.user_attrs.get("attempt", 1) == 1 for t in trials)


def test_sigkill_a_worker_its_trial_is_retried(tmp_path):
    results = tmp_path / "results"
    cmd = _cmd(results)
    # two trials, one per slot: one is killed, its retry runs after
    cmd[cmd.index(f"n_trials={N}")] = "n_trials=2"
    # seconds of training, a checkpoint every 60k tokens: the evidence that a worker is training
    cmd[cmd.index("train.tokens=60000")] = "train.tokens=300000"
    driver = subprocess.Popen(cmd + ["tracking.enabled=false", "executor.checkpoint_every=60000"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def training_worker():
        ps = subprocess.run(["pgrep", "-f", f"windtunnel.worker {results}"], capture_output=True, text=True)
        for pid in map(int, ps.stdout.split()):
            try:
                bundle = Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2].decode())
            except (FileNotFoundError, IndexError):  # exited since pgrep
                continue
            # past a checkpoint and not done: the kill lands mid-trial, before the result
            if (bundle / "ckpt" / "latest.pt").exists() and not (bundle / RESULT).exists():
                return pid, bundle
        return None

    pid, killed = wait_for(training_worker, 120, "a worker past its first checkpoint", driver)
    os.kill(pid, signal.SIGKILL)
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out.decode()[-2000:]
    assert not (killed / RESULT).exists()  # it died mid-trial
    study = optuna.load_study(study_name="quickstart", storage=open_storage(str(results / "quickstart" / "study.journal")))
    trials = study.get_trials(deepcopy=False)
    final = [t for t in trials if not t.user_attrs.get("retried")]
    retried = [t for t in trials if t.user_attrs.get("retried")]
    assert len(final) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in final)
    assert len(retried) == 1 and "worker exited" in retried[0].user_attrs["reason"]
    assert any(t.user_attrs.get("retry_of") == retried[0].number and t.params == retried[0].params for t in final)


def test_standby_workers_start_ahead_and_leave_nothing_behind(tmp_path):
    """executor.standby=true (the GPU default): each bundle after a slot's first runs in a process
    started while the previous one trained; the sweep's end, or its driver's SIGKILL, leaves no
    waiting worker behind."""
    results = tmp_path / "results"
    cmd = _cmd(results) + ["executor.standby=true", "tracking.enabled=false"]
    cmd[cmd.index(f"n_trials={N}")] = "n_trials=4"
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    study = optuna.load_study(study_name="quickstart", storage=open_storage(str(results / "quickstart" / "study.journal")))
    assert [t.state for t in study.get_trials(deepcopy=False)] == [optuna.trial.TrialState.COMPLETE] * 4
    run_stats = study.user_attrs["invocations"][-1]  # the share of slot time spent training, reported
    assert 0 < run_stats["train_frac"] < 1 and run_stats["driver_wait_frac"] < 1
    report = (results / "quickstart" / "report.md").read_text()
    assert f"trained {100 * run_stats['train_frac']:.0f}% of it" in report
    assert 0 < run_stats["ask_frac"] < 1 and f"spent {100 * run_stats['ask_frac']:.0f}% of its time asking" in report
    logs = sorted((results / "quickstart" / "bundles").glob("trial-*/worker.log"))
    ahead = ["started ahead" in p.read_text() for p in logs]
    assert len(logs) == 4 and ahead.count(False) == 2 and ahead.count(True) == 2, ahead  # each slot's first is cold
    assert subprocess.run(["pgrep", "-f", f"windtunnel.worker --standby {results}"], capture_output=True).stdout == b""

    # a killed driver takes its waiting workers with it (PR_SET_PDEATHSIG), as its running ones
    cmd[cmd.index(f"results_dir={results}")] = f"results_dir={results}2"
    driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: subprocess.run(["pgrep", "-f", f"windtunnel.worker --standby {results}2"],
                                    capture_output=True).stdout, 120, "a standby worker", driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    _wait_gone(f"windtunnel.worker.*{results}2", "the killed driver's running and waiting workers")


def test_next_bundle_starts_before_the_ended_trials_are_told(tmp_path):
    """One slot: bundle n+1 (asked ahead) is submitted before bundle n's trial is told, so the
    slot never waits on the tell (and its MLflow logging)."""
    results = tmp_path / "results"
    cmd = _cmd(results) + ["executor.workers=1"]
    cmd[cmd.index(f"n_trials={N}")] = "n_trials=3"
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    study = optuna.load_study(study_name="quickstart", storage=open_storage(str(results / "quickstart" / "study.journal")))
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for ended, started in zip(trials, trials[1:]):
        submitted = (results / "quickstart" / "bundles" / f"trial-{started.number:05d}" / "payload.json").stat().st_mtime
        assert submitted <= ended.datetime_complete.timestamp(), (ended.number, started.number)


def test_a_bundle_ends_at_its_result_not_its_exit(tmp_path, monkeypatch):
    """A local worker that has written its result but is still exiting (a CUDA teardown takes
    seconds) has ended: its slot is free and its result read at once; close() reaps it."""
    from windtunnel.executors import local
    from windtunnel.config.sweep import ExecutorConfig

    monkeypatch.setattr(local, "EXIT_GRACE_S", 1.0)
    ex = local.LocalExecutor(ExecutorConfig(type="local", workers=1, standby=False))
    bundle = tmp_path / "b"
    bundle.mkdir()
    # a real process standing in for a worker whose exit is slow: result first, then 60 s more
    script = ("import json, os, sys, time; from pathlib import Path; d = Path(sys.argv[1]); "
              "(d / '.r.tmp').write_text(json.dumps({'ok': True, 'results': [{'number': 7}]})); "
              f"os.replace(d / '.r.tmp', d / '{RESULT}'); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(bundle)])
    handle = local.LocalHandle(proc, bundle, ex.free.pop(0))
    wait_for(handle.done, 30, "the bundle to end at its result")
    assert handle.done() and proc.poll() is None  # ended, its process still alive
    assert handle.result() == [{"number": 7}]
    assert proc.poll() is None  # result() read the result without waiting for the exit
    ex.release(handle)
    assert ex.free == [0] and ex.exiting == [proc]
    ex.close()
    assert proc.poll() is not None and ex.exiting == []


def test_a_slot_is_freed_when_its_result_was_written(tmp_path):
    """The driver may notice an ended bundle late (busy asking GP for the next one): the slot's
    wait is counted from the result's write, so that time shows as the driver's."""
    from windtunnel.sweep import Bundle, _ended_at

    t0 = time.time()
    b = Bundle([], tmp_path, started=t0 - 60)
    assert t0 <= _ended_at(b) <= time.time()  # no result: ended now
    (tmp_path / RESULT).write_text("{}")
    os.utime(tmp_path / RESULT, (t0 - 7, t0 - 7))
    assert _ended_at(b) == t0 - 7
    os.utime(tmp_path / RESULT, (t0 - 90, t0 - 90))  # before this driver submitted it: no wait of its
    assert _ended_at(b) == t0 - 60
