"""Where records go, and the MLflow client that takes them there: a sweep's local SQLite store
(its URI, and its creation whole or not at all), and the client's settings while it delivers."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from pathlib import Path

# The deliverer's own MLflow HTTP settings (used unless the user set them): fail fast, we retry.
# No retries of MLflow's own: a retried POST whose first answer was lost could create a second
# run, and a down server would stall the deliverer for minutes.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def local_uri(tracking_dir: Path) -> str:
    """The default store of a sweep: a SQLite file beside its outbox."""
    return f"sqlite:///{Path(tracking_dir).resolve()}/mlflow.db"


def resolve_uri(tracking_dir: Path, uri: str) -> str:
    """The server a record's uri names: '' is the sweep's local store (as `sync` prints it)."""
    return uri or local_uri(tracking_dir)


def quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


_env_lock = threading.Lock()
_env_users, _env_saved = 0, {}


@contextlib.contextmanager
def http_env():
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
