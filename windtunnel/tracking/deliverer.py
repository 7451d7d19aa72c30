"""The deliverer: the child process a Tracker starts (`python -m windtunnel.tracking.deliverer
TRACKING_DIR --uri URI`). A process and not a thread, so that MLflow's Python work never holds the
driver's GIL. It reads the outbox in order and delivers it (delivery.py); while the server is down
it backs off and retries; what is left at exit stays in the outbox for `windtunnel sync`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from windtunnel.tracking.delivery import Busy, Delivery
from windtunnel.tracking.outbox import NAME
from windtunnel.tracking.state import write_status
from windtunnel.tracking.store import HTTP_ENV, quiet_mlflow

log = logging.getLogger(__name__)


def follow(tracking_dir: Path, uri: str, wake_fd: int = 0) -> int:
    """The deliverer's loop (the Tracker's child process): deliver as records arrive, back off
    while MLflow fails, and exit after one last pass once `wake_fd` reaches EOF or on SIGTERM."""
    import select
    import signal

    tracking_dir = Path(tracking_dir)
    delivery = Delivery(tracking_dir, uri, own_only=True)
    outbox = tracking_dir / NAME
    stopping = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))
    done, failures, eof, error = 0, 0, False, None

    def wait(seconds: float) -> bool:
        """Sleep until a byte arrives or `seconds` pass; True when asked to retry now ('f')."""
        nonlocal eof
        if eof:
            return False
        ready, _, _ = select.select([wake_fd], [], [], seconds)
        if ready:
            data = os.read(wake_fd, 65536)
            if not data:
                eof = True
            return b"f" in data
        return False

    while not stopping["now"]:
        last_pass = eof
        try:
            size = outbox.stat().st_size
        except FileNotFoundError:
            size = 0
        if done < size:
            try:
                delivery.run(should_stop=lambda: stopping["now"],
                             progress=lambda off: None)
                done = size if not stopping["now"] else done
                failures = 0
                if error is not None:
                    log.warning("MLflow at %s: delivering again", delivery.resolved_uri)
                    error = None
                    write_status(tracking_dir, None)
            except Busy:
                wait(1.0)
                continue
            except Exception as e:  # noqa: BLE001 - keep going: the sweep's records must get there
                failures += 1
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                if error is None:
                    log.warning("MLflow at %s: %s; records wait in %s and are retried (or `windtunnel sync %s`)",
                                delivery.resolved_uri, msg, outbox, tracking_dir.parent)
                error = msg
                write_status(tracking_dir, error)
                if last_pass:
                    break
                wait(min(10.0, 0.5 * 2 ** (failures - 1)))
                continue
        if last_pass:
            break
        wait(5.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m windtunnel.tracking.deliverer",
                                description="deliver a sweep's tracking outbox as it grows (started by Tracker)")
    p.add_argument("tracking_dir")
    p.add_argument("--uri", default="")
    args = p.parse_args(argv)
    # yield the CPU to the driver and trials; set here, not by Popen's preexec_fn, which runs Python
    # between fork and exec: unsafe in a process with threads (a large run's rank 0: NCCL's, gloo's)
    os.nice(10)
    logging.basicConfig(level=logging.WARNING, format="windtunnel tracking: %(message)s")
    for name, value in HTTP_ENV.items():  # the deliverer's own process (Tracker passes them too)
        os.environ.setdefault(name, value)
    quiet_mlflow()
    return follow(Path(args.tracking_dir), args.uri)


if __name__ == "__main__":
    raise SystemExit(main())
