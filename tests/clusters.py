"""The tests' own clusters on this machine: a single-node Slurm and a local Ray cluster.

Test infrastructure, not part of the product: Slurm's bring-up installs packages and writes
/etc/slurm/slurm.conf, which on a real cluster's login node would overwrite the site's. So it
lives with the tests, and refuses to touch a slurm.conf that it did not write (naming the file).

Slurm lives in tests/slurm/ (`slurm.sh`: apt-get install, a config from `slurm.conf.template`,
munged + slurmctld + slurmd started without systemd); this module runs it. Ray is `ray start
--head` bound to 127.0.0.1; `ray_down` stops only the cluster it started (found by its GCS port),
never every Ray process on the machine as `ray stop` does, so other users' `ray.init()` survive.

Used by tests/conftest.py and .ci/setup.sh; by hand (root for Slurm):

    python tests/clusters.py slurm-up [--cpus N] | slurm-down | slurm-status
    python tests/clusters.py ray-up [--port P] [--num-cpus N] [--num-gpus N] [--temp-dir D] | ray-down [--port P] [--all]

Imports nothing heavy (no ray): Ray is driven through its `ray` command.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from windtunnel.files import write_text

HERE = Path(__file__).resolve().parent / "slurm"
SLURM_SH = HERE / "slurm.sh"
SLURM_CONF = Path(os.environ.get("WINDTUNNEL_SLURM_CONF", "/etc/slurm/slurm.conf"))  # slurm.sh reads the same
# The line of slurm.conf.template that marks a config as ours: any other config is the site's.
SLURM_CONF_MARK = "ClusterName=windtunnel"
SLURM_LOGS = Path("/var/log/slurm")
SLURMCTLD_PID = Path("/run/slurm/slurmctld.pid")
# A file named by a job's SLURM_JOB_ID here holds it COMPLETING in the Epilog (slurm-epilog.sh).
SLURM_EPILOG_HOLD = Path("/run/slurm/epilog-hold")
SLURM_PARTITION = "debug"
# Sessions (pytest processes) that use the machine's one Slurm: one file per pid. The last one
# out stops Slurm if a fixture started it (marker file), so parallel test sessions share it.
SLURM_USERS_DIR = Path("/run/windtunnel/slurm-users")
RAY_ADDRESS_FILE = Path("/tmp/windtunnel-ray-address")
RAY_DEFAULT_PORT = 6379


class ClusterError(RuntimeError):
    """A cluster did not come up or go down; the message is one line and names a log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, below the kernel's ephemeral
    range (and above Ray's worker ports, 10002-19999): a port from that range can be taken before
    the server binds it, by any outgoing connection or by srun's own listening sockets (in CI,
    torchrun could not host its store on such a port and waited 60 s as a client of the taker)."""
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    first_ephemeral = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    for port in random.Random().sample(range(20000, max(first_ephemeral, 20100)), 100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ClusterError(f"no free TCP port in 20000-{first_ephemeral - 1} on 127.0.0.1")


# --------------------------------------------------------------------------------------- Slurm


@dataclass(frozen=True)
class SlurmInfo:
    """What a test or user needs to submit to the local Slurm."""

    partition: str
    node: str
    cpus: int
    conf: Path
    logs: Path


def _slurm_sh(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM_SH), *args], text=True, capture_output=True, timeout=timeout)


def slurm_up(cpus: int | None = None, quiet: bool = False) -> SlurmInfo:
    """Install (apt-get, first time) and start the single-node Slurm; wait until its node is idle."""
    r = _slurm_sh("up", *([str(cpus)] if cpus else []))
    if not quiet and r.stdout:
        print(r.stdout, end="")
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or [f"slurm.sh up exited {r.returncode}"])[-1]
        raise ClusterError(msg)
    return slurm_info()


def slurm_down(quiet: bool = False) -> None:
    """Stop slurmd, slurmctld and munged."""
    r = _slurm_sh("down", timeout=120)
    if not quiet and r.stdout:
        print(r.stdout, end="")
    if r.returncode != 0:
        raise ClusterError((r.stderr.strip().splitlines() or ["slurm.sh down failed"])[-1])


def slurm_is_up() -> bool:
    """True when slurmctld answers and the node can take jobs."""
    if not shutil.which("sinfo") or not _pidfile_running(SLURMCTLD_PID):
        return False  # sinfo would retry a dead controller for ~10 s
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], text=True, capture_output=True, timeout=10)
    except (subprocess.TimeoutExpired, OSError):
        return False
    state = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
    return state.rstrip("*~#") in ("idle", "mixed", "allocated", "completing")


def _pidfile_running(pidfile: Path) -> bool:
    try:
        return _running(int(pidfile.read_text().strip()))
    except (OSError, ValueError):
        return False


def slurm_info() -> SlurmInfo:
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c"], text=True, capture_output=True, timeout=10)
    node, cpus = (r.stdout.split() + ["?", "0"])[:2]
    return SlurmInfo(SLURM_PARTITION, node, int(cpus), SLURM_CONF, SLURM_LOGS)


def slurm_cannot_start_reason() -> str | None:
    """Why this machine cannot bring Slurm up (None when it can, or when it is already up)."""
    foreign = foreign_slurm_conf()
    if foreign:
        return foreign
    if slurm_is_up():
        return None
    if sys.platform != "linux":
        return f"single-node Slurm needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "starting Slurm needs root (it installs packages and writes /etc/slurm); run `sudo python tests/clusters.py slurm-up` first"
    have_pkgs = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sinfo", "munged"))
    if not have_pkgs and not shutil.which("apt-get"):
        return "Slurm is not installed and apt-get is not available to install it"
    return None


def foreign_slurm_conf() -> str | None:
    """The one-line refusal when SLURM_CONF exists and this module's slurm.sh did not write it
    (a site's Slurm: its config and daemons are not ours to rewrite or stop); None otherwise."""
    try:
        lines = SLURM_CONF.read_text().splitlines()
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{SLURM_CONF}: cannot read it ({e.strerror or e}); the test Slurm leaves it alone"
    if SLURM_CONF_MARK in (line.strip() for line in lines):
        return None
    return (f"{SLURM_CONF} exists and was not written by tests/slurm/slurm.sh (no {SLURM_CONF_MARK}); "
            "the test Slurm leaves this machine's Slurm alone")


def slurm_acquire() -> SlurmInfo:
    """Register this process as a Slurm user and bring Slurm up if it is not (shared by sessions)."""
    SLURM_USERS_DIR.mkdir(parents=True, exist_ok=True)
    if not slurm_is_up():
        info = slurm_up(quiet=True)
        write_text(SLURM_USERS_DIR / "started-by-fixture", str(os.getpid()))
    elif os.geteuid() == 0:
        # up again with the CPUs it has: a config from an older template is rewritten and the
        # daemons restart (only then), so the tests get this checkout's config (e.g. its Epilog)
        info = slurm_up(cpus=slurm_info().cpus, quiet=True)
    else:
        info = slurm_info()
    write_text(SLURM_USERS_DIR / str(os.getpid()), "")
    return info


def slurm_release(keep: bool = False) -> bool:
    """Unregister; stop Slurm when no other live user is left and a fixture started it.

    Returns True when Slurm was stopped.
    """
    (SLURM_USERS_DIR / str(os.getpid())).unlink(missing_ok=True)
    others = [p for p in SLURM_USERS_DIR.glob("[0-9]*") if _running(int(p.name))]
    for p in SLURM_USERS_DIR.glob("[0-9]*"):
        if p not in others:
            p.unlink(missing_ok=True)  # a crashed session's entry
    marker = SLURM_USERS_DIR / "started-by-fixture"
    if keep or others or not marker.exists():
        return False
    marker.unlink(missing_ok=True)
    slurm_down(quiet=True)
    return True


# ----------------------------------------------------------------------------------------- Ray


def _ray_bin() -> str:
    # The `ray` next to this interpreter (the venv's), else the one on PATH.
    cand = Path(sys.executable).with_name("ray")
    return str(cand) if cand.exists() else (shutil.which("ray") or "ray")


def ray_is_up(address: str, timeout: float = 15) -> bool:
    """True when a GCS answers at HOST:PORT (`ray status` asks it for the cluster's resources)."""
    host, _, port = address.rpartition(":")
    if host in ("127.0.0.1", "localhost") and not _port_in_use(int(port)):
        return False  # `ray status` would retry a dead GCS until its timeout
    from windtunnel.executors.ray import _token_auth_like_ray_start

    _token_auth_like_ray_start()  # else, with a token in ~/.ray, `ray status` is refused by the cluster `ray start` made
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        r = subprocess.run([_ray_bin(), "status", "--address", address], capture_output=True,
                           text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def ray_up(port: int = RAY_DEFAULT_PORT, num_cpus: int | None = None, num_gpus: int | None = None,
           temp_dir: str | None = None, address_file: Path | None = RAY_ADDRESS_FILE,
           quiet: bool = False) -> str:
    """Start a Ray head on 127.0.0.1:PORT (or reuse the one already there); return its address.

    Ray itself swaps 127.0.0.1 for the machine's IP in what it registers (the GCS listens on all
    interfaces); the dashboard (minimal: `--include-dashboard=false`) binds to 127.0.0.1.

    temp_dir: Ray's root temp dir. Left None, Ray uses /tmp/ray and `ray.init(address="auto")`
    finds this cluster; tests pass their own so a plain `ray.init()` elsewhere never joins it.
    The address is written to `address_file` (temp file + rename) unless that is None.
    """
    address = f"127.0.0.1:{port}"
    if _port_in_use(port):
        if not ray_is_up(address):
            raise ClusterError(f"port {port} is in use by something that is not a Ray cluster; pick another with --port")
        if not quiet:
            print(f"ray-up: a Ray cluster is already running at {address}", file=sys.stderr)
    else:
        cmd = [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
               "--include-dashboard=false", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
               # Ports that default to fixed numbers get free ones, so two clusters can coexist.
               f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-port={free_port()}"]
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus}")
        if num_gpus is not None:
            cmd.append(f"--num-gpus={num_gpus}")
        if temp_dir:
            cmd.append(f"--temp-dir={temp_dir}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
        if r.returncode != 0:
            log = Path(temp_dir or "/tmp/ray") / "session_latest" / "logs"
            last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise ClusterError(f"`ray start --head` exited {r.returncode}: {last[0]} (logs: {log})")
        if not quiet:
            print(f"ray-up: started a Ray head at {address}", file=sys.stderr)
    if address_file is not None:
        write_text(Path(address_file), address + "\n")
    return address


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can read in /proc (Linux)."""
    out: dict[int, tuple[int, str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def _cluster_pids(port: int) -> list[int]:
    """The processes of the Ray cluster whose GCS listens on PORT, with their descendants."""
    # Ray replaces 127.0.0.1 by the machine's IP in its processes' arguments, so match the port:
    # gcs_server has --gcs_server_port=P; raylet, monitor, log monitor, dashboard and the client
    # server have --gcs-address=IP:P or --address=IP:P; workers and agents are raylet's children.
    pattern = re.compile(rf"(--gcs_server_port={port}|(--gcs-address|--address|ray\.address)=\S*:{port})(\s|$)")
    procs = _processes()
    found = {pid for pid, (_, cmd) in procs.items() if pattern.search(cmd)}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    found.discard(os.getpid())
    return sorted(found)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a stopped daemon whose parent, e.g. a container's init, never reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def ray_down(port: int = RAY_DEFAULT_PORT, address_file: Path | None = RAY_ADDRESS_FILE,
             quiet: bool = False, grace_s: float = 3) -> int:
    """Stop the Ray cluster on PORT; only its processes (see `_cluster_pids`), unlike `ray stop`,
    which stops every Ray process of the machine.

    In order, as `ray stop` does: the raylet with its workers and agents, then the other daemons,
    then the GCS; each stage gets SIGTERM and, after grace_s, SIGKILL. (SIGTERM to all at once
    leaves raylet and GCS waiting on each other.) Returns how many processes it signalled.
    """
    pids = _cluster_pids(port)
    procs = _processes()
    cmd = {p: procs.get(p, (0, ""))[1] for p in pids}
    raylet = [p for p in pids if "/raylet/raylet " in cmd[p] or cmd[p].endswith("/raylet/raylet")]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    first = set(raylet)
    todo = list(raylet)
    while todo:
        for c in children.get(todo.pop(), []):
            if c in cmd and c not in first:
                first.add(c)
                todo.append(c)
    gcs = {p for p in pids if "gcs_server" in cmd[p].split(" ", 1)[0]}
    for stage in (sorted(first), [p for p in pids if p not in first and p not in gcs], sorted(gcs)):
        _signal_all(stage, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_running(p) for p in stage):
            time.sleep(0.1)
        _signal_all([p for p in stage if _running(p)], signal.SIGKILL)
    if address_file is not None and Path(address_file).exists():
        if Path(address_file).read_text().strip() == f"127.0.0.1:{port}":
            Path(address_file).unlink(missing_ok=True)
    if not quiet:
        print(f"ray-down: stopped the Ray cluster at 127.0.0.1:{port} ({len(pids)} processes)"
              if pids else f"ray-down: no Ray cluster at 127.0.0.1:{port}")
    return len(pids)


# ----------------------------------------------------------------------------------------- CLI

ACTIONS = ("slurm-up", "slurm-down", "slurm-status", "ray-up", "ray-down")


def main(argv=None) -> int:
    """`python tests/clusters.py ACTION`: bring the tests' clusters up or down by hand (and in CI)."""
    import argparse

    p = argparse.ArgumentParser(prog="tests/clusters.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
        "slurm-up     install slurmctld/slurmd/munge (apt-get, as root) and start a single-node Slurm\n"
        "             (partition `debug`); idempotent. Config: /etc/slurm/slurm.conf from\n"
        "             tests/slurm/slurm.conf.template (refused when a slurm.conf it did not write is there).\n"
        "slurm-down   stop slurmd, slurmctld and munged\n"
        "slurm-status print the daemons and `sinfo`; exit 0 when the node takes jobs\n"
        "ray-up       `ray start --head` on 127.0.0.1:PORT; prints the address for executor.address\n"
        "             and writes it to /tmp/windtunnel-ray-address; idempotent\n"
        "ray-down     stop the Ray cluster on PORT (only that one; --all runs `ray stop`)"))
    p.add_argument("action", choices=ACTIONS, metavar="ACTION", help=" | ".join(ACTIONS))
    p.add_argument("--cpus", type=int, default=None, help="slurm-up: CPUs the node advertises (default: the machine's)")
    p.add_argument("--port", type=int, default=None,
                   help="ray-up/ray-down: the head's GCS port (default 6379; ray-down: the one in the address file)")
    p.add_argument("--num-cpus", type=int, default=None, help="ray-up: CPUs of the head node (default: all)")
    p.add_argument("--num-gpus", type=int, default=None, help="ray-up: GPUs of the head node (default: detected)")
    p.add_argument("--temp-dir", default=None, help="ray-up: Ray's temp dir (default /tmp/ray, where address=auto looks)")
    p.add_argument("--address-file", default=None,
                   help="ray-up/ray-down: where the address is written (default /tmp/windtunnel-ray-address)")
    p.add_argument("--all", action="store_true", help="ray-down: run `ray stop`, stopping every Ray process of this machine")
    args = p.parse_args(argv)

    def error(msg: str, code: int) -> int:
        sys.stderr.write(f"tests/clusters.py {args.action}: error: {msg}\n")
        return code

    for name in ("cpus", "port", "num_cpus", "num_gpus"):
        v = getattr(args, name)
        if v is not None and (v < 0 or (name in ("cpus", "port") and v == 0)):
            return error(f"--{name.replace('_', '-')}: must be a positive integer (got {v})", 2)
    address_file = Path(args.address_file) if args.address_file else RAY_ADDRESS_FILE
    try:
        if args.action == "slurm-up":
            info = slurm_up(cpus=args.cpus)
            print(f"slurm: partition {info.partition}, node {info.node}, {info.cpus} CPUs; "
                  f"use executor=slurm executor.partition={info.partition}")
        elif args.action == "slurm-down":
            slurm_down()
        elif args.action == "slurm-status":
            return subprocess.run(["bash", str(SLURM_SH), "status"]).returncode
        elif args.action == "ray-up":
            address = ray_up(port=args.port or RAY_DEFAULT_PORT, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                             temp_dir=args.temp_dir, address_file=address_file)
            print(address)
            print(f"ray-up: use executor=ray executor.address={address} (written to {address_file})", file=sys.stderr)
        elif args.action == "ray-down":
            if args.all:
                rc = subprocess.run([_ray_bin(), "stop"]).returncode
                address_file.unlink(missing_ok=True)
                return rc
            port = args.port
            if port is None and address_file.exists():
                port = int(address_file.read_text().strip().rsplit(":", 1)[1])
            ray_down(port=port or RAY_DEFAULT_PORT, address_file=address_file)
    except ClusterError as e:
        return error(str(e), 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
