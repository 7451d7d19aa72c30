"""What the deliverers keep beside the outbox: `state.json`, per target URI the byte offset
delivered and the map record key -> MLflow run id (replaced atomically, so a crash leaves the old
one or the new one), and `deliverer.json`, the background deliverer's last error."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from windtunnel.files import write_json
from windtunnel.tracking.outbox import now_ms, records
from windtunnel.tracking.store import resolve_uri

log = logging.getLogger(__name__)

STATE = "state.json"
STATUS = "deliverer.json"  # the deliverer's last error, for Tracker.last_error


def load_state(tracking_dir: Path, quiet: bool = False) -> dict:
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


def save_state(tracking_dir: Path, state: dict) -> None:
    # the owner's only: it names the servers
    write_json(tracking_dir / STATE, state, indent=None, separators=(",", ":"), fsync=True, mode=0o600)


def target_state(state: dict, uri: str) -> dict:
    t = state["targets"].setdefault(uri, {})
    for k, default in (("offsets", {}), ("experiments", {}), ("runs", {}), ("pending", [])):
        t.setdefault(k, default)
    return t


def records_at(tracking_dir: Path, uri: str) -> list[dict]:
    """The outbox's records that the server at uri holds or is to get: those addressed to it
    (delivered, waiting, or dropped by `sync --drop`, which counts them as handled) and those
    `sync --uri` copied there (or was copying when cut off). Servers compare resolved, so '' and
    the local store's path are one. Built from the append-only outbox and the atomically replaced
    state, so a crash anywhere leaves a consistent answer, erring towards 'held' (no duplicate)."""
    state = load_state(tracking_dir, quiet=True)
    recs = records(tracking_dir)
    server = resolve_uri(tracking_dir, uri)
    same = {u for u in {*state["targets"], *(r.get("uri", "") for r in recs)}
            if resolve_uri(tracking_dir, u) == server}
    targets = state["targets"]
    copied = {k for u in same & targets.keys() for k in [*targets[u].get("runs", {}), *targets[u].get("pending", [])]}
    return [r for r in recs if r.get("uri", "") in same or r.get("key") in copied]


def write_status(tracking_dir: Path, error: str | None) -> None:
    write_json(tracking_dir / STATUS, {"pid": os.getpid(), "error": error, "time": now_ms()}, indent=None)


def read_status(tracking_dir: Path) -> dict:
    """The deliverer's last status ({} when it wrote none)."""
    try:
        status = json.loads((tracking_dir / STATUS).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}
