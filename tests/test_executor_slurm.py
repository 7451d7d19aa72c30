"""executor=slurm against the real single-node Slurm (fixture `slurm_cluster`, partition debug):
a sweep of 8 trials as job arrays, each with an MLflow child run and a trials.csv row; a job
scancel'ed mid-trial and a job that reaches its time limit are requeued and resume from their
checkpoint (not step 0); a SIGKILLed driver, re-run, re-attaches to its running jobs and replaces
only what was lost: no duplicates, nothing lost; a stopped driver's re-run leaves its cancelled
jobs alone while the cluster's Epilog holds them COMPLETING."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from conftest import unavailable
from helpers import check_accounted, quickstart_study, wait_for
import clusters  # tests/clusters.py

pytestmark = pytest.mark.slurm
TS = optuna.trial.TrialState


def _sweep_cmd(results: Path, partition: str, n: int, tokens: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "windtunnel.cli", "sweep", "quickstart", "-q", f"n_trials={n}",
            f"results_dir={results}", f"train.tokens={tokens}", "train.eval_every=20000", "population.size=1",
            "executor=slurm", f"executor.partition={partition}", "executor.poll_s=2", *extra]


@pytest.fixture(autouse=True)
def _cleanup(tmp_path):
    """Whatever a failing test leaves: its drivers are killed, its sweep's jobs cancelled."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    jobs = _our_jobs(tmp_path / "results")
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)


def _our_jobs(results: Path) -> list[str]:
    """Jobs of this sweep that Slurm still runs or holds."""
    ids = {p.read_text().strip() for p in (results / "quickstart" / "bundles").glob("*/job_id")}
    if not ids:
        return []
    r = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=30)
    return sorted(ids & set(r.stdout.split()))


def _result(bundle: Path) -> dict:
    return json.loads((bundle / "result.json").read_text())["results"][0]


