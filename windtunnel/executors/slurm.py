"""Slurm executor: each bundle is a Slurm job submitted through submitit; bundles that become
ready together go out as one job array (`executor.batch()`).

The job is a `submitit.helpers.Checkpointable`: when Slurm signals a job that nears its time
limit or is preempted (USR2, `slurm_signal_delay_s` before the end), submitit calls its
`checkpoint()`, which resubmits the same call, and requeues it (`scontrol requeue`, at most
`executor.max_requeues` times). The trainer writes `<bundle>/ckpt/latest.pt` every
`executor.checkpoint_every` tokens (default: a tenth of the budget), so the requeued job resumes
from its last checkpoint, not from step 0; the worker logs "resumed from step N" and the result
carries `resumed_from_step`.

A job that ends without a result (scancel'ed, killed at its time limit before it could requeue,
node failure) is resubmitted by this executor into the same bundle folder, so it also resumes
from its checkpoint, when it has one and requeues are left (`executor.max_requeues`);
otherwise it is `WorkerLost` and the driver's retry policy applies (`executor.max_requeues=0`:
every lost job is WorkerLost at once).

Job state comes from the result files and one `squeue` call for all jobs, at most every
`executor.poll_s` seconds, never from `sacct` (it is slow on a busy cluster, submitit issue
1759, and fails where accounting is off). Each bundle folder keeps its job id (`job_id`), so a
driver that was killed re-attaches to its still-running jobs (`reattach`).

The sweep folder (payloads, results, checkpoints, the study journal that pruning reads) must be
on a filesystem that the compute nodes share with the login node.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

from windtunnel.executors import WorkerLost
from windtunnel.config.sweep import ExecutorConfig
from windtunnel.files import append_line, write_json, write_text
from windtunnel.worker import PAYLOAD, RESULT

JOB_ID, REQUEUES, CKPT = "job_id", "requeues", Path("ckpt") / "latest.pt"
CANCELLED = "cancelled"  # the driver scancelled the job itself
# states in which a job may still produce a result (squeue --states=all, Slurm 22.05)
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
          "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "SPECIAL_EXIT", "RESV_DEL_HOLD"}

try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # submitit is only needed for executor=slurm; the error comes from SlurmExecutor
    _Checkpointable = object


class BundleJob(_Checkpointable):
    """The Slurm job's function: train one bundle (payload.json in, result.json out).

    Checkpointable's default `checkpoint(bundle_dir)` resubmits this same call; the trainer's own
    checkpoint in the bundle folder carries the state, so nothing else is saved here."""

    def __call__(self, bundle_dir: str) -> str:
        import traceback

        from submitit.core.utils import UncompletedJobError

        from windtunnel.worker import run_bundle

        from submitit import JobEnvironment

        d = Path(bundle_dir)
        _append(d / "worker.log", f"job {JobEnvironment().job_id} (restart {os.environ.get('SLURM_RESTART_COUNT', '0')}) "
                                  f"started on {socket.gethostname()}")
        payload = json.loads((d / PAYLOAD).read_text())
        try:
            out = {"ok": True, "results": run_bundle(payload)}
        except UncompletedJobError:  # submitit: timed out too many times; no result, the driver decides
            raise
        except Exception as e:  # deterministic: the driver fails the trials, no retry
            await_requeue_kill(e)
            traceback.print_exc()
            out = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        write_json(d / RESULT, out, indent=None)
        resumed = [r.get("resumed_from_step") for r in out.get("results", [])]
        if resumed and resumed[0] is not None:
            _append(d / "worker.log", f"finished; resumed from step {resumed[0]}")
        return str(d / RESULT)


def await_requeue_kill(e: BaseException, limit_s: float = 600) -> None:
    """Return unless e is `scontrol requeue` killed by a signal; then write nothing and wait.

    submitit's USR2 handler runs `scontrol requeue` inside the job, and the requeue (or the time
    limit) signals every process of the job, scontrol too, which on a slow node has not exited yet.
    That error means the job is going away, not that the trial failed: a result written now would
    fail a trial that its requeued job is about to resume. Slurm's SIGKILL follows within KillWait;
    should it not, e is raised, and the driver sees a job that ended without a result."""
    if (isinstance(e, subprocess.CalledProcessError) and e.returncode < 0
            and [str(c) for c in e.cmd[:2]] == ["scontrol", "requeue"]):
        time.sleep(limit_s)
        raise e


class Squeue:
    """Every job's state from one `squeue` call, refreshed at most every poll_s seconds."""

    def __init__(self, poll_s: float):
        self.poll_s, self.at, self.states, self.ok = poll_s, -1e9, {}, False

    def state(self, job_id: str, fresh: bool = False) -> str | None:
        """The job's state; None when Slurm no longer knows it; 'UNKNOWN' when squeue failed."""
        if fresh or time.monotonic() - self.at >= self.poll_s:
            self.refresh()
        if not self.ok:
            return "UNKNOWN"
        return self.states.get(job_id)

    def refresh(self) -> None:
        self.at = time.monotonic()
        try:
            r = subprocess.run(["squeue", "--me", "-h", "-r", "--states=all", "-o", "%i|%T"],
                               capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.ok = False
            return
        self.ok = r.returncode == 0
        if self.ok:
            self.states = dict(line.strip().split("|", 1) for line in r.stdout.splitlines() if "|" in line)


class SlurmHandle:
    def __init__(self, executor: "SlurmExecutor", bundle_dir: Path, job_id: str | None = None):
        self.ex, self.bundle_dir, self.job_id = executor, bundle_dir, job_id
        self.lost: str | None = None
        self.submitted_at = time.monotonic()

    def _result_file(self) -> bool:
        return (self.bundle_dir / RESULT).exists()

    def done(self) -> bool:
        if self.lost or self._result_file():
            return True
        if self.job_id is None:
            self.ex.flush()
            return False
        state = self.ex.squeue.state(self.job_id)
        if state in ACTIVE or state == "UNKNOWN":
            return False
        if state is None and time.monotonic() - self.submitted_at < 2 * self.ex.squeue.poll_s:
            return False  # just submitted: not listed yet
        if self._result_file():  # finished between the two looks
            return True
        self._ended_without_result(state or "gone from squeue")
        return self.lost is not None

    def _ended_without_result(self, state: str) -> None:
        """Resubmit from the checkpoint when there is one and requeues are left; else lost."""
        n = _read_int(self.bundle_dir / REQUEUES)
        log = self.ex.job_log(self.job_id)
        if (self.bundle_dir / CKPT).exists() and n < self.ex.cfg.max_requeues:
            write_json(self.bundle_dir / REQUEUES, n + 1, indent=None)
            _append(self.bundle_dir / "worker.log", f"job {self.job_id} ended ({state}) without a result; "
                                                    f"resubmitted from its checkpoint ({n + 1}/{self.ex.cfg.max_requeues})")
            self.job_id = None
            self.submitted_at = time.monotonic()
            self.ex.queue(self)
            return
        why = "no checkpoint to resume from" if n < self.ex.cfg.max_requeues else f"requeued {n} times already"
        self.lost = f"Slurm job {self.job_id} ended ({state}) without a result; {why} (log: {log})"

    def result(self) -> list[dict]:
        if not self._result_file():
            raise WorkerLost(self.lost or f"Slurm job {self.job_id} has no result")
        out = json.loads((self.bundle_dir / RESULT).read_text())
        if not out["ok"]:
            raise RuntimeError(out["error"])
        return out["results"]

    def cancel(self) -> None:
        if self.job_id is None:
            self.ex.unqueue(self)
        else:
            subprocess.run(["scancel", self.job_id], capture_output=True, timeout=60)
            (self.bundle_dir / CANCELLED).touch()  # squeue shows it COMPLETING for a while: not to re-attach
        self.lost = self.lost or "cancelled"


def _check_controller() -> None:
    """sbatch against a stopped controller fails only at the first submission, as a traceback."""
    from windtunnel.errors import ConfigError

    hint = "run the sweep on a Slurm cluster's login node"
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise ConfigError(f"executor.type: slurm needs Slurm's commands here (no scontrol); {hint}") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"executor.type: slurm: `scontrol ping` did not answer in 30 s; {hint}") from None
    if r.returncode != 0:
        first = (r.stdout or r.stderr).strip().splitlines()[:1]
        raise ConfigError(f"executor.type: slurm: no controller answers ({first[0] if first else 'scontrol ping failed'}); {hint}")


