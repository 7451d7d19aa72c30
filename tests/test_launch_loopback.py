"""A one-node launch.sh listens on 127.0.0.1 only (windtunnel/local_launch.py): torchrun's stores
listened on every interface (`*:29500` and a second port) for the whole run, whatever
--rdzv_endpoint, --master_addr or --local_addr said."""
import ipaddress
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import unavailable
from test_cli_messages import BIN, ENV, export

pytestmark = pytest.mark.distributed


def _tree(root: int) -> set[int]:
    """root and its descendants, from /proc."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, grew = {root}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in out} - out
        out |= more
        grew = bool(more)
    return out


def _socket_inodes(pids: set[int]) -> set[str]:
    out = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    out.add(link[8:-1])
        except OSError:  # gone, or not ours to read
            pass
    return out


def _address(hex_addr: str) -> str:
    """/proc/net/tcp's `0100007F:7530` as `127.0.0.1:30000` (tcp6's 32 hex digits as [::]...)."""
    ip, port = hex_addr.split(":")
    raw = bytes.fromhex(ip)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host order
    addr = ipaddress.ip_address(words)
    return f"{addr}:{int(port, 16)}" if addr.version == 4 else f"[{addr}]:{int(port, 16)}"


def listening() -> dict[str, str]:
    """socket inode -> local address, for every TCP socket in LISTEN (state 0A), IPv4 and IPv6."""
    out = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A":
                out[cols[9]] = _address(cols[1])
    return out


def test_a_one_node_launch_listens_on_loopback_only(tmp_path):
    """The mutant: launch.sh running torchrun for one node (as it did) shows `[::]:PORT` listeners
    here, the rendezvous store and the ranks' store."""
    if shutil.which("torchrun", path=str(BIN)) is None:
        unavailable(f"torchrun not installed in {BIN}")
    out = export(tmp_path)  # tiny-cpu, 2 processes
    # launch.sh's defaults, but a free port: gloo's interface left to launch.sh
    env = {k: v for k, v in ENV.items() if k not in ("GLOO_SOCKET_IFNAME", "MASTER_ADDR")} | {"MASTER_PORT": "0"}
    proc = subprocess.Popen(["bash", str(out / "launch.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: set[str] = set()
    while proc.poll() is None:
        socks = _socket_inodes(_tree(proc.pid))
        seen |= {addr for inode, addr in listening().items() if inode in socks}
        time.sleep(0.1)
    output = proc.stdout.read()
    assert proc.returncode == 0, output[-3000:]
    assert (out / "runs" / "msg" / "loss.jsonl").exists()
    # the ranks' store and each rank's gloo listener, at least
    assert len(seen) >= 2, f"too few listening sockets seen ({seen}): the run ended before the check looked"
    assert all(a.startswith("127.0.0.1:") for a in seen), (seen, output[-2000:])


def test_a_failed_rank_stops_the_others_and_a_taken_port_is_one_line():
    """As under torchrun: the first failed rank's status is the launch's and the others are stopped
    (rank 0 here would sleep a minute); MASTER_PORT in use is one line, exit 2."""
    import socket
    import sys

    code = "import os, sys, time; r = int(os.environ['RANK']); time.sleep(60) if r == 0 else sys.exit(3)"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "windtunnel.local_launch", "2", "0", "t", "--", "-c", code],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and time.monotonic() - t0 < 30, (r.returncode, r.stderr[-2000:])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "windtunnel.local_launch", "1", str(port), "t", "--", "-c", "pass"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"launch.sh: MASTER_PORT: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "allowed: a free port, or 0 for any"], r.stderr
