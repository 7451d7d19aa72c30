"""The Tracker: a sweep's (or a large run's) handle on MLflow. Every call appends one record to
the outbox and returns; a child process (windtunnel/tracking/deliverer.py) delivers it.

    tracker = Tracker(uri, experiment="quickstart", outbox=sweep_dir / "tracking" / "outbox.jsonl")
    parent = tracker.start_invocation(params, tags)          # parent run: one per sweep invocation
    tracker.log_trial(parent, number, attempt, params, curve, metrics, status, tags)   # child run
    tracker.log_artifacts(parent, [plot, best_yaml, report_md])
    tracker.finish_invocation(parent)
    tracker.flush(timeout=30); tracker.close()

uri "" is the local store `sqlite:///<sweep>/tracking/mlflow.db` (artifacts beside it), resolved
from the outbox's own location at delivery time, so a moved results dir still syncs.
"""
from __future__ import annotations

import os
import shlex
import time
import uuid
from pathlib import Path

from windtunnel.tracking.outbox import NAME, Outbox, now_ms, records
from windtunnel.tracking.state import load_state, read_status, records_at
from windtunnel.tracking.store import HTTP_ENV, resolve_uri


class Tracker:
    """The handle on MLflow. Every method appends one record and returns; see the module doc.

    Why an outbox: a sweep must never wait for, or fail because of, a tracking server; a call
    imports nothing from MLflow. Delivery runs in a child process
    (`python -m windtunnel.tracking.deliverer TRACKING_DIR --uri URI`), not
    a thread: delivering one trial costs ~25 ms of Python (MLflow's SQL store even more), which
    in a thread would hold the driver's GIL. The child is started in __init__; its stdin is the
    lifeline: a byte per record wakes it, and when the pipe closes (close(), or the driver dies)
    it makes one last delivery pass and exits. `flush(timeout)` waits for it by reading the
    state file; `close()` stops it. What is not delivered stays in the outbox for `sync`.
    """

    def __init__(self, uri: str, experiment: str, outbox: Path):
        import subprocess
        import sys

        self.uri = (uri or "").strip()
        self.experiment = str(experiment)
        self.outbox_path = Path(outbox)
        self.dir = self.outbox_path.parent
        if self.outbox_path.name != NAME:
            from windtunnel.errors import ConfigError

            raise ConfigError(f"tracking outbox: must be named outbox.jsonl (got {self.outbox_path})")
        self._outbox = Outbox(self.outbox_path)
        self._mode = "own"
        env = {**os.environ}
        for name, value in HTTP_ENV.items():  # the child's own client: fail fast, it retries itself
            env.setdefault(name, value)
        self._proc = subprocess.Popen([sys.executable, "-m", "windtunnel.tracking.deliverer", str(self.dir), "--uri", self.uri],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, close_fds=True,
                                      start_new_session=True)  # Ctrl-C is for the driver; the pipe stops it
        self._pipe = self._proc.stdin.fileno()
        os.set_blocking(self._pipe, False)

    @property
    def resolved_uri(self) -> str:
        return resolve_uri(self.dir, self.uri)

    @property
    def last_error(self) -> str | None:
        """The deliverer's last error ('' or None once it delivers again)."""
        return read_status(self.dir).get("error") or None

    def delivered(self) -> int:
        """Outbox bytes handled for this tracker's URI (from the state file)."""
        state = load_state(self.dir, quiet=True)
        return int(state["targets"].get(self.uri, {}).get("offsets", {}).get(self._mode, 0))

    # -- the calls: each appends one record ------------------------------------------------------
    def _poke(self, byte: bytes) -> None:
        if self._proc.stdin.closed:
            return
        try:
            os.write(self._pipe, byte)
        except (BlockingIOError, BrokenPipeError, OSError):
            pass  # full: the child is awake anyway; gone: records wait for `sync`

    def _append(self, record: dict) -> None:
        if self._outbox.fd < 0:
            raise RuntimeError("Tracker is closed")
        self._outbox.append({"uri": self.uri, "experiment": self.experiment, "time": now_ms(), **record})
        self._poke(b"w")

    def start_invocation(self, params: dict, tags: dict, key: str | None = None, name: str | None = None) -> str:
        """A parent run (a sweep's invocation; a large run, with its own key and name)."""
        key = key or f"inv-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self._append({"op": "invocation", "key": key, "name": name or f"{self.experiment}-{key[4:19]}",
                      "params": params or {}, "tags": tags or {}})
        return key

    def reopen(self, key: str, tags: dict) -> None:
        """The run of `key` is RUNNING again (a large run resumed), with these tags."""
        self._append({"op": "reopen", "key": f"{key}/reopen-{uuid.uuid4().hex[:8]}", "parent": key, "tags": tags or {}})

    def log_metrics(self, key: str, points: list[dict]) -> None:
        """Metric points of the run of `key`: [{"step", "time" (ms), "values": {name: number}}]."""
        self._append({"op": "metrics", "key": f"{key}/metrics-{uuid.uuid4().hex[:8]}", "parent": key,
                      "points": points})

    def log_trial(self, parent_key: str, number: int, attempt: int, params: dict, curve: list[dict],
                  metrics: dict, status: str, tags: dict | None = None) -> None:
        self._append({"op": "trial", "key": f"{parent_key}/trial-{int(number)}-{int(attempt)}", "parent": parent_key,
                      "number": int(number), "attempt": int(attempt), "params": params or {},
                      "curve": curve or [], "metrics": metrics or {}, "status": status, "tags": tags or {}})

    def log_artifacts(self, parent_key: str, paths: list[Path]) -> None:
        sweep_dir = self.dir.parent.resolve()
        out = []
        for p in paths:
            p = Path(p).resolve()
            out.append(str(p.relative_to(sweep_dir)) if p.is_relative_to(sweep_dir) else str(p))
        self._append({"op": "artifacts", "key": f"{parent_key}/artifacts-{uuid.uuid4().hex[:8]}",
                      "parent": parent_key, "paths": out})

    def finish_invocation(self, parent_key: str, status: str = "FINISHED", at_ms: int | None = None) -> None:
        self._append({"op": "finish", "key": f"{parent_key}/finish", "parent": parent_key, "status": status,
                      **({"time": int(at_ms)} if at_ms is not None else {})})

    def logged_trials(self) -> set[tuple[int, int]]:
        """(number, attempt) of each trial of this experiment that this URI's server holds or is
        to get (records_at): what a sweep's catch-up and a `report --mlflow` replay leave out."""
        return {(r["number"], r["attempt"]) for r in records_at(self.dir, self.uri)
                if r.get("op") == "trial" and r.get("experiment") == self.experiment}

    def end_unfinished(self) -> int:
        """End as KILLED the invocations of this experiment and URI whose process died before it
        finished them (SIGKILL, a machine gone): their parent runs stayed RUNNING in MLflow for
        good. Each ends at its last record's time. Returns how many."""
        recs = records(self.dir)
        mine = {r["key"] for r in recs if r.get("op") == "invocation" and r.get("uri", "") == self.uri
                and r.get("experiment") == self.experiment}
        last: dict[str, int] = {}
        for r in recs:
            key = r.get("key") if r.get("op") == "invocation" else r.get("parent")
            if key in mine:
                last[key] = max(last.get(key, 0), int(r.get("time") or 0))
        ended = {r.get("parent") for r in recs if r.get("op") == "finish"}
        for key in sorted(mine - ended):
            self.finish_invocation(key, status="KILLED", at_ms=last[key])
        return len(mine - ended)

    # -- waiting and stopping ------------------------------------------------------------------
    def flush(self, timeout: float = 30.0, until_error: bool = False) -> bool:
        """Wait until every record appended so far is delivered; False when `timeout` ran out
        (or the deliverer is gone; with until_error, as soon as this deliverer failed once)."""
        target = self.outbox_path.stat().st_size
        deadline = time.monotonic() + timeout
        self._poke(b"f")  # retry now, not at the end of a backoff
        while True:
            if self.delivered() >= target:
                return True
            if time.monotonic() >= deadline or self._proc.poll() is not None or (until_error and self._failed()):
                return self.delivered() >= target
            time.sleep(0.05)

    def undelivered(self) -> str:
        """The line to print when records were left waiting for `windtunnel sync` (the sweep's or
        the run's folder is the one above the tracking dir)."""
        return (f"MLflow: not every record was delivered ({self.last_error}); they wait in {self.dir}: "
                f"`windtunnel sync {shlex.quote(str(self.dir.parent))}` sends them")

    def _failed(self) -> bool:
        """This tracker's own deliverer has reported an error (not an earlier process's)."""
        status = read_status(self.dir)
        return status.get("pid") == self._proc.pid and bool(status.get("error"))

    def close(self, timeout: float = 15.0) -> None:
        """Close the outbox and the lifeline: the deliverer makes one last pass (at most `timeout`
        seconds) and exits."""
        import subprocess

        self._outbox.close()
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.terminate()  # it stops between two records
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
