"""Local executor: one fresh process per bundle, at most `workers` at a time, one per GPU when
GPUs are visible. A fresh process per bundle keeps workers stateless: a crash, an OOM or a
SIGKILL loses one bundle, never the sweep.

With `standby` (the default on GPUs) each slot's next process is started while its bundle
trains: it loads Python, torch and CUDA (seconds the GPU would otherwise idle between bundles)
and then waits on its stdin for the folder of the bundle it is to run.

A bundle ends when its result.json appears, not when its process exits: the worker frees its
GPU memory before writing it, and its exit (interpreter and CUDA teardown) overlaps the next
bundle. Should the exiting process still hold memory, the next one's memory check waits for it
(WINDTUNNEL_MEMORY_WAIT_S)."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from windtunnel.executors import WorkerLost
from windtunnel.files import disk_full, write_json
from windtunnel.memory import oom_kills
from windtunnel.config.sweep import ExecutorConfig
from windtunnel.worker import PAYLOAD, RESULT


MEMORY_WAIT_S = 60  # how long a worker's memory check waits for its GPU's previous bundle to exit
EXIT_GRACE_S = 10.0  # at close, how long a waiting or finished worker may take to exit before a SIGKILL


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU")]
    except (OSError, subprocess.TimeoutExpired):
        return []


def _die_with_parent(driver: int) -> None:
    """Linux: the worker ignores Ctrl-C and gets SIGKILL when its driver dies, so a killed driver leaves no
    orphan training on; the re-run driver replaces those trials. (Runs in the child between
    fork and exec: a driver that died before the prctl took effect is caught by the check.)"""
    # Ctrl-C reaches the whole terminal's process group: the driver stops its workers itself (one
    # interrupted while writing to the journal could leave the study's file lock broken)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != driver:
        os._exit(1)


class LocalHandle:
    def __init__(self, proc: subprocess.Popen, bundle_dir: Path, slot: int, log=None):
        self.proc, self.bundle_dir, self.slot, self._log = proc, bundle_dir, slot, log
        self._oom_kills = oom_kills()  # the kernel's count: a SIGKILL it adds to was the OOM killer's

    def done(self) -> bool:
        return (self.bundle_dir / RESULT).exists() or self.proc.poll() is not None

    def result(self) -> list[dict]:
        res = self.bundle_dir / RESULT
        if not res.exists():  # written atomically: present means complete
            self.proc.wait()
        if self._log is not None:
            self._log.close()
        if not res.exists():
            if self.proc.returncode == -signal.SIGKILL and oom_kills() > self._oom_kills >= 0:
                raise WorkerLost(f"out of memory: the kernel's OOM killer ended the worker (status -9); its model "
                                 f"and batch need more memory than was free (log: {self.bundle_dir / 'worker.log'})")
            raise WorkerLost(f"worker exited with status {self.proc.returncode} before writing a result "
                             f"(log: {self.bundle_dir / 'worker.log'})")
        out = json.loads(res.read_text())
        if out.get("disk_full"):  # no fault of the trials: the driver stops, they run again with it
            raise disk_full(out["disk_full"])
        if not out["ok"]:
            raise RuntimeError(out["error"])
        return out["results"]

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class LocalExecutor:
    def __init__(self, cfg: ExecutorConfig):
        self.cfg = cfg
        self.gpus = _visible_gpus()
        threads = max(1, cfg.threads_per_worker)
        self.slots = cfg.workers or (len(self.gpus) or max(1, (os.cpu_count() or 1) // threads))
        self.free = list(range(self.slots))
        self.standby = cfg.standby is True or (cfg.standby == "auto" and bool(self.gpus))
        self.waiting: dict[int, subprocess.Popen] = {}  # slot -> its next worker, started ahead
        self.exiting: list[subprocess.Popen] = []  # workers whose bundle ended, still exiting

    def _spawn(self, slot: int, args: list[str], **io) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, self.cfg.threads_per_worker)), "PYTHONUNBUFFERED": "1"}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
            # the previous bundle on this GPU may still hold its memory while it exits (an H100 sweep lost
            # every second bundle to the memory check): wait for it rather than fail
            env.setdefault("WINDTUNNEL_MEMORY_WAIT_S", str(MEMORY_WAIT_S))
        return subprocess.Popen([sys.executable, "-m", "windtunnel.worker", *args], env=env,
                                preexec_fn=functools.partial(_die_with_parent, os.getpid()), **io)

    def _start_standby(self, slot: int, bundles: Path) -> None:
        """Start slot's next worker now; it runs the next bundle submitted to this slot."""
        with open(bundles / f".standby-{slot}.log", "wb") as early:  # its output until it gets a bundle
            self.waiting[slot] = self._spawn(slot, ["--standby", str(bundles)], stdin=subprocess.PIPE,
                                             stdout=early, stderr=subprocess.STDOUT)

    def submit(self, payload: dict, bundle_dir: Path) -> LocalHandle:
        slot = self.free.pop(0)
        bundle_dir.mkdir(parents=True, exist_ok=True)
        payload = {**payload, "threads": max(1, self.cfg.threads_per_worker)}
        write_json(bundle_dir / PAYLOAD, payload, indent=None)
        (bundle_dir / RESULT).unlink(missing_ok=True)
        proc, log = self.waiting.pop(slot, None), None
        if proc is not None and proc.poll() is None:
            try:  # the worker opens the bundle's log itself
                proc.stdin.write(f"{bundle_dir}\n".encode())
                proc.stdin.close()
            except BrokenPipeError:  # it died while waiting: start one the usual way
                proc = None
        else:
            proc = None
        if proc is None:
            log = open(bundle_dir / "worker.log", "ab")
            proc = self._spawn(slot, [str(bundle_dir)], stdout=log, stderr=subprocess.STDOUT)
        if self.standby:
            self._start_standby(slot, bundle_dir.parent)
        return LocalHandle(proc, bundle_dir, slot, log)

    def release(self, handle: LocalHandle) -> None:
        self.free.append(handle.slot)
        self.exiting = [p for p in (*self.exiting, handle.proc) if p.poll() is None]

    def reattach(self, bundle_dir: Path):
        return None  # a local worker dies with its driver's session: re-run instead

    def close(self) -> None:
        for proc in self.waiting.values():  # EOF on stdin: a waiting worker exits at once
            if proc.poll() is None:
                proc.stdin.close()
        # waiting workers, and those whose results are in but still exiting: a grace, then SIGKILL
        for proc in (*self.waiting.values(), *self.exiting):
            try:
                proc.wait(timeout=EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.waiting.clear()
        self.exiting.clear()
