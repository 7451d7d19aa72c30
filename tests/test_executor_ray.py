"""executor=ray against a real local Ray cluster, connected by address (fixture `ray_address`):
a sweep of 8 trials, each with an MLflow child run and a trials.csv row; and a Ray worker
SIGKILLed mid-trial: that trial is retried, the sweep completes, every trial accounted for; and,
on a cluster of its own, a driver stopped by SIGTERM and one whose cluster stops under it."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from helpers import check_accounted, quickstart_study, wait_for

pytestmark = pytest.mark.ray


def _sweep_cmd(results: Path, address: str, n: int, tokens: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "windtunnel.cli", "sweep", "quickstart", "-q", f"n_trials={n}",
            f"results_dir={results}", f"train.tokens={tokens}", "train.eval_every=20000", "population.size=1",
            "executor=ray", f"executor.address={address}", *extra]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_ray_sweep_by_address(tmp_path, ray_address):
    results = tmp_path / "results"
    driver = subprocess.Popen(_sweep_cmd(results, ray_address, 8, 40000), cwd=tmp_path, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, out[-3000:] + err[-3000:]
    trials = check_accounted(results, 8)
    assert not any(t.user_attrs.get("retried") for t in trials)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) >= 4
    # the bundles ran as Ray tasks in the cluster's workers, not in the driver process
    pids = {int((results / "quickstart" / "bundles" / f"trial-{t.number:05d}" / "worker.pid").read_text())
            for t in trials}
    assert pids and driver.pid not in pids, (driver.pid, pids)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def _drivers():
    """Drivers a failing test leaves running are killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_ray_worker_sigkill_is_retried(tmp_path, ray_address, _drivers):
    results = tmp_path / "results"
    n = 4
    # ~5 s trials (200k tokens on one core); no pruner, so every trial runs to its end; a
    # checkpoint every 40k tokens is the evidence that a worker is training
    driver = subprocess.Popen(_sweep_cmd(results, ray_address, n, 200000, "pruner.type=none", "executor.retries=1",
                                         "executor.checkpoint_every=40000"),
                              cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _drivers.append(driver)
    bundles = results / "quickstart" / "bundles"

    def training_worker():
        for pidfile in sorted(bundles.glob("trial-*/worker.pid")):
            if (pidfile.parent / "result.json").exists() or not (pidfile.parent / "ckpt" / "latest.pt").exists():
                continue
            pid = int(pidfile.read_text())
            if "ray::" in _cmdline(pid):  # Ray names its worker processes after the running task
                return pidfile.parent, pid
        return None

    bundle_dir, pid = wait_for(training_worker, 180, "a Ray worker past its first checkpoint", driver)
    assert not (bundle_dir / "result.json").exists()
    os.kill(pid, signal.SIGKILL)

    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out.decode()[-3000:]
    assert not (bundle_dir / "result.json").exists()  # the killed task never finished
    trials = check_accounted(results, n)
    killed = json.loads((bundle_dir / "payload.json").read_text())["trials"][0]["number"]
    t = next(t for t in trials if t.number == killed)
    assert t.user_attrs.get("retried"), t.user_attrs
    assert "WorkerLost" in t.user_attrs.get("reason", "") or "Ray worker lost" in t.user_attrs.get("reason", ""), \
        t.user_attrs.get("reason")
    retry = next(r for r in trials if r.user_attrs.get("retry_of") == killed)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.user_attrs["attempt"] == 2


def test_ray_sweep_stopped_then_its_cluster_gone(tmp_path, _drivers):
    """Against its own cluster: SIGTERM stops the driver as Ctrl-C does (ray.init had pointed
    SIGTERM at sys.exit: exit 15 and a C++ stack dump); the cluster stopped under a running sweep
    stops it with one line (it had failed every trial for good, exit 0); neither spends a retry."""
    import shutil
    import tempfile

    import clusters  # tests/clusters.py

    port = clusters.free_port()
    temp_dir = tempfile.mkdtemp(prefix="wt-ray-", dir="/tmp")  # Ray's socket paths must stay short
    address = clusters.ray_up(port=port, num_cpus=2, temp_dir=temp_dir, address_file=None, quiet=True)
    results = tmp_path / "results"
    cmd = _sweep_cmd(results, address, 4, 600000, "tracking.enabled=false", "executor.workers=2", "pruner.type=none")
    bundles = results / "quickstart" / "bundles"

    def run_until_two_train(signal_it):
        driver = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _drivers.append(driver)
        wait_for(lambda: len(list(bundles.glob("*/worker.pid"))) >= 2, 180, "two trials training", driver)
        signal_it(driver)
        out, _ = driver.communicate(timeout=120)
        for pid in bundles.glob("*/worker.pid"):  # a later run's workers write their own
            pid.unlink()
        return driver.returncode, out.decode()

    try:
        rc, out = run_until_two_train(lambda d: d.send_signal(signal.SIGTERM))
        assert rc == 130 and "interrupted" in out and "SIGTERM received" not in out, out[-2000:]
        rc, out = run_until_two_train(lambda d: clusters.ray_down(port=port, address_file=None, quiet=True))
        lines = [line for line in out.splitlines() if line.startswith("windtunnel sweep: error:")]
        assert rc == 1 and lines == ["windtunnel sweep: error: the Ray cluster this sweep ran on stopped; start it "
                                     "again and re-run the sweep: the trials it had running run again"], out[-3000:]
    finally:
        clusters.ray_down(port=port, address_file=None, quiet=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
    # the same sweep finished on this machine's processes: every trial once, none charged a retry
    local = [c for c in cmd if not c.startswith(("executor=", "executor.address="))] + ["executor=local"]
    r = subprocess.run(local, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    trials = quickstart_study(results).get_trials(deepcopy=False)
    final = [t for t in trials if not t.user_attrs.get("retried")]
    assert len(final) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in final)
    assert all(t.user_attrs.get("attempt", 1) == 1 for t in trials), [(t.number, t.user_attrs.get("reason")) for t in trials]
