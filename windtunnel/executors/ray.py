"""Ray executor: each bundle is a Ray task calling `windtunnel.worker.run_bundle(payload)`.

Placement only: search, pruning and retries stay in the driver (Ray Tune's Optuna wrapper fixes
the pruner and once swallowed `tell` errors; STYLE.md). A task asks for
`cpus_per_trial × trials` CPUs and `min(1, gpus_per_trial × trials)` GPUs (fractional: 0.25 lets
four one-trial bundles share a GPU; Ray only books it, the trials really share the device), and
has `max_retries=0`: a worker that dies (SIGKILL, OOM, node lost) surfaces as `WorkerLost` and
the driver decides whether to retry.

    executor.address=''                 $RAY_ADDRESS when set (as inside `ray job submit`), else
                                        a new local instance (127.0.0.1, no dashboard)
    executor.address=auto               the cluster `ray start` left in /tmp/ray on this machine
    executor.address=HOST:PORT          a cluster's GCS
    executor.address=ray://HOST:PORT    Ray Client (a login node outside the cluster)

Workers on other nodes need the same Python environment (windtunnel importable), the data, and
the sweep folder on a shared filesystem (the study journal, for pruning).
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from windtunnel.executors import ExecutorGone, WorkerLost
from windtunnel.config.sweep import ExecutorConfig
from windtunnel.files import write_json, write_text
from windtunnel.worker import PAYLOAD, RESULT


def run_bundle_task(payload: dict) -> dict:
    """The task body: what `python -m windtunnel.worker` does, returning the outcome.

    Writes `worker.pid` (this worker's process, for a test that kills it) and `result.json` into
    the bundle folder when that folder is reachable from this node."""
    import traceback

    from windtunnel.worker import run_bundle

    d = Path(payload["bundle_dir"]) if payload.get("bundle_dir") else None
    if d is not None and d.is_dir():
        write_text(d / "worker.pid", f"{os.getpid()}\n")
    try:
        out = {"ok": True, "results": run_bundle(payload)}
    except Exception as e:  # deterministic: the driver fails the trials, no retry
        traceback.print_exc()
        out = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    if d is not None and d.is_dir():
        write_json(d / RESULT, out, indent=None)
    return out


def _token_auth_like_ray_start() -> None:
    """Ray 2.5x+: `ray start` turns token authentication on when a token exists (~/.ray/auth_token,
    which any plain `ray.init()` creates), but `ray.init(address=HOST:PORT)` does not, and is then
    refused. Do what `ray start` does; a token-mode client also joins a cluster without auth."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


class RayHandle:
    def __init__(self, ref, bundle_dir: Path):
        self.ref, self.bundle_dir = ref, bundle_dir

    def done(self) -> bool:
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        return bool(ready)

    def result(self) -> list[dict]:
        import ray
        from ray import exceptions as rx

        try:
            out = ray.get(self.ref)
        except rx.RayTaskError as e:
            # the task body catches Exception: what gets here is SystemExit / KeyboardInterrupt
            # (the worker was told to exit) or a failure to deserialize: the worker is gone
            raise WorkerLost(f"Ray worker ended abnormally: {str(e).splitlines()[0]}") from e
        except rx.TaskCancelledError as e:
            raise WorkerLost("Ray task was cancelled") from e
        except (rx.LocalRayletDiedError, rx.NodeDiedError) as e:
            # this machine's node (the driver's) gone is the cluster gone (ray-down, or our instance
            # ended); another node's death is a lost worker, retried elsewhere
            if isinstance(e, rx.LocalRayletDiedError) or ray.get_runtime_context().get_node_id() in str(e):
                raise ExecutorGone("the Ray cluster this sweep ran on stopped; start it again and re-run the "
                                   "sweep: the trials it had running run again") from e
            raise WorkerLost(f"Ray worker lost ({type(e).__name__}): {str(e).strip().splitlines()[0]}") from e
        except rx.RayError as e:  # WorkerCrashedError, NodeDiedError, OutOfMemoryError, ObjectLostError...
            raise WorkerLost(f"Ray worker lost ({type(e).__name__}): {str(e).strip().splitlines()[0]}") from e
        if not out["ok"]:
            raise RuntimeError(out["error"])
        return out["results"]

    def cancel(self) -> None:
        import ray

        try:
            ray.cancel(self.ref, force=True)
        except Exception:  # already finished, or its worker is gone
            pass


def cluster_address(cfg: ExecutorConfig) -> tuple[str, str]:
    """(address, the field it came from): executor.address, else RAY_ADDRESS (set inside `ray job
    submit` and by users who mean their cluster: a private instance there would run a cluster's
    sweep on one node); ('', '') for a new local instance."""
    if cfg.address:
        return cfg.address, "executor.address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return (env, "RAY_ADDRESS") if env else ("", "")


def _check_listening(address: str, timeout: float = 5.0, field: str = "executor.address") -> None:
    """ray.init(HOST:PORT) retries an absent GCS for minutes: a one-line error at once instead."""
    import socket

    from windtunnel.errors import ConfigError

    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").removeprefix("http://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{field}: must be '', auto, HOST:PORT or ray://HOST:PORT (got {address!r})")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        fix = "unset RAY_ADDRESS for a local one" if field == "RAY_ADDRESS" else \
            "leave executor.address empty for a local one"
        raise ConfigError(f"{field}: no Ray cluster answers at {address} ({e.strerror or e}); start one "
                          f"with `ray start --head`, or {fix}") from None


def _require_token() -> dict[str, str | None]:
    """Token authentication for the instance about to start, with a token made for it. Ray's GCS
    listens on every interface whatever _node_ip_address says, and without a token anyone who
    reaches its port could run code as this user. The token lives in this process's environment
    only (Ray's processes inherit it), is never printed or written, and is gone at close. A
    RAY_AUTH_MODE the user set is kept. Returns the variables to restore at close."""
    import secrets

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        return {}
    try:
        from ray._raylet import Config
    except ImportError:  # a Ray without token authentication: docs/safety.md says what listens
        return {}
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    Config.initialize("")  # as Ray's own _enable_token_auth: this process sees token mode too
    return saved


class RayExecutor:
    def __init__(self, cfg: ExecutorConfig):
        import ray

        self.cfg = cfg
        env = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
        self.connected = not ray.is_initialized()  # a notebook may have connected already: keep it
        # ray.init points SIGTERM at sys.exit: the driver's own handler (a clean stop) is put back
        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        address, field = cluster_address(cfg)
        if self.connected and address:
            _check_listening(address, field=field)
            _token_auth_like_ray_start()
            ray.init(address=address, runtime_env=env, log_to_driver=False, logging_level="WARNING")
        elif self.connected:  # a new instance of our own, nothing listening beyond 127.0.0.1
            self._token_vars = _require_token()
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", runtime_env=env,
                     log_to_driver=False, logging_level="WARNING")
        if main and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
        self.slots = cfg.workers or self._capacity()
        self._remote = ray.remote(run_bundle_task)

    def _capacity(self) -> int:
        """How many one-trial bundles the cluster holds at once: its GPUs / gpus_per_trial when
        trials take GPUs, else its CPUs / cpus_per_trial."""
        import ray

        res = ray.cluster_resources()
        if self.cfg.gpus_per_trial > 0:
            n = res.get("GPU", 0) / self.cfg.gpus_per_trial
            if n < 1:
                raise RuntimeError(f"executor.gpus_per_trial={self.cfg.gpus_per_trial}: the Ray cluster has "
                                   f"{res.get('GPU', 0):g} GPUs (set executor.gpus_per_trial=0 to train on CPUs)")
        else:
            n = res.get("CPU", 0) / max(self.cfg.cpus_per_trial, 1e-9)
        return max(1, int(n + 1e-9))

    def submit(self, payload: dict, bundle_dir: Path) -> RayHandle:
        bundle_dir.mkdir(parents=True, exist_ok=True)
        n = len(payload["trials"])
        cpus = self.cfg.cpus_per_trial * n
        gpus = min(1.0, self.cfg.gpus_per_trial * n) if self.cfg.gpus_per_trial > 0 else 0
        payload = {**payload, "threads": max(1, int(cpus))}
        write_json(bundle_dir / PAYLOAD, payload, indent=None)  # for the record: what this bundle ran
        (bundle_dir / RESULT).unlink(missing_ok=True)
        ref = self._remote.options(num_cpus=cpus, num_gpus=gpus, max_retries=0, retry_exceptions=False,
                                   name=f"run_bundle:{bundle_dir.name}").remote(payload)
        return RayHandle(ref, bundle_dir)

    def release(self, handle: RayHandle) -> None:
        pass

    def reattach(self, bundle_dir: Path):
        # Ray tasks share their owner's fate: the dead driver's tasks died with it. Re-run them.
        return None

    def close(self) -> None:
        import ray

        if self.connected and ray.is_initialized():
            ray.shutdown()  # disconnects from a cluster; stops the instance this executor started
        for name, value in getattr(self, "_token_vars", {}).items():  # the token dies with the instance
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