def test_slurm_sweep_job_arrays(tmp_path, slurm_cluster):
    results = tmp_path / "results"
    r = subprocess.run(_sweep_cmd(results, slurm_cluster.partition, 8, 40000, "executor.workers=4"),
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = check_accounted(results, 8)
    assert not any(t.user_attrs.get("retried") for t in trials)
    job_ids = [(results / "quickstart" / "bundles" / f"trial-{t.number:05d}" / "job_id").read_text().strip()
               for t in trials]
    assert any("_" in j for j in job_ids), job_ids  # bundles ready together went out as a job array
    assert list((results / "quickstart" / "slurm").iterdir())  # submitit's job folders and logs
    assert _our_jobs(results) == []


def test_slurm_scancel_mid_trial_resumes_from_checkpoint(tmp_path, slurm_cluster, _cleanup):
    results = tmp_path / "results"
    # one ~10 s trial (400k tokens on one core), a checkpoint every 40k tokens
    driver = subprocess.Popen(_sweep_cmd(results, slurm_cluster.partition, 1, 400000, "pruner.type=none",
                                         "executor.checkpoint_every=40000"),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _cleanup.append(driver)
    bundle = results / "quickstart" / "bundles" / "trial-00000"
    wait_for(lambda: (bundle / "ckpt" / "latest.pt").exists(), 180, "a checkpoint", driver)
    job = (bundle / "job_id").read_text().strip()
    assert not (bundle / "result.json").exists()
    subprocess.run(["scancel", job], check=True, timeout=30)

    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out.decode()[-3000:]
    trials = check_accounted(results, 1)
    assert trials[0].state == TS.COMPLETE and not trials[0].user_attrs.get("retried")
    res = _result(bundle)
    assert res["resumed_from_step"] > 0, res  # resumed from its checkpoint, not from step 0
    assert res["tokens"] >= 400000 - 1024
    log = (bundle / "worker.log").read_text()
    assert "resubmitted from its checkpoint" in log and f"resumed from step {res['resumed_from_step']}" in log, log
    assert (bundle / "job_id").read_text().strip() != job  # a new job in the same bundle folder


def test_slurm_driver_sigkill_reattaches(tmp_path, slurm_cluster, _cleanup):
    results = tmp_path / "results"
    n = 5
    cmd = _sweep_cmd(results, slurm_cluster.partition, n, 200000, "pruner.type=none", "executor.workers=2")
    driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _cleanup.append(driver)

    def running_jobs():  # a trial finished and two bundles are training in Slurm
        study = quickstart_study(results)
        if study is None or sum(t.state.is_finished() for t in study.get_trials(deepcopy=False)) < 1:
            return None
        return _our_jobs(results) if len(_our_jobs(results)) >= 2 else None

    wait_for(running_jobs, 240, "a finished trial and two running jobs", driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    study = quickstart_study(results)
    orphaned = {t.number: Path(t.user_attrs["bundle"]) for t in study.get_trials(deepcopy=False, states=(TS.RUNNING,))
                if "bundle" in t.user_attrs and (Path(t.user_attrs["bundle"]) / "job_id").exists()}
    assert orphaned, "the killed driver left no submitted job behind"
    assert _our_jobs(results), "Slurm jobs outlive their driver"

    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    trials = check_accounted(results, n)
    by_number = {t.number: t for t in trials}
    for number, bundle in orphaned.items():  # re-attached: told from their own job, not replaced
        t = by_number[number]
        assert t.state == TS.COMPLETE and not t.user_attrs.get("retried"), (number, t.state, t.user_attrs.get("reason"))
        assert t.value == pytest.approx(_result(bundle)["final_val_loss"])
    # every job was submitted once: no bundle ran twice
    jobs = [p.read_text().strip() for p in (results / "quickstart" / "bundles").glob("*/job_id")]
    assert len(jobs) == len(set(jobs))
    assert _our_jobs(results) == []


def test_slurm_driver_stopped_then_rerun_at_once_spends_no_retry(tmp_path, slurm_cluster, _cleanup):
    """SIGTERM (Ctrl-C) scancels the running jobs; a re-run right after, while squeue still shows
    them COMPLETING, must not re-attach them (they would end without a result and spend a retry):
    their trials run again as attempt 1. This one-node Slurm ends a cancelled job within a second;
    its Epilog holds one COMPLETING while a marker names it, as a cluster with a slow epilog does."""
    if not os.access(clusters.SLURM_EPILOG_HOLD, os.W_OK):  # made by slurm.sh up, root's
        unavailable(f"{clusters.SLURM_EPILOG_HOLD} is not writable here: the Epilog's markers need root")
    results = tmp_path / "results"
    cmd = _sweep_cmd(results, slurm_cluster.partition, 3, 200000, "pruner.type=none", "executor.workers=2",
                     "tracking.enabled=false")
    driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _cleanup.append(driver)
    running = wait_for(lambda: _two_running(results), 240, "two running jobs", driver)
    held = [clusters.SLURM_EPILOG_HOLD / raw for raw in _raw_ids(running)]
    try:
        for marker in held:
            marker.touch()
        driver.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=120)
        assert driver.returncode == 130, out.decode()[-2000:]
        cancelled = [p.parent for p in (results / "quickstart" / "bundles").glob("*/cancelled")]
        assert len(cancelled) >= 2
        ids, before = [(b / "job_id").read_text().strip() for b in cancelled], set(_job_ids(results))
        wait_for(lambda: all(s == "COMPLETING" for s in _states(ids).values()), 30, f"jobs {ids} COMPLETING")

        from windtunnel.config.hydra import load_sweep
        from windtunnel.executors import make_executor

        # what the re-run's executor sees: a cancelled job in an active state, not re-attached
        ex = make_executor(load_sweep("quickstart", cmd[cmd.index("-q") + 1:]).executor, results / "quickstart")
        assert [ex.squeue.state(j, fresh=True) for j in ids] == ["COMPLETING"] * len(ids)
        assert [ex.reattach(b) for b in cancelled] == [None] * len(cancelled)
        rerun = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _cleanup.append(rerun)
        # the held jobs keep their CPUs: the re-run has decided (and submitted anew) while they are COMPLETING
        wait_for(lambda: set(_job_ids(results)) - before, 120, "the re-run's first submission", rerun)
        assert all(s == "COMPLETING" for s in _states(ids).values()), _states(ids)
    finally:
        for marker in held:
            marker.unlink(missing_ok=True)
    out, _ = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, out.decode()[-3000:]
    trials = quickstart_study(results).get_trials(deepcopy=False)
    final = [t for t in trials if not t.user_attrs.get("retried")]
    assert len(final) == 3 and all(t.state == TS.COMPLETE for t in final)
    assert all(t.user_attrs.get("attempt", 1) == 1 for t in trials), [(t.number, t.user_attrs) for t in trials]


def _two_running(results: Path) -> list[str] | None:
    """This sweep's running jobs once there are two; running, not pending: only a job that ran
    goes through the Epilog."""
    jobs = [j for j, state in _states(_our_jobs(results)).items() if state == "RUNNING"]
    return jobs if len(jobs) >= 2 else None


def _job_ids(results: Path) -> list[str]:
    return [p.read_text().strip() for p in (results / "quickstart" / "bundles").glob("*/job_id")]


def _squeue(fields: str) -> list[list[str]]:
    r = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", fields], capture_output=True, text=True,
                       timeout=30, check=True)
    return [line.split("|") for line in r.stdout.splitlines()]


def _raw_ids(jobs: list[str]) -> list[str]:
    """The SLURM_JOB_ID of each job (an array task 122_1 has its own number), which the Epilog reads."""
    raw = dict(_squeue("%i|%A"))
    return [raw[j] for j in jobs]


def _states(jobs: list[str]) -> dict[str, str]:
    states = dict(_squeue("%i|%T"))
    return {j: states.get(j) for j in jobs}


def test_slurm_time_limit_requeues_and_resumes(tmp_path, slurm_cluster, _cleanup):
    """A job near its time limit: Slurm sends it USR2 (submitit's --signal, slurm_signal_delay_s
    before the limit), submitit calls the Checkpointable's checkpoint() and requeues the same job
    (`scontrol requeue`), and the requeued job resumes from the trainer's checkpoint in the bundle
    folder: the trial completes once, every evaluation once. Slurm sends that signal on a 30-s
    tick, up to a minute early (sbatch(1), --signal), so waiting for a real 1-minute limit took
    minutes and a trial length measured on the machine; here the same USR2 goes to the job as
    soon as its first checkpoint is there. Under a 10-minute limit submitit takes any USR2 for a
    time-out, as at a real limit (it compares the job's time with min(0.8 × limit, limit - 10 min)),
    and Slurm's own signal is minutes away. The job's `scontrol` lingers after the requeue, so the
    requeue's own SIGTERM kills it, as happens on a slow node: submitit's handler then
    raises CalledProcessError in the middle of training, which must not become the trial's result.
    Mutants caught: BundleJob not a Checkpointable (no requeue: the job ends without a result), the
    worker not resuming from ckpt/latest.pt, and the killed scontrol written as a failed trial."""
    results = tmp_path / "results"
    shim = tmp_path / "bin"
    shim.mkdir()
    real = shutil.which("scontrol")
    (shim / "scontrol").write_text(f'#!/bin/sh\n{real} "$@"; rc=$?\n[ "$1" = requeue ] && sleep 30\nexit $rc\n')
    (shim / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}  # sbatch exports it to the job
    tokens, every = 400 * 1024, 40 * 1024  # ~10 s on one core; a checkpoint and an evaluation every 40 steps
    driver = subprocess.Popen(_sweep_cmd(results, slurm_cluster.partition, 1, tokens, "pruner.type=none",
                                         f"train.eval_every={every}", f"executor.checkpoint_every={every}",
                                         "executor.time_min=10", "executor.max_requeues=2"),
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _cleanup.append(driver)
    bundle = results / "quickstart" / "bundles" / "trial-00000"
    wait_for(lambda: (bundle / "ckpt" / "latest.pt").exists(), 180, "a checkpoint", driver)
    job = (bundle / "job_id").read_text().strip()
    assert not (bundle / "result.json").exists()
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)  # to the job's steps, as --signal does

    out, _ = driver.communicate(timeout=400)
    assert driver.returncode == 0, out.decode()[-3000:]
    trials = check_accounted(results, 1)
    assert trials[0].state == TS.COMPLETE and not trials[0].user_attrs.get("retried")
    res = _result(bundle)
    assert res["resumed_from_step"] > 0, res
    assert res["tokens"] == tokens
    assert len(res["curve"]) == 10  # every evaluation once, whatever the restarts
    log = (bundle / "worker.log").read_text()
    assert "(restart 1)" in log, log  # Slurm restarted the same job (requeue), not a new one
    assert (bundle / "job_id").read_text().strip() == job and "resubmitted" not in log, log
    assert _our_jobs(results) == []
