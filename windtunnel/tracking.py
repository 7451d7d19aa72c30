"""MLflow tracking for sweeps: every call appends one record to an outbox; a child process delivers it.

    tracker = Tracker(uri, experiment="quickstart", outbox=sweep_dir / "tracking" / "outbox.jsonl")
    parent = tracker.start_invocation(params, tags)          # parent run: one per sweep invocation
    tracker.log_trial(parent, number, attempt, params, curve, metrics, status, tags)   # child run
    tracker.log_artifacts(parent, [plot, best_yaml, report_md])
    tracker.finish_invocation(parent)
    tracker.flush(timeout=30); tracker.close()

Why an outbox: a sweep must never wait for, or fail because of, a tracking server. A call only
appends one JSON line (one `write` on an O_APPEND file) and returns; it imports
nothing from MLflow. A child process (`follow`, started by the Tracker; a process and not a
thread, so that MLflow's Python work never holds the driver's GIL) reads the outbox in order and
delivers it with
`MlflowClient` (`log_batch` of <= 1000 metrics, <= 100 params, <= 100 tags: one call per point is
~20x slower, mlflow issue 5269). What it delivered is kept in `tracking/state.json` (temp file +
rename): per target URI, the byte offset reached in the outbox and the map local key -> run id.
When the server is down the deliverer backs off and retries; what is left at exit stays in the
outbox, and `windtunnel sync RESULTS_DIR[/SWEEP]` (`sync()` here) delivers it later.

Nothing lost, nothing duplicated: each run carries its record's key as the tag `windtunnel.key`.
Before a chunk of records is delivered, the keys it will create are written to the state as
`pending`; a pending key is looked up with `search_runs` before its run is created, so a delivery
cut off between `create_run` and the state write does not create a second run. Without a state
(first delivery to a URI, or the file lost) every key is looked up. Metric points
carry the record's timestamp, so re-sending them after an interruption is a no-op in MLflow's SQL
stores (they drop identical points). The HTTP client does no retries of its own
(MLFLOW_HTTP_REQUEST_MAX_RETRIES=0, unless set): a retried POST whose first answer was lost could
create a second run, and a down server would stall the deliverer for minutes.

uri "" is the local store `sqlite:///<sweep>/tracking/mlflow.db` (artifacts beside it), resolved
from the outbox's own location at delivery time, so a moved results dir still syncs.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from windtunnel.files import write_json

log = logging.getLogger(__name__)

STATE = "state.json"
STATUS = "deliverer.json"  # the deliverer's last error, for Tracker.last_error
LOCK = "deliver.lock"
MAX_METRICS = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAMS_TAGS = 100  # MAX_PARAMS_TAGS_PER_BATCH (params and tags each)
MAX_ENTITIES = 1000  # MAX_ENTITIES_PER_BATCH (all three together)
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
CHUNK = 64  # records delivered between two state writes
# The deliverer's own MLflow HTTP settings (used unless the user set them): fail fast, we retry.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
TERMINAL = ("FINISHED", "FAILED", "KILLED")
# MLflow error codes that retrying cannot fix: the record is skipped with a warning
PERMANENT = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "MALFORMED_REQUEST"}


def local_uri(tracking_dir: Path) -> str:
    """The default store of a sweep: a SQLite file beside its outbox."""
    return f"sqlite:///{Path(tracking_dir).resolve()}/mlflow.db"


def resolve_uri(tracking_dir: Path, uri: str) -> str:
    """The server a record's uri names: '' is the sweep's local store (as `sync` prints it)."""
    return uri or local_uri(tracking_dir)


def _now_ms() -> int:
    return int(time.time() * 1000)


# ----------------------------------------------------------------------------------- outbox


class _Outbox:
    """The append side: one `os.write` per record on an O_APPEND fd. No fsync, as for the study's
    journal (windtunnel/search.py): a killed process loses nothing that reached the OS; only a
    machine crash could, and a torn last line is ended on the next open."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # it names the server
        size = os.fstat(self.fd).st_size
        if size:  # a record cut short by a crash: end it, so the next one starts on a fresh line
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self.fd, b"\n")

    def append(self, record: dict) -> None:
        data = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _read_records(path: Path, offset: int) -> list[tuple[int, dict | None]]:
    """Complete lines after `offset` as (end offset, record or None when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return []
    out, pos = [], offset
    for line in data.split(b"\n")[:-1]:  # the last piece has no newline yet: not a record
        pos += len(line) + 1
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.append((pos, rec if isinstance(rec, dict) and "op" in rec else None))
        except ValueError:
            out.append((pos, None))
    return out


# ------------------------------------------------------------------------------------ state


def _load_state(tracking_dir: Path, quiet: bool = False) -> dict:
    try:
        state = json.loads((tracking_dir / STATE).read_text())
        if isinstance(state, dict) and isinstance(state.get("targets"), dict):
            return state
        if not quiet:
            log.warning("%s: unreadable, delivering from the start (run keys prevent duplicates)", tracking_dir / STATE)
    except FileNotFoundError:
        pass
    except ValueError:
        if not quiet:
            log.warning("%s: unreadable, delivering from the start (run keys prevent duplicates)", tracking_dir / STATE)
    return {"version": 1, "targets": {}}


def _save_state(tracking_dir: Path, state: dict) -> None:
    # the owner's only: it names the servers
    write_json(tracking_dir / STATE, state, indent=None, separators=(",", ":"), fsync=True, mode=0o600)


def _target_state(state: dict, uri: str) -> dict:
    t = state["targets"].setdefault(uri, {})
    for k, default in (("offsets", {}), ("experiments", {}), ("runs", {}), ("pending", [])):
        t.setdefault(k, default)
    return t


# ------------------------------------------------------------------------------ MLflow side


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


_env_lock = threading.Lock()
_env_users, _env_saved = 0, {}


@contextlib.contextmanager
def _http_env():
    """HTTP_ENV (where the user set none) while a delivery runs, then the environment as it was:
    `sync` called inside another program (a test session, a notebook) must not leave that
    program's own MLflow clients without retries. Concurrent deliveries share one setting."""
    global _env_users, _env_saved
    with _env_lock:
        if _env_users == 0:
            _env_saved = {name: os.environ.get(name) for name in HTTP_ENV}
            for name, value in HTTP_ENV.items():
                os.environ.setdefault(name, value)
        _env_users += 1
    try:
        yield
    finally:
        with _env_lock:
            _env_users -= 1
            if _env_users == 0:
                for name, value in _env_saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


