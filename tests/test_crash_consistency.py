"""Commands SIGKILLed mid-write, then run again: what they leave is whole (or absent), no temp
file stays in the user's folders, and the re-run gives what an uninterrupted run gives."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from helpers import wait_for
from windtunnel.tracking.outbox import Outbox
from windtunnel.tracking.store import local_uri


def _cli(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "windtunnel.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _outbox(tracking, trials: int) -> None:
    """The records a tracked sweep of `trials` trials appends (tracking.Tracker), to the local store."""
    out = Outbox(tracking / "outbox.jsonl")
    base = {"uri": "", "experiment": "quickstart", "time": int(time.time() * 1000)}
    out.append({**base, "op": "invocation", "key": "inv-1", "name": "quickstart-1", "params": {"n_trials": trials},
                "tags": {"windtunnel.sweep": "quickstart"}})
    for n in range(trials):
        out.append({**base, "op": "trial", "key": f"inv-1/trial-{n}-1", "parent": "inv-1", "number": n,
                    "attempt": 1, "params": {"optim.lr": 0.01 * (n + 1)},
                    "curve": [{"tokens": 1024 * s, "val_loss": 5.0 - s} for s in (1, 2, 3)],
                    "metrics": {"final_val_loss": 2.0}, "status": "FINISHED", "tags": {}})
    out.append({**base, "op": "finish", "key": "inv-1/finish", "parent": "inv-1", "status": "FINISHED"})
    out.close()


def _size(path) -> int:
    """Its size, 0 once gone: SQLite's -journal files come and go between a listing and a stat."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


# Run as `python -c KILLED_AT_COMMIT N windtunnel-args...`: the CLI, SIGKILLed by itself when
# SQLAlchemy begins its N-th commit (the first ~70 build a new store's schema): a kill at a known
# point of MLflow's migrations, whatever the machine's speed (a poll on the file's size raced a
# creation that takes ~0.3 s on a fast machine).
KILLED_AT_COMMIT = """
import os, runpy, signal, sys
import sqlalchemy
from sqlalchemy import event
n = int(sys.argv.pop(1))
commits = [0]
@event.listens_for(sqlalchemy.engine.Engine, "commit")
def _commit(conn):
    commits[0] += 1
    if commits[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
sys.argv[0] = "windtunnel"
runpy.run_module("windtunnel.cli", run_name="__main__")
"""


def _killed_at_commit(n: int, *args, cwd) -> None:
    """The CLI with args, SIGKILLed at the n-th commit into a store it creates (fails if it was not)."""
    r = subprocess.run([sys.executable, "-c", KILLED_AT_COMMIT, str(n), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, f"not killed at commit {n} (exit {r.returncode}): {r.stderr[-2000:]}"


def test_sync_killed_while_it_creates_the_local_store(tmp_path):
    """MLflow creates a new SQLite store in dozens of migrations (~70 commits): `sync` (or the
    sweep's deliverer) SIGKILLed among them left a store every later delivery failed on ('table
    ... already exists'). The store now appears whole or not at all, and the next sync delivers
    every record once. Killed at four points of the creation. Mutant caught: _create_sqlite_store
    building the store in place (SqlAlchemyStore on the final path)."""
    for commit in (5, 25, 45, 65):
        tracking = tmp_path / f"at{commit}" / "quickstart" / "tracking"
        _outbox(tracking, 3)
        _killed_at_commit(commit, "sync", tracking.parent, cwd=tmp_path)
        assert not (tracking / "mlflow.db").exists(), f"killed at commit {commit} of the store's creation, yet it is there"
        assert [n for n in os.listdir(tracking) if n.endswith(".tmp")], "the kill left no half-made store"

        again = _cli("sync", tracking.parent, cwd=tmp_path)
        assert again.returncode == 0 and again.stdout.strip().endswith("sent 5, 0 pending"), again.stdout + again.stderr
        assert not [n for n in os.listdir(tracking) if n.startswith(".")], os.listdir(tracking)  # no temp left
        client = mlflow.MlflowClient(local_uri(tracking))
        runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id], max_results=100)
        assert sorted(r.info.run_name for r in runs) == ["quickstart-1", "trial-0000", "trial-0001", "trial-0002"]
        assert all(r.info.status == "FINISHED" for r in runs)
        child = next(r for r in runs if r.info.run_name == "trial-0001")
        assert [m.value for m in client.get_metric_history(child.info.run_id, "val_loss")] == [4.0, 3.0, 2.0]


