"""Safe file writes: every file windtunnel writes whole goes to a temp beside it and is renamed
onto it, so a reader (or the next run after a SIGKILL) sees the old file or the new one, never part
of one. A temp's name says whose it is, so the next writer of a path removes the temps that killed
writers left. Also the folder checks that turn a file in the way into one line naming the field."""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import tempfile
import uuid
from pathlib import Path

from windtunnel.errors import ConfigError


def slug(text: str) -> str:
    """A name safe as a path component and a Slurm job name: [A-Za-z0-9._-], never '.' or '..'."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "run"
    return s[:100]


def write_atomically(path: str | Path, write, error: str | None = None, mode: int | None = None,
                     fsync: bool = False) -> None:
    """write(tmp), then tmp renamed onto path: a reader sees the old file or the new one, never part
    of one. The temp is named by temp_prefix, so the next write of path removes a killed writer's.
    error: a temp that cannot be created (no folder, no right) is the one-line ConfigError
    '<error> (<reason>)' naming the user's path; mode: the file's permissions (else the umask's);
    fsync: flushed to disk before the rename (a state file that must survive a power cut).
    A full disk is disk_full's one line."""
    path = Path(path)
    if error is not None:
        fd, tmp = temp_beside(path, error)
        os.close(fd)
        tmp = Path(tmp)
        os.chmod(tmp, 0o644 if mode is None else mode)  # mkstemp's 0600 would make the file private
    else:
        remove_stale_temps(path)
        tmp = path.with_name(f"{temp_prefix(path)}{uuid.uuid4().hex[:8]}.tmp")  # unique: threads of one process too
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path) from None
        raise


class DiskFull(OSError):
    """ENOSPC (or a quota) met writing a file: the command stops; nothing written before is lost."""


def disk_full(path: str | Path) -> OSError:
    """A full disk (ENOSPC) met writing path, as the OSError the CLI prints as one line: the
    file, the filesystem it is on and what is free there, and that running again resumes."""
    mount = Path(os.path.abspath(path))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        st = os.statvfs(mount)
        free = f"{st.f_bavail * st.f_frsize // 1024} KB free"
    except OSError:
        free = "free space unknown"
    return DiskFull(errno.ENOSPC, f"no space left on the filesystem at {mount} ({free}); every record written "
                   "before is intact: free some space and run the same command again to continue", str(path))


def write_text(path: str | Path, text: str, **kw) -> None:
    """text as path's whole content, atomically (write_atomically's keywords)."""
    write_atomically(path, lambda tmp: tmp.write_text(text), **kw)


def write_json(path: str | Path, obj, indent: int | None = 1, separators=None, **kw) -> None:
    """obj as path's JSON, atomically (write_atomically's keywords)."""
    write_text(path, json.dumps(obj, indent=indent, separators=separators), **kw)


def append_line(path: str | Path, line: str) -> None:
    """line + newline appended to a log in one write (O_APPEND), so lines of concurrent writers
    never interleave and a killed writer leaves at most its last line cut short."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def temp_beside(path: Path, error: str, suffix: str = "") -> tuple[int, str]:
    """tempfile.mkstemp in path's folder (created if missing), for a write renamed onto path; an
    OSError as the one-line ConfigError '<error> (<reason>)', naming the user's path, not the temp file's.
    The temp's name says whose it is (temp_prefix); those of killed writers of path go first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        return tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix, dir=path.parent)
    except OSError as e:
        raise ConfigError(f"{error} ({e.strerror or e})") from None


def _host() -> str:
    """This machine's short name and its PID namespace: containers that share a hostname (host
    networking) but not their pids must not judge each other's writers dead."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    name = socket.gethostname().split(".")[0].replace("/", "_") or "host"
    return f"{name}-{ns}"


def temp_prefix(path: Path) -> str:
    """'.NAME.HOST.PID.': the start of a temp file's name for a write renamed onto path, so that a
    later writer can tell the temps of a killed process (SIGKILL runs no cleanup) from a live one's."""
    return f".{path.name}.{_host()}.{os.getpid()}."


def remove_stale_temps(path: Path) -> None:
    """Remove the temp files (temp_prefix) that writers of path killed mid-write left beside it:
    those of this host whose process is gone. Another host's (a shared filesystem) are left alone."""
    start = f".{path.name}.{_host()}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for e in entries:
        pid = e.name[len(start):].split(".", 1)[0] if e.name.startswith(start) else ""
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            os.unlink(e.path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def file_in_the_way(folder: str | Path) -> Path | None:
    """The file that keeps folder from being created (folder itself, or its first existing
    parent, when that is not a folder); None if mkdir(parents=True) could make it."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return None if folder.is_dir() else folder


def check_folder(field: str, folder: str | Path) -> None:
    """ConfigError naming field when a file keeps folder from being created (writes nothing)."""
    folder = Path(folder)
    for p in (folder, *folder.parents):  # mkdir said only "File exists"
        if p.is_symlink() and not p.exists():
            raise ConfigError(f"{field}: {p} is a symlink to {os.readlink(p)}, which does not exist; "
                              "create its target or give another folder")
    blocker = file_in_the_way(folder)
    if blocker is not None:
        raise ConfigError(f"{field}: {folder} is a file; a folder is needed" if blocker == folder
                          else f"{field}: {folder}: {blocker} is a file, not a folder")


def make_folder(field: str, folder: str | Path) -> Path:
    """folder, created with its parents, for what `field` names; a file in the way, or a folder
    that cannot be created, is the one-line ConfigError naming field (before any long work)."""
    folder = Path(folder)
    check_folder(field, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{field}: cannot create the folder {folder} ({e.strerror or e})") from None
    return folder