_KEY_BAD = re.compile(r"[^\w\-. /:]")


def _key(k: Any) -> str:
    """A valid MLflow param/metric/tag name (alphanumerics, _ - . space / :), at most 250 chars."""
    return _KEY_BAD.sub("_", str(k))[:MAX_KEY] or "_"


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def ensure_store(uri: str) -> None:
    """Before the first MLflow call on uri: a SQLite store that does not exist yet is created whole."""
    if uri.startswith("sqlite:///") and "?" not in uri and ":memory:" not in uri:
        _create_sqlite_store(Path(uri[len("sqlite:///"):]))


def _create_sqlite_store(db: Path) -> None:
    """Create the SQLite store at db, unless it exists, whole or not at all. MLflow builds a new
    store's schema in dozens of migrations, committed one by one: a process killed among them left
    a store every later connection failed on ('table ... already exists'), so no record could be
    delivered there again. Here the schema is built under a temp name and linked into place when
    complete; a link never replaces a store another process created meanwhile."""
    if db.exists():
        return
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from windtunnel.files import remove_stale_temps, temp_prefix

    db.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(db)  # a creation killed before: its temp store and journal
    tmp = db.with_name(f"{temp_prefix(db)}{uuid.uuid4().hex[:8]}.tmp")
    uri = f"sqlite:///{tmp}"
    try:
        store = SqlAlchemyStore(uri, DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
        store.engine.dispose()  # no connection to the temp name outlives it
        getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
        try:
            os.link(tmp, db)
        except FileExistsError:
            pass  # another process created it first: theirs is used
        except OSError:  # a filesystem without hard links: a rename, after one last look
            if not db.exists():
                os.replace(tmp, db)
    finally:
        for p in (tmp, tmp.with_name(tmp.name + "-journal")):
            p.unlink(missing_ok=True)


class _Busy(Exception):
    """Another process (a `windtunnel sync`, or the sweep's deliverer) is delivering this outbox."""


class _Delivery:
    """Delivers one outbox to one MLflow URI, in order, resuming from the state file.

    own_only: deliver the records addressed to `uri` (the deliverer, and `sync` without --uri);
    otherwise every record goes to `uri` (`sync --uri`: copy a sweep's records to another store).
    """

    def __init__(self, tracking_dir: Path, uri: str, own_only: bool = True):
        self.dir = Path(tracking_dir)
        self.uri = uri
        self.own_only = own_only
        self.mode = "own" if own_only else "all"
        self._client = None
        self._verify_all = True
        self._created: set[str] = set()
        self.skipped = 0  # records skipped for good: refused by MLflow, or of an unknown op
        self._replays: set[str] = set()  # `report --mlflow` invocations: copies, not copied again

    @property
    def resolved_uri(self) -> str:
        return resolve_uri(self.dir, self.uri)

    def client(self):
        if self._client is None:
            _quiet_mlflow()
            from mlflow.tracking import MlflowClient

            uri = self.resolved_uri
            ensure_store(uri)
            self._client = MlflowClient(tracking_uri=uri)
            _quiet_mlflow()  # the SQL store configures its loggers on first use
        return self._client

    def _selected(self, rec: dict | None) -> bool:
        if rec is None:
            return False
        if self.own_only:
            return rec.get("uri", "") == self.uri
        # copying every record to one store: a replay (`report --mlflow`) re-sent the sweep's own
        # runs to another server; its copy would duplicate them here
        return (rec.get("parent") or rec.get("key")) not in self._replays

    # -- the loop ------------------------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool] = lambda: False, wait_lock_s: float = 0.0,
            progress: Callable[[int], None] | None = None, drop: bool = False) -> tuple[int, int]:
        """Deliver what is pending; returns (sent, still pending). Raises when MLflow fails.
        drop: deliver nothing, count what was pending as handled; returns (0, how many)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK, "a") as lock:
            deadline = time.monotonic() + wait_lock_s
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise _Busy(f"{self.dir}: another process is delivering these records") from None
                    time.sleep(0.2)
            try:
                with _http_env():
                    return self._drop_locked() if drop else self._run_locked(should_stop, progress)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _drop_locked(self) -> tuple[int, int]:
        state = _load_state(self.dir)
        t = _target_state(state, self.uri)
        records = _read_records(self.dir / "outbox.jsonl", int(t["offsets"].get(self.mode, 0)))
        if records:
            t["offsets"][self.mode] = records[-1][0]
            t["pending"] = []
            _save_state(self.dir, state)
        return 0, sum(self._selected(r) for _, r in records)

    def _run_locked(self, should_stop, progress) -> tuple[int, int]:
        state = _load_state(self.dir)
        t = _target_state(state, self.uri)
        offset = int(t["offsets"].get(self.mode, 0))
        if not self.own_only:
            self._replays = _replays(self.dir / "outbox.jsonl")
        # First delivery to this URI from this outbox, or a lost state file: runs may exist already.
        self._verify_all = offset == 0
        records = _read_records(self.dir / "outbox.jsonl", offset)
        sent = 0
        i = 0
        try:
            while i < len(records) and not should_stop():
                chunk = records[i:i + CHUNK]
                creating = [r["key"] for _, r in chunk if self._selected(r) and r["op"] in ("invocation", "trial")
                            and r.get("key") not in t["runs"]]
                if creating:
                    t["pending"] = sorted(set(t["pending"]) | set(creating))
                    _save_state(self.dir, state)
                for end, rec in chunk:
                    if should_stop():
                        break
                    if rec is None:
                        log.warning("%s: skipped an unreadable record ending at byte %d", self.dir / "outbox.jsonl", end)
                    elif self._selected(rec):
                        if self._deliver_one(rec, t):
                            sent += 1
                        else:
                            self.skipped += 1
                    offset = end
                    t["offsets"][self.mode] = offset
                    i += 1
                if progress is not None:
                    progress(offset)
        finally:
            t["pending"] = [k for k in t["pending"] if k not in t["runs"]]
            t["offsets"][self.mode] = offset
            if sent or records:
                _save_state(self.dir, state)
        if progress is not None:
            progress(offset)
        left = sum(self._selected(r) for end, r in records if end > offset)
        return sent, left

    def _deliver_one(self, rec: dict, t: dict) -> bool:
        """True when delivered; False when skipped for good (refused by MLflow, or unknown)."""
        from mlflow.exceptions import MlflowException

        try:
            return getattr(self, f"_op_{rec['op']}")(rec, t) is not False  # an op returns False when it skips
        except MlflowException as e:
            if e.error_code not in PERMANENT:
                raise
            log.warning("MLflow at %s refused record %s (%s): %s; skipped", self.resolved_uri,
                        rec.get("key"), rec.get("op"), str(e).splitlines()[0][:300])
        except AttributeError:
            log.warning("unknown tracking record op %r; skipped", rec.get("op"))
        return False

    # -- experiments and runs ------------------------------------------------------------------
    def _experiment_id(self, name: str, t: dict) -> str:
        if name in t["experiments"]:
            return t["experiments"][name]
        from mlflow.exceptions import MlflowException

        client = self.client()
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = None
            if self.resolved_uri.startswith("sqlite:///"):
                db = Path(self.resolved_uri[len("sqlite:///"):])
                location = (db.parent / "artifacts" / name).resolve().as_uri()
            try:
                # experimentKind: MLflow 3's UI shows a training experiment's runs, not a GenAI overview
                exp_id = client.create_experiment(name, artifact_location=location,
                                                  tags={"mlflow.experimentKind": "custom_model_development"})
                self._created.add(name)  # ours and new: it holds no runs to look up
            except MlflowException as e:  # a concurrent creator won (mlflow issue 4123)
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise e
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp_id)
        t["experiments"][name] = exp_id
        return exp_id

    def _find_run(self, exp_id: str, key: str):
        from mlflow.entities import ViewType

        runs = self.client().search_runs([exp_id], filter_string=f"tags.`windtunnel.key` = '{key}'",
                                         run_view_type=ViewType.ALL, max_results=10,
                                         order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    def _create_or_find(self, rec: dict, t: dict, run_name: str, start_time: int, tags: dict):
        """(run id, found finished): the run of this record, created unless a previous delivery did."""
        exp_id = self._experiment_id(rec["experiment"], t)
        if (self._verify_all and rec["experiment"] not in self._created) or rec["key"] in t["pending"]:
            run = self._find_run(exp_id, rec["key"])
            if run is not None:
                return run.info.run_id, run.info.status in TERMINAL
        run = self.client().create_run(exp_id, start_time=start_time, tags=tags, run_name=run_name)
        return run.info.run_id, False

    def _log_batch(self, run_id: str, metrics: list, params: dict, tags: dict) -> None:
        from mlflow.entities import Param, RunTag

        params_l = [Param(_key(k), str(v)[:MAX_PARAM_VALUE]) for k, v in params.items()]
        tags_l = [RunTag(_key(k), str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
        while metrics or params_l or tags_l:
            p, params_l = params_l[:MAX_PARAMS_TAGS], params_l[MAX_PARAMS_TAGS:]
            g, tags_l = tags_l[:MAX_PARAMS_TAGS], tags_l[MAX_PARAMS_TAGS:]
            n = min(MAX_METRICS, MAX_ENTITIES - len(p) - len(g))
            m, metrics = metrics[:n], metrics[n:]
            self.client().log_batch(run_id, metrics=m, params=p, tags=g)

    # -- one method per record op --------------------------------------------------------------
    def _op_invocation(self, rec: dict, t: dict) -> None:
        key = rec["key"]
        if key in t["runs"]:
            return
        tags = {"windtunnel.key": key, **{_key(k): str(v)[:MAX_TAG_VALUE] for k, v in (rec.get("tags") or {}).items()}}
        run_id, _ = self._create_or_find(rec, t, rec.get("name") or key, rec["time"], tags)
        self._log_batch(run_id, [], _flat(rec.get("params") or {}), {})
        t["runs"][key] = run_id

    def _op_trial(self, rec: dict, t: dict) -> None:
        from mlflow.entities import Metric

        key = rec["key"]
        if key in t["runs"]:
            return
        parent_id = t["runs"].get(rec.get("parent", ""))
        number, attempt = int(rec["number"]), int(rec["attempt"])
        name = f"trial-{number:04d}" + (f"-attempt{attempt}" if attempt > 1 else "")
        tags = {"windtunnel.key": key, "windtunnel.trial_number": str(number), "windtunnel.attempt": str(attempt)}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        ts = int(rec["time"])
        final = rec.get("metrics") or {}
        seconds = _number(final.get("seconds"))
        start = ts - int(seconds * 1000) if seconds is not None and math.isfinite(seconds) and seconds >= 0 else ts
        run_id, finished = self._create_or_find(rec, t, name, start, tags)
        if not finished:
            metrics, last = [], 0
            for point in rec.get("curve") or []:
                step = point.get("tokens", point.get("step"))
                if _number(step) is None or not math.isfinite(step):
                    continue
                step = int(step)
                last = max(last, step)
                for name_ in ("train_loss", "val_loss", "lr"):
                    v = _number(point.get(name_))
                    if v is not None:
                        metrics.append(Metric(name_, v, ts, step))
            for k, v in _flat(final).items():
                v = _number(v)
                if v is not None:
                    metrics.append(Metric(_key(k), v, ts, last))
            self._log_batch(run_id, metrics, _flat(rec.get("params") or {}), rec.get("tags") or {})
            status = rec.get("status", "FINISHED")
            self.client().set_terminated(run_id, status=status if status in TERMINAL else "FINISHED", end_time=ts)
        t["runs"][key] = run_id

    def _op_artifacts(self, rec: dict, t: dict) -> bool | None:
        run_id = t["runs"].get(rec.get("parent", ""))
        if run_id is None:
            log.warning("artifacts record %s: its invocation was never delivered; skipped", rec.get("key"))
            return False
        sweep_dir = self.dir.parent
        for p in rec.get("paths") or []:
            path = Path(p) if os.path.isabs(p) else sweep_dir / p
            if not path.is_file():
                log.warning("artifact %s no longer exists; skipped", path)
                continue
            rel = Path(p).parent if not os.path.isabs(p) else Path(".")
            self.client().log_artifact(run_id, str(path), artifact_path=None if str(rel) == "." else str(rel))

    def _op_metrics(self, rec: dict, t: dict) -> bool | None:
        """A large run's points (windtunnel/run_tracking.py): {"step", "time", "values"} each."""
        from mlflow.entities import Metric

        run_id = t["runs"].get(rec.get("parent", ""))
        if run_id is None:
            log.warning("metrics record %s: its run was never delivered; skipped", rec.get("key"))
            return False
        metrics = [Metric(_key(k), float(v), int(pt.get("time") or rec["time"]), int(pt["step"]))
                   for pt in rec.get("points") or [] for k, v in (pt.get("values") or {}).items()
                   if _number(v) is not None and math.isfinite(v)]
        self._log_batch(run_id, metrics, {}, {})

    def _op_reopen(self, rec: dict, t: dict) -> bool | None:
        """A resumed large run: its run is RUNNING again, with this launch's tags (git commit, versions)."""
        run_id = t["runs"].get(rec.get("parent", ""))
        if run_id is None:
            log.warning("reopen record %s: its run was never delivered; skipped", rec.get("key"))
            return False
        self.client().update_run(run_id, status="RUNNING")
        self._log_batch(run_id, [], {}, {_key(k): str(v)[:MAX_TAG_VALUE] for k, v in (rec.get("tags") or {}).items()})

    def _op_finish(self, rec: dict, t: dict) -> None:
        run_id = t["runs"].get(rec.get("parent", ""))
        if run_id is not None:
            status = rec.get("status", "FINISHED")
            self.client().set_terminated(run_id, status=status if status in TERMINAL else "FINISHED",
                                         end_time=int(rec["time"]))


