"""Delivery: one outbox to one MLflow URI, in order, resuming from the state file (state.py).

Nothing lost, nothing duplicated: each run carries its record's key as the tag `windtunnel.key`.
Before a chunk of records is delivered, the keys it will create are written to the state as
`pending`; a pending key is looked up with `search_runs` before its run is created, so a delivery
cut off between `create_run` and the state write does not create a second run. Without a state
(first delivery to a URI, or the file lost) every key is looked up. Metric points carry the
record's timestamp, so re-sending them after an interruption is a no-op in MLflow's SQL stores
(they drop identical points). Records go in `log_batch` calls of <= 1000 metrics, <= 100 params,
<= 100 tags: one call per point is ~20x slower (mlflow issue 5269).
"""
from __future__ import annotations

import fcntl
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from windtunnel.tracking.outbox import NAME, read_records, replays
from windtunnel.tracking.state import load_state, save_state, target_state
from windtunnel.tracking.store import ensure_store, http_env, quiet_mlflow, resolve_uri

log = logging.getLogger(__name__)

LOCK = "deliver.lock"
MAX_METRICS = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAMS_TAGS = 100  # MAX_PARAMS_TAGS_PER_BATCH (params and tags each)
MAX_ENTITIES = 1000  # MAX_ENTITIES_PER_BATCH (all three together)
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
CHUNK = 64  # records delivered between two state writes
TERMINAL = ("FINISHED", "FAILED", "KILLED")
# MLflow error codes that retrying cannot fix: the record is skipped with a warning
PERMANENT = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "MALFORMED_REQUEST"}

_KEY_BAD = re.compile(r"[^\w\-. /:]")


def _key(k: Any) -> str:
    """A valid MLflow param/metric/tag name (alphanumerics, _ - . space / :), at most 250 chars."""
    return _KEY_BAD.sub("_", str(k))[:MAX_KEY] or "_"


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections as MLflow names them: {"optim": {"lr": 0.01}} -> {"optim.lr": 0.01}."""
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


class Busy(Exception):
    """Another process (a `windtunnel sync`, or the sweep's deliverer) is delivering this outbox."""


class Delivery:
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
            quiet_mlflow()
            from mlflow.tracking import MlflowClient

            uri = self.resolved_uri
            ensure_store(uri)
            self._client = MlflowClient(tracking_uri=uri)
            quiet_mlflow()  # the SQL store configures its loggers on first use
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
                        raise Busy(f"{self.dir}: another process is delivering these records") from None
                    time.sleep(0.2)
            try:
                with http_env():
                    return self._drop_locked() if drop else self._run_locked(should_stop, progress)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def pending(self) -> int:
        """Records for this delivery that the state file does not count as handled yet."""
        t = target_state(load_state(self.dir), self.uri)
        return sum(self._selected(r) for _, r in read_records(self.dir / NAME, int(t["offsets"].get(self.mode, 0))))

    def _drop_locked(self) -> tuple[int, int]:
        state = load_state(self.dir)
        t = target_state(state, self.uri)
        records = read_records(self.dir / NAME, int(t["offsets"].get(self.mode, 0)))
        if records:
            t["offsets"][self.mode] = records[-1][0]
            t["pending"] = []
            save_state(self.dir, state)
        return 0, sum(self._selected(r) for _, r in records)

    def _run_locked(self, should_stop, progress) -> tuple[int, int]:
        state = load_state(self.dir)
        t = target_state(state, self.uri)
        offset = int(t["offsets"].get(self.mode, 0))
        if not self.own_only:
            self._replays = replays(self.dir)
        # First delivery to this URI from this outbox, or a lost state file: runs may exist already.
        self._verify_all = offset == 0
        records = read_records(self.dir / NAME, offset)
        sent = 0
        i = 0
        try:
            while i < len(records) and not should_stop():
                chunk = records[i:i + CHUNK]
                creating = [r["key"] for _, r in chunk if self._selected(r) and r["op"] in ("invocation", "trial")
                            and r.get("key") not in t["runs"]]
                if creating:
                    t["pending"] = sorted(set(t["pending"]) | set(creating))
                    save_state(self.dir, state)
                for end, rec in chunk:
                    if should_stop():
                        break
                    if rec is None:
                        log.warning("%s: skipped an unreadable record ending at byte %d", self.dir / NAME, end)
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
                save_state(self.dir, state)
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
        self._log_batch(run_id, [], flat(rec.get("params") or {}), {})
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
            for k, v in flat(final).items():
                v = _number(v)
                if v is not None:
                    metrics.append(Metric(_key(k), v, ts, last))
            self._log_batch(run_id, metrics, flat(rec.get("params") or {}), rec.get("tags") or {})
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
        """A large run's points (windtunnel/tracking/large_run.py): {"step", "time", "values"} each."""
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

