"""One module per `windtunnel` subcommand (see windtunnel/cli.py)."""
from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def stdout_may_close():
    """Printing to a reader that may stop early (`--json | head -1`): the output just ends there,
    with no BrokenPipeError traceback."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the exit's flush fails again