# ---------------------------------------------------------------------------------- Tracker


class Tracker:
    """The sweep's handle on MLflow. Every method appends one record and returns; see the module doc.

    Delivery runs in a child process (`python -m windtunnel.tracking TRACKING_DIR --uri URI`), not
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
        if self.outbox_path.name != "outbox.jsonl":
            from windtunnel.errors import ConfigError

            raise ConfigError(f"tracking outbox: must be named outbox.jsonl (got {self.outbox_path})")
        self._outbox = _Outbox(self.outbox_path)
        self._mode = "own"
        env = {**os.environ}
        for name, value in HTTP_ENV.items():  # the child's own client: fail fast, it retries itself
            env.setdefault(name, value)
        self._proc = subprocess.Popen([sys.executable, "-m", "windtunnel.tracking", str(self.dir), "--uri", self.uri],
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
        try:
            return json.loads((self.dir / STATUS).read_text()).get("error") or None
        except (FileNotFoundError, ValueError):
            return None

    def delivered(self) -> int:
        """Outbox bytes handled for this tracker's URI (from the state file)."""
        state = _load_state(self.dir, quiet=True)
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
        self._outbox.append({"uri": self.uri, "experiment": self.experiment, "time": _now_ms(), **record})
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
        records = [r for _, r in _read_records(self.outbox_path, 0) if r is not None]
        mine = {r["key"] for r in records if r.get("op") == "invocation" and r.get("uri", "") == self.uri
                and r.get("experiment") == self.experiment}
        last: dict[str, int] = {}
        for r in records:
            key = r.get("key") if r.get("op") == "invocation" else r.get("parent")
            if key in mine:
                last[key] = max(last.get(key, 0), int(r.get("time") or 0))
        ended = {r.get("parent") for r in records if r.get("op") == "finish"}
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

    def _failed(self) -> bool:
        """This tracker's own deliverer has reported an error (not an earlier process's)."""
        try:
            status = json.loads((self.dir / STATUS).read_text())
        except (FileNotFoundError, ValueError):
            return False
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


