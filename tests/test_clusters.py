"""The real clusters of this machine: single-node Slurm (submitit), local Ray, MLflow server."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import submitit

from conftest import free_port
import clusters  # tests/clusters.py
from windtunnel.executors.slurm import await_requeue_kill

CLUSTERS = [sys.executable, str(Path(__file__).with_name("clusters.py"))]  # the tests' bring-up, by hand


def _pickle_this_module_by_value():
    # Slurm jobs unpickle our functions in a fresh interpreter where `tests/` is not importable.
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --------------------------------------------------------------------------------------- Slurm


def _square(x: int):
    return x * x, socket.gethostname(), os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")


@pytest.mark.slurm
def test_slurm_status_command(slurm_cluster):
    r = subprocess.run([*CLUSTERS, "slurm-status"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "slurmctld: running" in r.stdout and slurm_cluster.partition in r.stdout


@pytest.mark.slurm
def test_submitit_job_array(slurm_cluster, tmp_path):
    _pickle_this_module_by_value()
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition=slurm_cluster.partition, cpus_per_task=1)
    jobs = ex.map_array(_square, [1, 2, 3])
    results = [j.result() for j in jobs]
    assert [r[0] for r in results] == [1, 4, 9]
    assert {r[1] for r in results} == {socket.gethostname()}
    assert len({r[2] for r in results}) == 1 and results[0][2] is not None  # one array job
    assert sorted(r[3] for r in results) == ["0", "1", "2"]


class _SleepsPastItsLimit(submitit.helpers.Checkpointable):
    """First run: record itself in a state file, then sleep past the time limit (Slurm sends
    SIGUSR2, submitit calls checkpoint() and requeues). The requeued run finds the state of the
    first and returns at once."""

    def __init__(self, state_file: str):
        self.state_file = state_file

    def __call__(self):
        p = Path(self.state_file)
        runs = json.loads(p.read_text()) if p.exists() else []
        runs.append({"restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"), "seen_before": len(runs)})
        p.write_text(json.dumps(runs))
        if len(runs) == 1:
            try:
                time.sleep(600)
            except Exception as e:  # as windtunnel's BundleJob: a requeue's scontrol killed by the requeue
                await_requeue_kill(e)
                raise
        return runs


@pytest.mark.slurm
def test_submitit_requeues_checkpointable_at_time_limit(slurm_cluster, tmp_path):
    """~1 minute: Slurm signals USR2 before the 1-minute limit, submitit requeues, the job reruns."""
    _pickle_this_module_by_value()
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm", slurm_max_num_timeout=2)
    ex.update_parameters(timeout_min=1, slurm_partition=slurm_cluster.partition, cpus_per_task=1,
                         slurm_signal_delay_s=30)
    state = tmp_path / "state.json"
    job = ex.submit(_SleepsPastItsLimit(str(state)))
    runs = job.result()
    assert len(runs) == 2, runs
    assert runs[1]["seen_before"] == 1  # the second run read the first run's state
    assert runs[1]["restart_count"] == "1"


# ----------------------------------------------------------------------------------------- Ray


@pytest.mark.ray
def test_ray_tasks_run_on_the_cluster(ray_address):
    import ray

    from windtunnel.executors.ray import _token_auth_like_ray_start

    assert "RAY_ADDRESS" not in os.environ
    _token_auth_like_ray_start()  # as the executor does: a token in ~/.ray makes `ray start` require it
    ray.init(address=ray_address)
    try:
        @ray.remote
        def where(i):
            ctx = ray.get_runtime_context()
            return i, os.getpid(), ctx.get_node_id()

        out = ray.get([where.remote(i) for i in range(6)])
        assert [o[0] for o in out] == list(range(6))
        assert os.getpid() not in {o[1] for o in out}  # ran in the cluster's workers
        node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert {o[2] for o in out} <= node_ids
        assert ray.cluster_resources()["CPU"] == 2  # the fixture's --num-cpus, not a fresh instance
        gcs = ray.get_runtime_context().gcs_address
        assert gcs.rsplit(":", 1)[1] == ray_address.rsplit(":", 1)[1]
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_ray_up_is_idempotent_and_down_stops_only_its_cluster(ray_address, tmp_path):
    addr_file = tmp_path / "address"
    port = int(ray_address.rsplit(":", 1)[1])
    # ray-up on a running cluster: prints the same address, starts nothing.
    r = subprocess.run([*CLUSTERS, "ray-up", "--port", str(port), "--address-file", str(addr_file)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ray_address == addr_file.read_text().strip()
    assert "already running" in r.stderr

    # A second cluster comes up beside it; ray-down stops that one and leaves the fixture's.
    other = free_port()
    temp_dir = Path(f"/tmp/wt-ray-other-{os.getpid()}")
    r = subprocess.run([*CLUSTERS, "ray-up", "--port", str(other), "--num-cpus", "1",
                        "--temp-dir", str(temp_dir), "--address-file", str(addr_file)],
                       capture_output=True, text=True, timeout=180)
    try:
        assert r.returncode == 0, r.stderr
        assert clusters.ray_is_up(f"127.0.0.1:{other}")
    finally:
        d = subprocess.run([*CLUSTERS, "ray-down", "--address-file", str(addr_file)],
                           capture_output=True, text=True, timeout=120)
        subprocess.run(["rm", "-rf", str(temp_dir)])
    assert d.returncode == 0 and f"127.0.0.1:{other}" in d.stdout, d.stdout + d.stderr
    assert not addr_file.exists()
    assert not clusters.ray_is_up(f"127.0.0.1:{other}")
    assert clusters.ray_is_up(ray_address)


# -------------------------------------------------------------------------------------- MLflow


def _rest(uri: str, endpoint: str, body: dict) -> dict:
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.mlflow_server
def test_mlflow_nested_run_survives_server_restart(mlflow_server, mlflow_server_control):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.create_experiment(f"clusters-test-{os.getpid()}-{time.time_ns()}")
    parent = client.create_run(exp, run_name="sweep").info.run_id
    child = client.create_run(exp, run_name="trial-0", tags={"mlflow.parentRunId": parent, "trial": "0"}).info.run_id
    client.log_metric(child, "loss", 3.25, step=7)
    client.set_terminated(child)
    client.set_terminated(parent)

    def children() -> list[dict]:
        found = _rest(mlflow_server, "runs/search", {
            "experiment_ids": [exp], "filter": f"tags.mlflow.parentRunId = '{parent}'"})
        return found.get("runs", [])

    runs = children()
    assert [r["info"]["run_id"] for r in runs] == [child]
    assert {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]} == {"loss": 3.25}

    mlflow_server_control.stop()
    assert not mlflow_server_control.is_up()
    with pytest.raises(OSError):
        _rest(mlflow_server, "experiments/get", {"experiment_id": exp})

    assert mlflow_server_control.start() == mlflow_server  # same port, same store
    runs = children()
    assert [r["info"]["run_id"] for r in runs] == [child]
    assert runs[0]["info"]["status"] == "FINISHED"


# ------------------------------------------------------------------- no cluster needed (fast)


def test_slurm_cannot_start_reason_names_root():
    """Asked by a real unprivileged user (a forked child that drops to nobody) where Slurm is not
    up (no Slurm tools on its PATH), the reason names root and the command to run first. A fork,
    not an exec: nobody may not be allowed to read the venv's Python or the checkout."""
    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child answers through the pipe and exits; it never returns into pytest
        code = 1
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            os.environ["PATH"] = ""  # no sinfo: Slurm is down for this process
            answer = {"euid": os.geteuid(), "writes_etc": os.access("/etc", os.W_OK),
                      "reason": clusters.slurm_cannot_start_reason()}
            os.write(write, json.dumps(answer).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    import select

    if not select.select([read], [], [], 60)[0]:  # a child hung (it should answer in milliseconds)
        os.kill(pid, 9)
    with os.fdopen(read) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and out, "the child as nobody did not answer"
    answer = json.loads(out)
    assert answer["euid"] != 0 and not answer["writes_etc"], answer
    reason = answer["reason"]
    assert reason is not None and "root" in reason and "slurm-up" in reason, reason


def test_cluster_command_rejects_bad_port():
    r = subprocess.run([*CLUSTERS, "ray-up", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--port" in r.stderr and "got 0" in r.stderr


def test_the_test_slurm_refuses_a_slurm_conf_it_did_not_write(tmp_path, monkeypatch):
    """A site's slurm.conf (no ClusterName=windtunnel) is neither rewritten nor its daemons
    stopped: slurm.sh up/down stop at once with one line naming the file, and the fixture's reason
    names it too. slurm.sh runs with only grep and dirname on PATH, so a missing guard reaches
    need_root (no `id`: 'must run as root') and fails here, touching nothing."""
    site = tmp_path / "slurm.conf"
    site.write_text("ClusterName=site\nSlurmctldHost=login1\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("grep", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "WINDTUNNEL_SLURM_CONF": str(site)}
    for action in ("up", "down"):
        r = subprocess.run(["/bin/bash", str(clusters.SLURM_SH), action], capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode == 1 and r.stderr.splitlines() == [
            f"slurm.sh: error: {site} exists and was not written by this script (no ClusterName=windtunnel); "
            "leaving this machine's Slurm alone"], r.stderr
    assert site.read_text() == "ClusterName=site\nSlurmctldHost=login1\n"
    ours = tmp_path / "ours.conf"
    ours.write_text((clusters.HERE / "slurm.conf.template").read_text())
    r = subprocess.run(["/bin/bash", str(clusters.SLURM_SH), "up"], capture_output=True, text=True,
                       env={**env, "WINDTUNNEL_SLURM_CONF": str(ours)}, timeout=30)
    assert r.returncode == 1 and "must run as root" in r.stderr and "not written" not in r.stderr, r.stderr

    monkeypatch.setattr(clusters, "SLURM_CONF", site)
    assert clusters.slurm_cannot_start_reason() == (
        f"{site} exists and was not written by tests/slurm/slurm.sh (no ClusterName=windtunnel); "
        "the test Slurm leaves this machine's Slurm alone")
    monkeypatch.setattr(clusters, "SLURM_CONF", ours)
    assert clusters.foreign_slurm_conf() is None
