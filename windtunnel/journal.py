"""The study journal (`study.journal`, Optuna's append-only log of JSON records), kept readable
whatever happens to a write: a torn or garbled tail is moved aside before the next append, an
undecodable line is skipped and reported on replay, and a write that hits a full disk is undone
and stops the sweep with one line naming the disk.

Optuna's own backend fails for good on a torn line once a record has been appended after it
(the append glues itself onto the fragment), and it fsyncs every record, ~15% of the driver's
cost per trial (windtunnel/bench/driver.py); this one does not fsync: a killed process loses
nothing (its writes are in the OS's cache), a machine crash at most the last records, which the
repair then moves aside.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file

from windtunnel.files import disk_full, write_atomically

_OP = b'{"op_code":'


def decode(line: bytes) -> dict | None:
    """The record a line holds, or None. A line an older windtunnel glued onto a torn fragment
    ('{"op_code":7,"worker_id":"e2a{"op_code":0,...}') gives its whole second record."""
    for start in (0, line.rfind(_OP)):
        if start < 0:
            break
        try:
            rec = json.loads(line[start:])
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both
            continue
        if isinstance(rec, dict) and isinstance(rec.get("op_code"), int) and isinstance(rec.get("worker_id"), str):
            return rec
    return None


def _say(line: str) -> None:
    sys.stderr.write(f"windtunnel: {line}\n")
    sys.stderr.flush()


class JournalFile(JournalFileBackend):
    """Optuna's journal file, read and written as the module docstring says. Log numbers count
    decodable records only, so every process numbers them alike whatever garbage lies between."""

    def __init__(self, file_path: str):
        if not os.path.exists(file_path):  # the owner's only: the sweep's config in it names the tracking server
            os.close(os.open(file_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        super().__init__(file_path)
        self._ino: int | None = None  # the file read so far: a repair replaces it (a new inode)
        self._pos = 0  # bytes of it consumed (whole lines only)
        self._n = 0  # records in those bytes
        self._good_end = 0  # the end of the last decodable record in them
        self._reported: set[tuple[int, int]] = set()

    def read_logs(self, log_number_from: int):
        try:
            st = os.stat(self._file_path)
        except FileNotFoundError:
            return
        if (st.st_ino, log_number_from) != (self._ino, self._n) or st.st_size < self._pos:
            self._ino, self._pos, self._n, self._good_end = st.st_ino, 0, 0, 0
        with open(self._file_path, "rb") as f:
            f.seek(self._pos)
            data = f.read(max(0, st.st_size - self._pos))
        start = 0
        while True:  # whole lines only: a line without its newline may still be being written
            end = data.find(b"\n", start) + 1
            if end == 0:
                return
            line, at = data[start:end], self._pos
            self._pos += end - start
            start = end
            rec = decode(line)
            if rec is None:
                self._report(at, line)
                continue
            self._good_end = self._pos
            self._n += 1
            if self._n > log_number_from:
                yield rec

    def _report(self, at: int, line: bytes) -> None:
        if line.strip() and (self._ino, at) not in self._reported:
            self._reported.add((self._ino, at))
            _say(f"{self._file_path}: the {len(line)} bytes at offset {at} are not a journal record "
                 f"({line[:40]!r}...); skipped")

    def append_logs(self, logs: list[dict]) -> None:
        text = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
        with get_lock_file(self._lock):
            self._repair()
            fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    done = 0
                    while done < len(text):
                        done += os.write(fd, text[done:])
                except OSError as e:  # undo the part written: every earlier record stays readable
                    os.ftruncate(fd, start)
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise disk_full(self._file_path) from None
                    raise
            finally:
                os.close(fd)

    def _repair(self) -> None:
        """Move a tail that is not whole records (a write cut short by a full disk, a kill or a
        crash; bytes appended by something else) aside to a dated file beside the journal, and
        say so. Runs under the journal's lock, so no writer is mid-record."""
        path = Path(self._file_path)
        st = os.stat(path)
        known = st.st_ino == self._ino and self._good_end <= self._pos <= st.st_size
        if known and self._pos == st.st_size == self._good_end:
            return  # the whole file was read and ends in a record: the common case, no read
        begin = self._good_end if known else 0
        with open(path, "rb") as f:
            f.seek(begin)
            data = f.read(st.st_size - begin)
        good = pos = 0  # the end of the last whole record in data
        while (end := data.find(b"\n", pos) + 1) > 0:
            if decode(data[pos:end]) is not None:
                good = end
            pos = end
        bad = data[good:]
        if not bad:
            return
        moved = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        try:
            write_atomically(moved, lambda tmp: tmp.write_bytes(bad))
            if b"\n" not in bad:  # a torn last line: no reader consumed it, so cut it off in place
                os.truncate(path, begin + good)
            else:  # whole lines went too: a new file (a new inode) tells readers past them to start again
                _copy_head(path, begin + good, st.st_mode & 0o777)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(path) from None
            raise
        _say(f"{path}: its last {len(bad)} bytes were not whole records (a write cut short: a full disk, "
             f"a killed process) and were moved to {moved}; the journal is repaired")


def _copy_head(path: Path, size: int, mode: int) -> None:
    """path's first size bytes, renamed over path."""
    def copy(tmp: Path) -> None:
        left = size
        with open(path, "rb") as src, tmp.open("wb") as dst:
            while left > 0 and (chunk := src.read(min(left, 1 << 24))):
                dst.write(chunk)
                left -= len(chunk)
    write_atomically(path, copy, mode=mode, fsync=True)
