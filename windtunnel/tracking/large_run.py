"""MLflow tracking of a large run (windtunnel/large_run.py, rank 0) that cannot slow it or stop it.

Every call appends to the run's outbox, <run_dir>/tracking/outbox.jsonl, and returns: the sweep's
mechanism (windtunnel/tracking/tracker.py), whose child process delivers to MLflow, backs off while the
server is down and resumes when it returns; what is left at exit waits for
`windtunnel sync RUN_DIR`. Points are buffered and appended at most every FLUSH_S seconds.

- One MLflow run per run_dir, kept across relaunches (its key in tracking/run_key): a resumed
  launch sets it RUNNING again. It ends FINISHED only when training completed, KILLED when a
  signal or a step limit stopped it, FAILED on an exception (LargeRun.train decides).
- Metrics as the trials log them, against tokens: train_loss, val_loss, lr (and grad_norm), every
  large_run.log_every steps and at every evaluation; and
  system metrics (MLflow's `system/` names: its UI's System metrics tab) every SYSTEM_S seconds.
- Tags: the source sweep and trial, the git commit and package versions (windtunnel.provenance).
- `seconds`: the time spent in these calls, which the run reports (tracking_s).
"""
from __future__ import annotations

import dataclasses
import os
import time
import uuid
from pathlib import Path

from windtunnel.files import write_atomically
from windtunnel.tracking.delivery import flat
from windtunnel.tracking.outbox import NAME
from windtunnel.tracking.tracker import Tracker

FLUSH_S = 2.0
SYSTEM_S = 10.0
MAX_POINTS = 500
# loss.jsonl's names -> the trials' metric names (windtunnel/tracking/delivery.py _op_trial)
METRICS = {"loss": "train_loss", "val_loss": "val_loss", "lr": "lr", "grad_norm": "grad_norm",
           "max_mem_gb": "max_mem_gb"}


class RunTracker:
    def __init__(self, uri: str, experiment: str, run_dir: Path, name: str, params: dict, tags: dict,
                 device=None, log_every: int = 1):
        t0 = time.perf_counter()
        self.dir = Path(run_dir) / "tracking"
        self.log_every = log_every
        self.tracker = Tracker(uri, experiment=experiment, outbox=self.dir / NAME)
        key_file = self.dir / "run_key"
        if key_file.is_file():
            self.key = key_file.read_text().strip()
            self.tracker.reopen(self.key, tags)
        else:
            self.key = f"large-run-{uuid.uuid4().hex[:12]}"
            self.tracker.start_invocation(params, tags, key=self.key, name=name)
            write_atomically(key_file, lambda tmp: tmp.write_text(self.key + "\n"))
        self.device = device
        self.points: list[dict] = []
        self._flushed = time.monotonic()
        self._sampled = self._flushed - SYSTEM_S  # the first point samples at once
        self._cpu = _cpu_times()
        self.seconds = time.perf_counter() - t0

    @classmethod
    def for_run(cls, cfg, run, run_dir: Path, world: int, device) -> RunTracker:
        """The tracker of a large run (rank 0) from its TrialConfig and LargeRunConfig: both as
        params, with the world and device; provenance, the run's name and its source sweep and
        trial as tags."""
        from windtunnel.config.trial import to_dict
        from windtunnel.provenance import tags

        params = flat({**to_dict(cfg), "large_run": dataclasses.asdict(run)})
        params.update(world=world, device=str(device))
        run_tags = {**tags(), "windtunnel.large_run": run.run_name, "windtunnel.world": str(world)}
        if run.source_sweep:
            run_tags["windtunnel.sweep"] = run.source_sweep
        if run.source_trial >= 0:
            run_tags["windtunnel.trial_number"] = str(run.source_trial)
        return cls(run.tracking_uri, run.experiment, run_dir, run.run_name,
                   {k: str(v)[:500] for k, v in params.items()}, run_tags, device, run.log_every)

    def log_record(self, record: dict) -> None:
        """A loss.jsonl record: its metrics at its tokens, every log_every steps and at every
        evaluation (events and records without tokens are not metrics)."""
        if "tokens" in record and "event" not in record and \
                (record["step"] % self.log_every == 0 or "val_loss" in record):
            self.log(record["tokens"], {METRICS[k]: v for k, v in record.items()
                                        if k in METRICS and isinstance(v, (int, float))})

    def log(self, step: int, values: dict) -> None:
        """Metric values at `step` (tokens); appended within FLUSH_S seconds."""
        t0 = time.perf_counter()
        now = time.monotonic()
        self.points.append({"step": int(step), "time": int(time.time() * 1000),
                            "values": {k: float(v) for k, v in values.items()}})
        if now - self._sampled >= SYSTEM_S:
            self._sampled = now
            self.points.append({"step": int(step), "time": int(time.time() * 1000), "values": self._system()})
        if now - self._flushed >= FLUSH_S or len(self.points) >= MAX_POINTS:
            self._flush()
        self.seconds += time.perf_counter() - t0

    def _flush(self) -> None:
        if self.points:
            self.tracker.log_metrics(self.key, self.points)
            self.points = []
        self._flushed = time.monotonic()

    def _system(self) -> dict:
        cpu, self._cpu = self._cpu, _cpu_times()
        return system_metrics(self.device, cpu, self._cpu)

    def close(self, status: str, wait_s: float = 30.0) -> str | None:
        """End the run with status (FINISHED, KILLED, FAILED); wait at most wait_s for delivery.
        None when every record was delivered; else the line to print (they wait in the outbox
        for `windtunnel sync`)."""
        t0 = time.perf_counter()
        delivered = False
        try:
            self._flush()
            self.tracker.finish_invocation(self.key, status=status)
            # no longer than the deliverer's first failure: a server that is down keeps no run waiting
            delivered = self.tracker.flush(timeout=wait_s, until_error=True)
        finally:
            self.tracker.close()
            self.seconds += time.perf_counter() - t0
        return None if delivered else self.tracker.undelivered()


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


def system_metrics(device=None, cpu_before=None, cpu_now=None) -> dict:
    """The machine's CPU and memory use, and this process's GPU memory (and the GPU's use where
    NVML answers), named as MLflow's system metrics are."""
    out = {}
    if cpu_before and cpu_now and cpu_now[1] > cpu_before[1]:
        out["system/cpu_utilization_percentage"] = 100.0 * (cpu_now[0] - cpu_before[0]) / (cpu_now[1] - cpu_before[1])
    try:
        mem = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                mem[k] = int(v.split()[0]) * 1024
        used = mem["MemTotal"] - mem["MemAvailable"]
        out["system/system_memory_usage_megabytes"] = used / 2**20
        out["system/system_memory_usage_percentage"] = 100.0 * used / mem["MemTotal"]
    except (OSError, KeyError, ValueError):
        pass
    if getattr(device, "type", None) == "cuda":
        import torch

        i = device.index or 0
        out[f"system/gpu_{i}_memory_usage_megabytes"] = torch.cuda.memory_reserved(device) / 2**20
        try:
            out[f"system/gpu_{i}_utilization_percentage"] = float(torch.cuda.utilization(device))
        except Exception:  # noqa: BLE001 - no NVML: memory only
            pass
    out["system/process_rss_megabytes"] = _rss() / 2**20
    return out


def _rss() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