# ------------------------------------------------------------------------------- deliverer


def _write_status(tracking_dir: Path, error: str | None) -> None:
    write_json(tracking_dir / STATUS, {"pid": os.getpid(), "error": error, "time": _now_ms()}, indent=None)


def follow(tracking_dir: Path, uri: str, wake_fd: int = 0) -> int:
    """The deliverer's loop (the Tracker's child process): deliver as records arrive, back off
    while MLflow fails, and exit after one last pass once `wake_fd` reaches EOF or on SIGTERM."""
    import select
    import signal

    tracking_dir = Path(tracking_dir)
    delivery = _Delivery(tracking_dir, uri, own_only=True)
    outbox = tracking_dir / "outbox.jsonl"
    stopping = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))
    done, failures, eof, error = 0, 0, False, None

    def wait(seconds: float) -> bool:
        """Sleep until a byte arrives or `seconds` pass; True when asked to retry now ('f')."""
        nonlocal eof
        if eof:
            return False
        ready, _, _ = select.select([wake_fd], [], [], seconds)
        if ready:
            data = os.read(wake_fd, 65536)
            if not data:
                eof = True
            return b"f" in data
        return False

    while not stopping["now"]:
        last_pass = eof
        try:
            size = outbox.stat().st_size
        except FileNotFoundError:
            size = 0
        if done < size:
            try:
                delivery.run(should_stop=lambda: stopping["now"],
                             progress=lambda off: None)
                done = size if not stopping["now"] else done
                failures = 0
                if error is not None:
                    log.warning("MLflow at %s: delivering again", delivery.resolved_uri)
                    error = None
                    _write_status(tracking_dir, None)
            except _Busy:
                wait(1.0)
                continue
            except Exception as e:  # noqa: BLE001 - keep going: the sweep's records must get there
                failures += 1
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                if error is None:
                    log.warning("MLflow at %s: %s; records wait in %s and are retried (or `windtunnel sync %s`)",
                                delivery.resolved_uri, msg, outbox, tracking_dir.parent)
                error = msg
                _write_status(tracking_dir, error)
                if last_pass:
                    break
                wait(min(10.0, 0.5 * 2 ** (failures - 1)))
                continue
        if last_pass:
            break
        wait(5.0)
    return 0


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m windtunnel.tracking",
                                description="deliver a sweep's tracking outbox as it grows (started by Tracker)")
    p.add_argument("tracking_dir")
    p.add_argument("--uri", default="")
    args = p.parse_args(argv)
    # yield the CPU to the driver and trials; set here, not by Popen's preexec_fn, which runs Python
    # between fork and exec: unsafe in a process with threads (a large run's rank 0: NCCL's, gloo's)
    os.nice(10)
    logging.basicConfig(level=logging.WARNING, format="windtunnel tracking: %(message)s")
    for name, value in HTTP_ENV.items():  # the deliverer's own process (Tracker passes them too)
        os.environ.setdefault(name, value)
    _quiet_mlflow()
    return follow(Path(args.tracking_dir), args.uri)


