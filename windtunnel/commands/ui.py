"""`windtunnel ui [RESULTS_DIR] [--sweep NAME] [--port 5000]`: the MLflow UI of a sweep's local store.

Starts `mlflow server` on 127.0.0.1 with the backend store <results_dir>/<sweep>/tracking/mlflow.db
(the default `tracking.uri: ""`), prints the experiment's URL once it answers, and runs until
Ctrl-C (or SIGTERM), which stops the server.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results_dir", nargs="?", default="results", metavar="RESULTS_DIR",
                        help="a results folder (default: results) or one sweep's folder in it")
    parser.add_argument("--sweep", default=None, help="the sweep to open when RESULTS_DIR holds several")
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")


def find_store(results_dir: Path, sweep: str | None) -> Path:
    """The tracking dir (holding mlflow.db) of the chosen sweep; ConfigError names the choices."""
    from windtunnel.errors import ConfigError

    if not results_dir.is_dir():
        raise ConfigError(f"{results_dir}: no such folder (allowed: a results folder or a sweep's folder in it)")
    if sweep is None and (results_dir / "tracking" / "mlflow.db").is_file():
        return results_dir / "tracking"
    found = {p.parent.parent.name: p.parent for p in sorted(results_dir.glob("*/tracking/mlflow.db"))}
    if not found:
        # committed results carry their study, not an MLflow store: say how to make one from it
        studies = sorted(p.parent for p in results_dir.glob("*/study.journal")) or \
            ([results_dir] if (results_dir / "study.journal").is_file() else [])
        hint = (f"; make one from a sweep's study: windtunnel report {studies[0]} --mlflow"
                if studies else "")
        raise ConfigError(f"{results_dir}: holds no sweep with a local MLflow store (<sweep>/tracking/mlflow.db); "
                          "allowed: a results folder of sweeps run with tracking.uri='' "
                          f"(a sweep that logged to a server is seen in that server's UI){hint}")
    if sweep is not None:
        if sweep not in found:
            raise ConfigError(f"--sweep: no sweep {sweep!r} with a local MLflow store in {results_dir} "
                              f"(allowed: {', '.join(found)})")
        return found[sweep]
    if len(found) > 1:
        raise ConfigError(f"{results_dir}: holds several sweeps; choose one with --sweep "
                          f"(allowed: {', '.join(found)})")
    return next(iter(found.values()))


def experiment_ids(db: Path) -> dict[str, str]:
    """name -> id of the store's active experiments (read with sqlite3: no MLflow import needed)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            rows = con.execute("SELECT name, experiment_id FROM experiments WHERE lifecycle_stage = 'active'").fetchall()
    except sqlite3.Error:
        return {}
    return {name: str(i) for name, i in rows if name != "Default"}


def server_command(tracking_dir: Path, port: int) -> list[str]:
    mlflow = Path(sys.executable).with_name("mlflow")
    return [str(mlflow) if mlflow.exists() else "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{(tracking_dir / 'mlflow.db').resolve()}",
            "--default-artifact-root", (tracking_dir / "artifacts").resolve().as_uri(),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table, best trial first. MLflow 3's plain /#/experiments/ID opens a
    GenAI overview, and its runs table nests child runs under a collapsed parent unless sorted
    by something other than start time: sorting by final_val_loss lists every trial."""
    return f"{base}/#/experiments/{experiment_id}/runs?orderByKey=metrics.%60final_val_loss%60&orderByAsc=true"


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _check_port(port: int) -> None:
    """Bind the port as the server would (SO_REUSEADDR, as uvicorn does): a port in use would
    otherwise show as the server's log and a bare exit."""
    import socket

    from windtunnel.errors import ConfigError

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as free:
                free.bind(("127.0.0.1", 0))  # one the OS has free now, to suggest
                raise ConfigError(f"--port: cannot listen on 127.0.0.1:{port} ({e.strerror or e}); "
                                  f"allowed: a free port, e.g. --port {free.getsockname()[1]}") from None


def run(args: argparse.Namespace) -> int:
    from windtunnel.errors import ConfigError

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port: must be in 1..65535 (got {args.port})")
    tracking_dir = find_store(Path(args.results_dir), args.sweep)
    sweep = tracking_dir.parent.name
    exps = experiment_ids(tracking_dir / "mlflow.db")
    url = f"http://127.0.0.1:{args.port}"
    if _up(url):
        raise ConfigError(f"--port: {args.port} is taken by a running server (allowed: a free port)")
    _check_port(args.port)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # no job runner: the UI is all we need
    # Own session, so stopping reaches the server's workers too. Its logs go to stderr: stdout
    # carries only the URL lines below, so `windtunnel ui | head -1` is the URL.
    proc = subprocess.Popen(server_command(tracking_dir, args.port), env=env, start_new_session=True,
                            stdout=sys.stderr)

    def stop(*_):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: (stop(), sys.exit(0)))
    try:
        while proc.poll() is None and not _up(url):
            time.sleep(0.3)
        if proc.poll() is not None:
            print(f"windtunnel ui: error: mlflow server exited with status {proc.returncode} "
                  f"(is port {args.port} free?)", file=sys.stderr)
            return 1
        exp_id = exps.get(sweep) or (next(iter(exps.values())) if len(exps) == 1 else None)
        page = experiment_url(url, exp_id) if exp_id else url
        print(f"MLflow UI of {sweep}: {page}", flush=True)
        print(f"  (store {shlex.quote(str(tracking_dir / 'mlflow.db'))}; Ctrl-C stops it)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
