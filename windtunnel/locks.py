"""Exclusive locks that name their holder and die with it.

flock on a file: the kernel drops it when the holder exits, SIGKILL included, so a crash leaves
no stale lock to clean up by hand. The holder writes who it is into the file, for the message of
whoever is refused.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO


class Held(Exception):
    """The lock is taken; str(self) names the holder ("pid N on HOST, since TIME")."""


def hold(path: Path) -> IO:
    """Take the lock at path now or raise Held; it is held until the returned file is closed. On a
    filesystem without flock (NFS without lockd, some FUSE mounts) it warns and holds nothing."""
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise Held(holder) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        print(f"windtunnel: {path.parent} cannot be locked ({e.strerror}): nothing stops a second "
              "process from using it at the same time", file=sys.stderr)
        return f
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def hold_new(path: Path) -> IO:
    """hold() for a lock file that does not exist yet, made visible already held: a cleaner that
    takes every lock nobody holds (data._clear_dead_temps) never finds it between its creation and
    its flock (a loaded test run saw a writer lose its new lock to another writer's cleaner)."""
    staging = path.with_name(path.name + ".new")
    f = hold(staging)
    os.replace(staging, path)
    return f


def probe(path: Path) -> None:
    """Raise Held if a process holds the lock at path; takes nothing and writes nothing (a check
    before a launch: the launch itself takes the lock)."""
    try:
        f = open(path)
    except FileNotFoundError:
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Held(f.read().strip() or "another process") from None
        except OSError:  # no flock here: hold() warns when the launch takes it
            return
        fcntl.flock(f, fcntl.LOCK_UN)