# ------------------------------------------------------------------------------------- sync


def outbox_dirs(path: Path) -> list[Path]:
    """The tracking dirs under a sweep folder (RESULTS_DIR/SWEEP) or a results folder (RESULTS_DIR)."""
    path = Path(path)
    if (path / "tracking" / "outbox.jsonl").is_file():
        return [path / "tracking"]
    return sorted(p.parent for p in path.glob("*/tracking/outbox.jsonl"))


def _replays(outbox: Path) -> set[str]:
    """The invocations `windtunnel report --mlflow` appended (a replay of the study) that repeat
    runs the sweep tracked itself; a replay of a sweep run with tracking off is its only copy."""
    records = [r for _, r in _read_records(outbox, 0) if r is not None]
    replays = {r["key"] for r in records if r.get("op") == "invocation" and "replayed_from" in (r.get("params") or {})}
    tracked = any(r.get("op") == "trial" and r.get("parent") not in replays for r in records)
    return replays if tracked else set()


def records_at(tracking_dir: Path, uri: str) -> list[dict]:
    """The outbox's records that the server at uri holds or is to get: those addressed to it
    (delivered, waiting, or dropped by `sync --drop`, which counts them as handled) and those
    `sync --uri` copied there (or was copying when cut off). Servers compare resolved, so '' and
    the local store's path are one. Built from the append-only outbox and the atomically replaced
    state, so a crash anywhere leaves a consistent answer, erring towards 'held' (no duplicate)."""
    state = _load_state(tracking_dir, quiet=True)
    records = [r for _, r in _read_records(tracking_dir / "outbox.jsonl", 0) if r is not None]
    server = resolve_uri(tracking_dir, uri)
    same = {u for u in {*state["targets"], *(r.get("uri", "") for r in records)}
            if resolve_uri(tracking_dir, u) == server}
    targets = state["targets"]
    copied = {k for u in same & targets.keys() for k in [*targets[u].get("runs", {}), *targets[u].get("pending", [])]}
    return [r for r in records if r.get("uri", "") in same or r.get("key") in copied]


