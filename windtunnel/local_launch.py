"""One node's launcher, listening on 127.0.0.1 only: what launch.sh runs in torchrun's place
when NNODES is 1 and MASTER_ADDR is this machine (several nodes keep torchrun and MASTER_ADDR).

torchrun's stores (its rendezvous and the one its ranks share) are c10d TCPStores, which listen
on every interface whatever address they are given (`ss -ltn` shows `*:29500`: anyone on the
network could join or poison the run); no torchrun flag changes that. Here the ranks' store is
served from a socket bound to 127.0.0.1 (TCPStore's master_listen_fd), the ranks join it as
torchrun's ranks join their agent's store (TORCHELASTIC_USE_AGENT_STORE), and gloo and NCCL are
told to use the loopback interface.

    python -m windtunnel.local_launch NPROC PORT RUN_ID -- ARGS...   (`python ARGS...` NPROC times)

As under torchrun: a rank that fails stops the others (SIGTERM, then SIGKILL after a grace) and
its status is the launch's; SIGINT and SIGTERM are handed to every rank (the large run saves at
the end of its step and exits 0); the exit status is the first failed rank's, else 0.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

GRACE_S = 30.0  # torchrun's, between its SIGTERM and SIGKILL to the ranks of a failed launch


def listen(port: int) -> socket.socket:
    """The store's socket, bound to 127.0.0.1 and listening: ranks that connect before the store
    serves it wait in its backlog. port 0: one the OS has free."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # the last launch's connections may linger in TIME_WAIT on a fixed MASTER_PORT (as TCPStore does)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        sys.stderr.write(f"launch.sh: MASTER_PORT: cannot listen on 127.0.0.1:{port} ({e.strerror or e}); "
                         "allowed: a free port, or 0 for any\n")
        sys.exit(2)
    sock.listen(128)
    return sock


def serve_store(sock: socket.socket):
    """A TCPStore server on sock (it owns the fd from here: Python closing it under the store
    aborts the process). libuv's server cannot take a bound socket."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", sock.getsockname()[1], is_master=True, master_listen_fd=sock.detach(),
                         wait_for_workers=False, use_libuv=False)


def rank_env(rank: int, nproc: int, port: int, run_id: str) -> dict[str, str]:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": run_id}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    if nproc > 1:  # torchrun's default: N ranks each with a thread per core oversubscribe the CPU
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def main(argv: list[str]) -> int:
    if len(argv) < 5 or not argv[0].isdigit() or int(argv[0]) < 1 or not argv[1].isdigit() or argv[3] != "--":
        sys.stderr.write("usage: python -m windtunnel.local_launch NPROC PORT RUN_ID -- ARGS...\n")
        return 2
    nproc, run_id, args = int(argv[0]), argv[2], argv[4:]
    sock = listen(int(argv[1]))
    port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, *args], env=rank_env(r, nproc, port, run_id)) for r in range(nproc)]
    store = serve_store(sock)  # importing torch here overlaps the ranks' own imports

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    status = 0
    while None in [p.poll() for p in procs]:  # every rank polled (any() stopped at the first running one)
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and not status:
            status = failed[0]
            forward(signal.SIGTERM, None)
            deadline = time.monotonic() + GRACE_S
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.1)
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    status = status or next((p.returncode for p in procs if p.returncode), 0)
    del store
    return 128 - status if status < 0 else status  # a rank killed by signal N: 128 + N, as a shell says


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
