"""Shared fixtures: real clusters and servers on this machine (markers: ray, slurm, mlflow_server).

    ray_address            session  "127.0.0.1:PORT" of a local Ray cluster started for this session
    slurm_cluster          session  SlurmInfo(partition, node, cpus, conf, logs) of the single-node Slurm
    mlflow_server          session  "http://127.0.0.1:PORT" of an MLflow server (SQLite store)
    mlflow_server_control  function the MlflowServer behind it: .stop() / .start() / .restart() /
                                    .is_up(); the server is up again after the test whatever it did
    free_port()            function (import it: `from conftest import free_port`)

Set WINDTUNNEL_KEEP_CLUSTERS=1 to leave Slurm running after the session. With CI=true a cluster
or tool that is missing fails the tests instead of skipping them (`unavailable(reason)`).

For the whole session (and the processes it starts): prepared data goes to a temp dir
(WINDTUNNEL_CACHE), not ~/.cache; without CUDA, TRITON_INTERPRET=1 is set before anything imports
triton, so the interpreter tests run whatever file is collected first; torch's global RNG is
seeded before each test.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET once, at its first import: set it here, before any test module.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
_CACHE = tempfile.mkdtemp(prefix="wt-cache-")
os.environ["WINDTUNNEL_CACHE"] = _CACHE  # set before any fixture starts a cluster: its workers inherit it

import clusters  # noqa: E402  (tests/clusters.py: the tests' own Slurm and Ray bring-up)
from clusters import free_port  # noqa: F401,E402  (re-exported for tests)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str):
    """Skip on a developer's machine; fail in CI, where every cluster and tool must be there.
    Tests import it: `from conftest import unavailable`."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item):
    """Tests marked `root` (a mount, /etc, system daemons): skipped for a normal user, with the
    reason, so `make test` runs as one; under CI=true (as root) they run, and fail if they cannot."""
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        unavailable(f"{item.name} needs root (CI runs it as root)")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Each test draws the same random numbers whatever ran before it."""
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_address():
    """A local Ray cluster for this session (`ray start --head` on a free port, its own temp dir,
    so a plain `ray.init()` elsewhere never joins it); RAY_ADDRESS is cleared while it lives.
    Tests connect with `ray.init(address=ray_address)` and call `ray.shutdown()` when done."""
    saved = os.environ.pop("RAY_ADDRESS", None)
    port = clusters.free_port()
    # Short path: Ray's unix sockets live below it and must stay under 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="wt-ray-", dir="/tmp")
    try:
        address = clusters.ray_up(port=port, num_cpus=2, temp_dir=temp_dir, address_file=None, quiet=True)
    except clusters.ClusterError as e:
        shutil.rmtree(temp_dir, ignore_errors=True)
        unavailable(f"local Ray cluster did not start: {e}")
    try:
        yield address
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        clusters.ray_down(port=port, address_file=None, quiet=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


# --------------------------------------------------------------------------------------- Slurm


@pytest.fixture(scope="session")
def slurm_cluster():
    """The machine's single-node Slurm, brought up (and installed) through tests/clusters.py.

    Sessions share it: the last session out stops it, and only when a fixture started it.
    """
    reason = clusters.slurm_cannot_start_reason()
    if reason:
        unavailable(reason)
    try:
        info = clusters.slurm_acquire()
    except clusters.ClusterError as e:
        pytest.fail(f"single-node Slurm did not come up: {e}", pytrace=False)
    try:
        yield info
    finally:
        clusters.slurm_release(keep=bool(os.environ.get("WINDTUNNEL_KEEP_CLUSTERS")))


# -------------------------------------------------------------------------------------- MLflow


class _PortTaken(RuntimeError):
    pass


class MlflowServer:
    """`mlflow server` on 127.0.0.1:PORT with a SQLite store and local artifacts under `root`.

    stop() and start() keep the port and the store, so runs logged before a stop are there after.
    The port is outside the ephemeral range (clusters.free_port); one taken by another process
    between its choice and the server's bind is replaced by another at the first start, and
    waited for at a restart (the URI is known by then).
    """

    def __init__(self, root: Path, port: int | None = None, startup_timeout_s: float = 90):
        self.root = Path(root)
        self._port_chosen = port is None
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._started = False
        self.log = self.root / "server.log"
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        mlflow = Path(sys.executable).with_name("mlflow")
        return [str(mlflow) if mlflow.exists() else "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--default-artifact-root", str(self.root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def is_up(self, timeout: float = 2) -> bool:
        """True when /health answers 200."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> str:
        if self._proc is not None and self._proc.poll() is None and self.is_up():
            return self.uri
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                uri = self._start_once()
                self._started = True
                return uri
            except _PortTaken:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server: port {self.port} stayed taken by another process") from None
                if self._port_chosen and not self._started:  # nobody knows the URI yet: another port
                    self.port = free_port()
                    self.uri = f"http://127.0.0.1:{self.port}"
                else:  # a restart: the URI is in use, wait for the port
                    time.sleep(1)

    def _start_once(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
            # No background job runner (7 huey consumer processes): tracking is all we need.
            env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            # Own session: stop() signals the whole group (the server and its uvicorn worker).
            self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            # another server on the port answers /health too: only ours, alive, counts
            if self._proc.poll() is not None:
                break
            if self.is_up() and self._proc.poll() is None:
                return self.uri
            time.sleep(0.5)
        self.stop()
        text = self.log.read_bytes()[log_start:].decode(errors="replace")
        if "address already in use" in text.lower():  # uvicorn's words for EADDRINUSE
            raise _PortTaken(self.port)
        tail = text.strip().splitlines()[-1:] or ["(empty log)"]
        raise RuntimeError(f"mlflow server on port {self.port} did not answer /health: {tail[0]} (log: {self.log})")

    def stop(self, timeout: float = 20) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The uvicorn worker may outlive the parent for a moment: wait for the port to close.
        deadline = time.monotonic() + 10
        while self.is_up(timeout=0.5) and time.monotonic() < deadline:
            time.sleep(0.2)

    def restart(self) -> str:
        self.stop()
        return self.start()


@pytest.fixture(scope="session")
def _mlflow_server_process(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        server.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(_mlflow_server_process) -> str:
    """Tracking URI of a session-wide MLflow server (SQLite backend, 127.0.0.1)."""
    return _mlflow_server_process.uri


@pytest.fixture
def mlflow_server_control(_mlflow_server_process):
    """The MlflowServer behind `mlflow_server`, for tests that take it down mid-way."""
    yield _mlflow_server_process
    _mlflow_server_process.start()  # no-op when it is up
