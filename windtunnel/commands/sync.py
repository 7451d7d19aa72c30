"""`windtunnel sync RESULTS_DIR[/SWEEP] [--uri URI]`: send tracking records a sweep could not deliver.

A sweep appends every MLflow record to <results_dir>/<sweep>/tracking/outbox.jsonl and delivers it
in the background; what a down server did not take waits there. This command delivers the rest
(each record to the URI its sweep used, or all of them to --uri), skipping what already arrived;
a `report --mlflow` replay is not copied by --uri where the sweep tracked its runs itself (it
repeats them). A server gone for good: `--drop URI` stops waiting for it (its records stay in the
outbox for --uri to copy).
Exit 0 when nothing is left pending, 1 otherwise.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RESULTS_DIR[/SWEEP]",
                        help="a sweep's results folder (results/quickstart) or a results folder (all its sweeps)")
    parser.add_argument("--uri", default=None,
                        help="deliver every record to this MLflow tracking URI instead of the sweep's own "
                             "('' = the sweep's local store)")
    parser.add_argument("--drop", metavar="URI", default=None,
                        help="stop waiting for this URI (a server gone for good): its pending records count as handled")


def run(args: argparse.Namespace) -> int:
    from windtunnel.errors import ConfigError
    from windtunnel.config.sweep import check_tracking_uri
    from windtunnel.tracking.outbox import outbox_dirs
    from windtunnel.tracking.sync import drop_pending, sync_dir

    from windtunnel import credentials

    check_tracking_uri(args.uri, "--uri")
    args.uri, args.drop = credentials.take(args.uri), credentials.take(args.drop)
    if args.drop is not None and args.uri is not None:
        raise ConfigError("--drop: not with --uri (drop first, then copy)")
    path = Path(args.path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such folder (allowed: RESULTS_DIR or RESULTS_DIR/SWEEP)")
    dirs = outbox_dirs(path)
    if not dirs:
        raise ConfigError(f"{path}: holds no tracking/outbox.jsonl (allowed: a folder `windtunnel sweep` wrote, "
                          "or the results folder above it)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.drop is not None:
        for d in dirs:
            print(f"{d.parent}: dropped {drop_pending(d, args.drop.strip())} pending for {args.drop.strip() or 'the local store'}")
        return 0
    left_total = 0
    for d in dirs:
        sent, skipped, left, error = sync_dir(d, args.uri)
        left_total += sum(left.values())
        waiting = "; ".join(f"{n} pending for {uri}" for uri, n in left.items()) or "0 pending"
        line = f"{d.parent}: sent {sent}, {waiting}" + (f", {skipped} skipped for good (warnings above)" if skipped else "")
        print(line + (f" ({error})" if error else ""))
        torn = _torn_tail(d / "outbox.jsonl")
        if torn:  # never a silent 0: that record (often the run's finish) was not sent
            left_total += 1
            print(f"{d.parent}: the outbox ends in {torn} bytes of a record cut short (a full disk or a crash), "
                  f"not sent; the run it belongs to may stay RUNNING in MLflow ({d / 'outbox.jsonl'})", file=sys.stderr)
    return 0 if left_total == 0 else 1


def _torn_tail(outbox: Path) -> int:
    """Bytes after the outbox's last newline: a record whose write was cut short."""
    try:
        with open(outbox, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - (1 << 20)))
            tail = f.read()
    except OSError:
        return 0
    return len(tail) - (tail.rfind(b"\n") + 1) if tail.rfind(b"\n") >= 0 or size <= (1 << 20) else 0
