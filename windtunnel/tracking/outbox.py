"""The outbox, <folder>/tracking/outbox.jsonl: one JSON record a line, appended by the Tracker and
read in order by the deliverer and `sync`. Append-only, so a crash anywhere leaves it readable."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

NAME = "outbox.jsonl"


def now_ms() -> int:
    return int(time.time() * 1000)


class Outbox:
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


def read_records(path: Path, offset: int = 0) -> list[tuple[int, dict | None]]:
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


def records(tracking_dir: Path) -> list[dict]:
    """Every readable record of the outbox in tracking_dir."""
    return [r for _, r in read_records(Path(tracking_dir) / NAME) if r is not None]


def outbox_dirs(path: Path) -> list[Path]:
    """The tracking dirs under a sweep folder (RESULTS_DIR/SWEEP) or a results folder (RESULTS_DIR)."""
    path = Path(path)
    if (path / "tracking" / NAME).is_file():
        return [path / "tracking"]
    return sorted(p.parent for p in path.glob(f"*/tracking/{NAME}"))


def outbox_uris(tracking_dir: Path) -> list[str]:
    """The URIs the outbox's records are addressed to, in order of first use ('' = the local store)."""
    return list(dict.fromkeys(r.get("uri", "") for r in records(tracking_dir)))


def replays(tracking_dir: Path) -> set[str]:
    """The invocations `windtunnel report --mlflow` appended (a replay of the study) that repeat
    runs the sweep tracked itself; a replay of a sweep run with tracking off is its only copy."""
    recs = records(tracking_dir)
    replayed = {r["key"] for r in recs if r.get("op") == "invocation" and "replayed_from" in (r.get("params") or {})}
    tracked = any(r.get("op") == "trial" and r.get("parent") not in replayed for r in recs)
    return replayed if tracked else set()
