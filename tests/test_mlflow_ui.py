"""`windtunnel ui` in headless Chromium: the experiment page lists the sweep's trial runs.

Needs Debian's chromium (`apt-get install -y chromium`; .ci/setup.sh installs it). The screenshot
is saved in the test's tmp dir; with WINDTUNNEL_SCREENSHOT=1 it is copied to
results/screenshots/mlflow_ui.png (a plain test run leaves the tracked tree alone).
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from windtunnel.tracking.tracker import Tracker

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "results" / "screenshots" / "mlflow_ui.png"
TRIALS = 4

pytestmark = pytest.mark.browser


def chromium_binary() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        reason = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + " (CI is set, so this fails instead of skipping)", pytrace=False)
        pytest.skip(reason)
    return path


def chromium(binary: str, profile: Path, url: str, *, budget_ms: int, dump: bool = False,
             screenshot: Path | None = None) -> str:
    """One headless Chromium run: the DOM after `budget_ms` of virtual time, or a screenshot."""
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,900",
           f"--virtual-time-budget={budget_ms}"]
    cmd += ["--dump-dom"] if dump else [f"--screenshot={screenshot}"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=90)
    return out.stdout


@pytest.fixture
def filled_results(tmp_path) -> Path:
    """results/uisweep/tracking/mlflow.db with one invocation and TRIALS trials."""
    results = tmp_path / "results"
    tracker = Tracker("", experiment="uisweep", outbox=results / "uisweep" / "tracking" / "outbox.jsonl")
    parent = tracker.start_invocation(params={"n_trials": TRIALS}, tags={"windtunnel.sweep": "uisweep"})
    for n in range(TRIALS):
        c = [{"step": s, "tokens": (s + 1) * 4096, "lr": 1e-2, "train_loss": 4.0 - 0.2 * s + 0.05 * n,
              "val_loss": 4.1 - 0.2 * s + 0.05 * n} for s in range(8)]
        tracker.log_trial(parent, n, 1, params={"optim.lr": 10 ** -(1 + n / 2), "model.d_model": 64},
                          curve=c, metrics={"final_val_loss": c[-1]["val_loss"]}, status="FINISHED")
    tracker.finish_invocation(parent)
    assert tracker.flush(timeout=60), tracker.last_error
    tracker.close()
    return results


def test_ui_lists_trial_runs(filled_results, tmp_path):
    from conftest import free_port

    binary = chromium_binary()
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "windtunnel.cli", "ui", str(filled_results), "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        # A reader thread, not select() on the buffered pipe: a readline() can pull the URL line
        # into Python's buffer along with the one before it, and select() would then wait forever.
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in ui.stdout], daemon=True).start()
        url = None
        deadline = time.monotonic() + 90
        while url is None and time.monotonic() < deadline and ui.poll() is None:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            m = re.search(r"MLflow UI of uisweep: (\S+)", line)
            url = m.group(1) if m else None
        assert url, f"`windtunnel ui` printed no URL (exit status {ui.poll()})"
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/"), url

        names = [f"trial-{n:04d}" for n in range(TRIALS)]
        dom = ""
        for attempt, budget in enumerate((15000, 30000, 60000)):  # a cold server answers the first load slowly
            dom = chromium(binary, tmp_path / f"profile{attempt}", url, budget_ms=budget, dump=True)
            if all(n in dom for n in names):
                break
        missing = [n for n in names if n not in dom]
        assert not missing, f"experiment page lacks runs {missing} ({len(dom)} chars of DOM)"
        assert "uisweep" in dom

        shot = tmp_path / "mlflow_ui.png"
        chromium(binary, tmp_path / "profile-shot", url, budget_ms=30000, screenshot=shot)
        assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot"
        if os.environ.get("WINDTUNNEL_SCREENSHOT"):
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, SCREENSHOT)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # `windtunnel ui` stops its server on SIGTERM
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
    assert ui.returncode == 0, f"`windtunnel ui` exited with {ui.returncode} on SIGTERM"
    with pytest.raises(OSError):  # and its server is gone
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