def _kill_when(cmd, cwd, folder, prefixes, what):
    """Start cmd and SIGKILL it as soon as a file whose name starts with one of `prefixes`
    appears in `folder` (a temp file being written): returns that name."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # polled tightly: a small figure takes ~50 ms
        try:
            seen = next((n for n in os.listdir(folder) if n.startswith(prefixes)), None)
        except FileNotFoundError:
            seen = None
        if seen:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return seen
        time.sleep(0.002)
    out = proc.communicate(timeout=60)[0].decode(errors="replace")
    pytest.fail(f"{cmd[3]} ended (exit {proc.returncode}) before {what}: {out[-2000:]}")


def test_fit_and_report_killed_mid_write_leave_no_temp_file_after_a_rerun(tmp_path):
    """A figure or table is written to a hidden temp file and renamed: a SIGKILL during the write
    left that temp (`.lr.png.k2x9a1`) in the user's folder for good, one more per kill. The next
    write of the same file now removes the temps of writers that are gone."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    fit = [sys.executable, "-m", "windtunnel.cli", "fit", "lr-transfer", "--input",
           str(repo / "results" / "windtunnel" / "lr_width"), "--plot", "out/lr.png"]
    seen = _kill_when(fit, tmp_path, tmp_path / "out", (".lr.png.",), "fit's figure being written")
    assert (tmp_path / "out" / seen).exists()  # SIGKILL runs no cleanup: the temp is there
    again = subprocess.run(fit, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert os.listdir(tmp_path / "out") == ["lr.png"]

    results = tmp_path / "results"
    sweep = _cli("sweep", "quickstart", "-q", "n_trials=3", f"results_dir={results}", "train.tokens=20000",
                 "train.eval_every=10000", "population.size=1", "pruner.type=none", "tracking.enabled=false",
                 cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    sd = results / "quickstart"
    before = {n: (sd / n).read_bytes() for n in os.listdir(sd) if n.endswith((".csv", ".yaml", ".md", ".png"))}
    report = [sys.executable, "-m", "windtunnel.cli", "report", str(sd)]
    seen = _kill_when(report, tmp_path, sd, (".loss_vs_params.png.", ".history.png."), "report's plots being written")
    assert (sd / seen).exists()
    again = subprocess.run(report, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [n for n in os.listdir(sd) if n.startswith(".")] == []
    assert {n: (sd / n).read_bytes() for n in before} == before  # what an uninterrupted report writes


def test_a_killed_or_stopped_sweep_leaves_no_mlflow_run_running(tmp_path):
    """Each invocation of a tracked sweep is a parent run: a driver SIGKILLed, or stopped with
    SIGTERM, never ended its run, which MLflow showed RUNNING for good. A stop now ends it KILLED;
    a killed driver's run is ended KILLED (at its last record's time) by the next run."""
    from helpers import check_accounted, finished_count

    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "windtunnel.cli", "sweep", "quickstart", "-q", "n_trials=5", f"results_dir={results}",
           "train.tokens=40000", "train.eval_every=20000", "executor.workers=2", "population.size=1",
           "pruner.type=none"]
    for sig, at in ((signal.SIGKILL, 1), (signal.SIGTERM, 3)):
        driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for(lambda: finished_count(results) >= at, 240, f"{at} finished trials", driver)
        driver.send_signal(sig)
        out, _ = driver.communicate(timeout=120)
        assert driver.returncode == (-9 if sig == signal.SIGKILL else 130), out.decode()[-2000:]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    check_accounted(results, 5)

    client = mlflow.MlflowClient(local_uri(results / "quickstart" / "tracking"))
    exp = client.get_experiment_by_name("quickstart")
    parents = [r for r in client.search_runs([exp.experiment_id], max_results=100, order_by=["attributes.start_time ASC"])
               if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["KILLED", "KILLED", "FINISHED"]
    assert all(r.info.end_time >= r.info.start_time for r in parents)


def test_a_trial_killed_while_it_saves_a_checkpoint_leaves_no_temp_after_the_resume(tmp_path):
    """A checkpoint is written to a temp and renamed: SIGKILLed while the temp is being written, the
    trial left it for good (tens of MB here; GBs for a large population). The resumed trial starts
    from the last whole checkpoint and its next save removes the dead writer's temp."""
    def temps(ckpt):
        return [e.name for e in os.scandir(ckpt) if e.name.endswith(".tmp")] if ckpt.is_dir() else []

    for attempt in range(3):  # a kill can land just after the rename: then no temp is left; again
        ckpt = tmp_path / f"ckpt{attempt}"
        args = ["trial", "-q", "model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.seq_len=64",
                "train.batch_size=8", f"train.tokens={24 * 8 * 64}", f"train.checkpoint_every={8 * 64}",
                f"train.checkpoint_dir={ckpt}", "train.device=cpu", "data.max_bytes=300000"]
        p = subprocess.Popen([sys.executable, "-m", "windtunnel.cli", *args], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        try:
            while not temps(ckpt) and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            assert temps(ckpt), "no checkpoint temp seen while the trial ran: " + (p.stderr.read() if p.poll() is not None else "")
            p.kill()  # SIGKILL: no cleanup runs
        finally:
            p.kill()
            p.wait()
        if temps(ckpt):  # the killed save's temp is there
            break
    else:
        pytest.fail("three kills each landed after a checkpoint's rename")
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    names = {e.name for e in os.scandir(ckpt)}  # the checkpoint, its checksum, the previous good one
    assert {"latest.pt", "latest.pt.sha256"} <= names <= {"latest.pt", "latest.pt.sha256", "latest.pt.prev",
                                                          "latest.pt.prev.sha256"}, sorted(names)


def test_a_trial_sigkilled_after_a_checkpoint_resumes_to_the_uninterrupted_losses(tmp_path):
    """A real `windtunnel trial` SIGKILLed once a checkpoint is there (no cleanup, no on_checkpoint
    hook), then run again: every point of its loss curve, train and validation, equals an
    uninterrupted run's bit for bit (CPU, fp32, one thread both). Checkpoints fall on evaluations,
    so each train_loss averages the same steps. Mutants caught: the trainer's state without the
    data streams' RNG state (`rngs` in Population._state) or without the optimizer's (`opt`)."""
    import json

    import torch

    from windtunnel.config.hydra import trial_config
    from windtunnel.trainer import train_trial

    every = 10 * 8 * 32  # 10 steps of 8 sequences of 32 tokens; 80 steps
    overrides = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.kernels=torch",
                 "train.batch_size=8", f"train.tokens={8 * every}", f"train.eval_every={every}", "train.device=cpu",
                 "data.max_bytes=300000"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = train_trial(trial_config(overrides)).curve
    finally:
        torch.set_num_threads(threads)
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "windtunnel.cli", "trial", "--json", *overrides, f"train.checkpoint_dir={ckpt}",
           f"train.checkpoint_every={every}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # polled every 10 ms against the ~70 steps (a second or more) the trial has left to run
        wait_for(lambda: (ckpt / "latest.pt").exists(), 240, "a checkpoint", p, poll_s=0.01)
        p.kill()
        assert p.wait() == -signal.SIGKILL, "the trial ended before the kill: nothing was resumed"
    finally:
        p.kill()
        p.wait()
    saved = torch.load(ckpt / "latest.pt", weights_only=False)["step"]
    assert 10 <= saved < 80 and saved % 10 == 0, saved
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads(r.stdout)["curve"]
    assert [p["step"] for p in resumed] == [p["step"] for p in full] == list(range(10, 81, 10))
    assert resumed == full


def test_atomic_writes_from_threads_of_one_process_do_not_collide(tmp_path):
    """Each write gets its own temp (a name per process was shared by its threads: one thread's
    rename took the file another was writing)."""
    import threading

    from windtunnel.files import write_atomically

    path, errors = tmp_path / "x.json", []

    def write(i):
        try:
            for _ in range(200):
                write_atomically(path, lambda t: t.write_text(str(i)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"], errors[:1]


def test_a_large_run_killed_while_it_creates_its_sqlite_store_logs_when_relaunched(tmp_path):
    """`windtunnel train` with large_run.tracking_uri=sqlite:///...: rank 0 and its MLflow deliverer
    (windtunnel/tracking/large_run.py) SIGKILLed while MLflow built the new store left one every relaunch
    failed on; the store appears whole or not at all."""
    import yaml

    from windtunnel.config.trial import DataConfig, ModelConfig, TrainConfig, TrialConfig, to_dict

    proxy = TrialConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=16, kernels="torch"),
                        data=DataConfig(max_bytes=300_000), train=TrainConfig(device="cpu", batch_size=16))
    (tmp_path / "best.yaml").write_text(yaml.safe_dump({"sweep": "t", "number": 0, "value": 3.0, "trial": to_dict(proxy)}))
    r = _cli("transfer", tmp_path / "best.yaml", "--target", "tiny-cpu", "gpus_per_node=1", "seq_len=16", "run_name=m",
             "--out", tmp_path / "exp", "--batch-size", "256", "--tokens", "25600", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    db = tmp_path / "m.db"
    cmd = ["train", tmp_path / "exp" / "train.yaml", "large_run.stop_after_steps=3", f"large_run.tracking_uri=sqlite:///{db}"]
    proc = subprocess.Popen([sys.executable, "-m", "windtunnel.cli", *map(str, cmd)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def half_made():
        return [(n, s) for n in os.listdir(tmp_path) if n.lstrip(".").startswith("m.db")
                and (s := _size(tmp_path / n)) >= 350_000]

    seen = wait_for(half_made, 120, "the store's creation to reach 350 kB", proc)
    for pid in [*_children(proc.pid), proc.pid]:  # the deliverer creates the store
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not db.exists(), f"killed while creating the store ({seen}), yet it is there"
    again = _cli(*cmd, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    [run] = client.search_runs([client.get_experiment_by_name("windtunnel-large-runs").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 1


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out