def outbox_uris(tracking_dir: Path) -> list[str]:
    """The URIs the outbox's records are addressed to, in order of first use ('' = the local store)."""
    return list(dict.fromkeys(r.get("uri", "") for _, r in _read_records(tracking_dir / "outbox.jsonl", 0)
                              if r is not None))


def drop_pending(tracking_dir: Path, uri: str, wait_lock_s: float = 60.0) -> int:
    """Stop waiting for `uri` (a server gone for good; as its records name it, or as `sync` prints
    it): its undelivered records count as handled. They stay in the outbox, and `sync --uri OTHER`
    can still copy them elsewhere. Returns how many."""
    from windtunnel.errors import ConfigError

    named = {u: u for u in outbox_uris(tracking_dir)} | {resolve_uri(tracking_dir, u): u
                                                          for u in outbox_uris(tracking_dir)}
    if uri not in named:
        raise ConfigError(f"--drop: {tracking_dir.parent}'s records go to no {uri!r} "
                          f"(allowed: {', '.join(repr(u) for u in dict.fromkeys(named.values()))})")
    d = _Delivery(tracking_dir, named[uri], own_only=True)
    return d.run(wait_lock_s=wait_lock_s, drop=True)[1]


def _sync_dir(tracking_dir: Path, uri: str | None, wait_lock_s: float = 60.0) -> tuple[int, int, dict[str, int], str | None]:
    """(sent, skipped for good, {resolved URI: pending records}, error) for one sweep's outbox."""
    if uri is not None:
        deliveries = [_Delivery(tracking_dir, uri.strip(), own_only=False)]
    else:
        deliveries = [_Delivery(tracking_dir, u, own_only=True) for u in outbox_uris(tracking_dir)]
    sent, pending = 0, {}
    error = None
    for d in deliveries:
        try:
            s, p = d.run(wait_lock_s=wait_lock_s)
            sent += s
        except Exception as e:  # noqa: BLE001
            error = f"{d.resolved_uri}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            state = _target_state(_load_state(tracking_dir), d.uri)
            offset = int(state["offsets"].get(d.mode, 0))
            p = sum(d._selected(r) for _, r in _read_records(tracking_dir / "outbox.jsonl", offset))
        if p:
            pending[d.resolved_uri] = pending.get(d.resolved_uri, 0) + p
    return sent, sum(d.skipped for d in deliveries), pending, error


def sync(results_sweep_dir: Path, uri: str | None = None) -> tuple[int, int]:
    """Deliver a sweep's undelivered tracking records: (sent, still pending).

    uri None: each record goes to the URI its sweep used; a uri: every record goes there.
    results_sweep_dir may also be a results dir: every sweep in it is synced.
    """
    sent = pending = 0
    for d in outbox_dirs(results_sweep_dir):
        s, _, p, error = _sync_dir(d, uri)
        if error:
            log.warning("sync %s: %s", d.parent, error)
        sent += s
        pending += sum(p.values())
    return sent, pending


if __name__ == "__main__":
    raise SystemExit(_main())
