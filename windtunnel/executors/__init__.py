"""Where bundles of trials run: local processes, Ray tasks, or Slurm jobs (submitit).

An executor takes a payload (windtunnel/worker.py) and its bundle folder and returns a handle
with `done()`, `result()` (the per-trial result dicts, or `WorkerLost` if the worker died) and
`cancel()`. The driver owns retries: executors only report what happened.
"""
from __future__ import annotations

from pathlib import Path

from windtunnel.config.sweep import ExecutorConfig


class WorkerLost(RuntimeError):
    """The worker died or vanished before writing a result (killed, OOM, node lost)."""


class ExecutorGone(RuntimeError):
    """The executor itself is gone (the Ray cluster stopped): no trial's fault, and no bundle
    can run; the driver stops, and a re-run resumes the trials it had running."""


def make_executor(cfg: ExecutorConfig, sweep_dir: Path):
    if cfg.type == "local":
        from windtunnel.executors.local import LocalExecutor

        return LocalExecutor(cfg)
    if cfg.type == "ray":
        from windtunnel.executors.ray import RayExecutor

        return RayExecutor(cfg)
    if cfg.type == "slurm":
        from windtunnel.executors.slurm import SlurmExecutor

        return SlurmExecutor(cfg, sweep_dir)
    raise ValueError(f"executor.type: must be one of local, ray, slurm (got {cfg.type!r})")