class SlurmExecutor:
    def __init__(self, cfg: ExecutorConfig, sweep_dir: Path):
        try:
            import submitit
        except ImportError as e:
            raise RuntimeError("executor=slurm needs submitit: pip install submitit") from e
        _check_controller()
        self.cfg = cfg
        self.folder = Path(cfg.folder) if cfg.folder else Path(sweep_dir) / "slurm"
        self.ex = submitit.AutoExecutor(folder=self.folder / "%j", cluster="slurm",
                                        slurm_max_num_timeout=cfg.max_requeues)
        params = {"name": f"wt-{Path(sweep_dir).name}", "timeout_min": cfg.time_min, "nodes": 1,
                  "tasks_per_node": 1, "cpus_per_task": cfg.cpus_per_job,
                  "slurm_array_parallelism": cfg.array_parallelism or 64,
                  # USR2 this long before the time limit: room to requeue (a quarter of a short job)
                  "slurm_signal_delay_s": int(max(10, min(90, cfg.time_min * 60 // 4))),
                  "slurm_additional_parameters": dict(cfg.sbatch_extra)}
        optional = {"slurm_partition": cfg.partition, "gpus_per_node": cfg.gpus_per_job,
                    "mem_gb": cfg.mem_gb, "slurm_account": cfg.account, "slurm_qos": cfg.qos}
        params.update({k: v for k, v in optional.items() if v})
        self.ex.update_parameters(**params)
        self.slots = cfg.workers or cfg.array_parallelism or 64
        self.squeue = Squeue(cfg.poll_s)
        self._queued: list[SlurmHandle] = []

    # -- submission: bundles that become ready together go out as one job array ----------------
    def submit(self, payload: dict, bundle_dir: Path) -> SlurmHandle:
        bundle_dir.mkdir(parents=True, exist_ok=True)
        every = payload.get("checkpoint_every") or max(1, min(t["config"]["train"]["tokens"] for t in payload["trials"]) // 10)
        payload = {**payload, "checkpoint_every": int(every), "threads": max(1, self.cfg.cpus_per_job)}
        write_json(bundle_dir / PAYLOAD, payload, indent=None)
        for name in (RESULT, JOB_ID, REQUEUES):
            (bundle_dir / name).unlink(missing_ok=True)
        handle = SlurmHandle(self, bundle_dir)
        self.queue(handle)
        return handle

    def queue(self, handle: SlurmHandle) -> None:
        self._queued.append(handle)

    def unqueue(self, handle: SlurmHandle) -> None:
        if handle in self._queued:
            self._queued.remove(handle)

    def flush(self) -> None:
        """sbatch what submit() queued: one job, or one array for several."""
        todo, self._queued = self._queued, []
        if not todo:
            return
        fn = BundleJob()
        if len(todo) == 1:
            jobs = [self.ex.submit(fn, str(todo[0].bundle_dir))]
        else:
            with self.ex.batch():
                pending = [self.ex.submit(fn, str(h.bundle_dir)) for h in todo]
            jobs = pending
        for h, job in zip(todo, jobs):
            h.job_id, h.submitted_at = str(job.job_id), time.monotonic()
            write_text(h.bundle_dir / JOB_ID, h.job_id + "\n")

    def job_log(self, job_id: str | None) -> Path:
        """submitit's log of the job (its stdout and stderr)."""
        return self.folder / str(job_id) / f"{job_id}_0_log.out"

    def release(self, handle: SlurmHandle) -> None:
        pass

    def reattach(self, bundle_dir: Path) -> SlurmHandle | None:
        """A dead driver's bundle: its job if Slurm still runs it or it left a result, else None."""
        job = bundle_dir / JOB_ID
        if (bundle_dir / RESULT).exists():
            return SlurmHandle(self, bundle_dir, job.read_text().strip() if job.exists() else "done")
        if not job.exists() or (bundle_dir / CANCELLED).exists():
            return None
        job_id = job.read_text().strip()
        state = self.squeue.state(job_id, fresh=True)
        if state in ACTIVE or state == "UNKNOWN":
            return SlurmHandle(self, bundle_dir, job_id)
        return SlurmHandle(self, bundle_dir, job_id) if (bundle_dir / RESULT).exists() else None

    def close(self) -> None:
        self._queued = []


def _read_int(path: Path) -> int:
    try:
        return int(json.loads(path.read_text()))
    except (OSError, ValueError):
        return 0


def _append(path: Path, line: str) -> None:
    append_line(path, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}")
