"""The sweep driver: owns the Optuna study (the only caller of ask and tell), keeps every
executor slot busy with bundles of same-shape trials, tells each trial's own result, and logs
it to MLflow. Re-running the same sweep continues it: trials left RUNNING by a dead driver are
failed and re-enqueued with the same parameters (attempt + 1), so none is lost or duplicated.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from windtunnel import data, locks, memory
from windtunnel.config.trial import TrialConfig, to_dict, with_overrides
from windtunnel.errors import ConfigError
from windtunnel.files import DiskFull
from windtunnel.executors import ExecutorGone, WorkerLost, make_executor
from windtunnel.grid_extend import MARK, edge_points, missing_points
from windtunnel.kernels import select as select_kernels
from windtunnel.results import counts_as_finished, write_report, write_tables
from windtunnel.search import check_data, distributions, fixed_params, open_study, storage_url
from windtunnel.config.sweep import SweepConfig, trial_seeds
from windtunnel.trainer import bundle_key, resolve_device
from windtunnel.worker import RESULT

TS = optuna.trial.TrialState
CARRIED = ("seed_of", "replicate")  # what a retry keeps of the trial it replaces: its seeds, confirm's replicate


@dataclass
class Bundle:
    trials: list[optuna.trial.Trial]
    dir: Path
    handle: object = None
    started: float = 0.0


@dataclass
class Tally:
    ok: int = 0
    pruned: int = 0
    failed: int = 0
    best: float = math.inf
    told: list[int] = field(default_factory=list)


def _ended_at(b: Bundle) -> float:
    """When the bundle's slot really freed: its result's write time where the worker left one
    (the driver may notice later, busy asking), else now; never before this driver submitted or
    re-attached it (a result written while no driver ran is no wait of this one's)."""
    now = time.time()
    try:
        return min(now, max(b.started, (b.dir / RESULT).stat().st_mtime))
    except OSError:
        return now


class StopRequest:
    """Ctrl-C or SIGTERM (a scheduler's stop): the driver stops between its steps, not inside an
    Optuna storage call (an exception there broke the journal's file lock: Optuna's lock, hit while
    it waited, removed the lock file of the worker that held it). A second signal stops it now."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping: workers cancelled at the driver's next step (again to stop at once)", file=sys.stderr)


class Driver:
    def __init__(self, cfg: SweepConfig, progress: bool = True, stop: StopRequest | None = None,
                 tokens: dict | None = None):
        """tokens: the data identity every trial must train on (a confirmation's: its search's); a new
        study takes it, so each worker's result is held to it on every executor (check_data)."""
        self.cfg = cfg
        self.stop = stop or StopRequest()  # run_sweep points SIGINT and SIGTERM at it
        self.dir = Path(cfg.results_dir) / cfg.name
        shards = preflight(cfg) if cfg.executor.type == "local" else None
        self.executor = make_executor(cfg.executor, self.dir)  # before any write: an absent cluster is an error
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = hold_driver_lock(self.dir)  # before the study: recover() would take a live driver's trials
        try:  # a refused resume frees the sweep for the next driver in this process too
            self.study = open_study(cfg, self.dir)
            check_data(self.study, cfg.name, tokens)
            check_data(self.study, cfg.name, data.identity(shards.manifest) if shards else None)
        except ConfigError:
            self._lock.close()
            raise
        self.study.set_user_attr("fixed", json.dumps(fixed_params(cfg)))
        self.study.set_user_attr("sweep", json.dumps(to_dict(cfg), default=str))
        self.dists = distributions(cfg)
        self.fixed = fixed_params(cfg)
        self.K = memory.population_size(cfg)
        self.extra = sum(MARK in t.user_attrs for t in self.study.get_trials(deepcopy=False))
        self.running: list[Bundle] = []
        self.ready: list[Bundle] = []  # asked ahead, waiting for a slot
        self.tally = Tally()
        self.progress = progress
        # slot time spent waiting for the driver (ask, tell, bookkeeping) while trials remained
        self.freed: list[float] = []
        self.waited = 0.0
        self.trained = 0.0  # slot time the bundles' trainers report as training (their `seconds`)
        self.asking = 0.0  # driver time spent asking the sampler
        self.tracking = None  # MLflow (windtunnel/tracking/sweep.py)
        if cfg.tracking.enabled:
            from windtunnel.tracking.sweep import SweepTracking

            self.tracking = SweepTracking(cfg, self.dir, self.study, self.K, self.finished() < cfg.n_trials)

    # -- bookkeeping ----------------------------------------------------------------------------
    def finished(self) -> int:
        return sum(counts_as_finished(t) for t in self.study.get_trials(deepcopy=False))

    def in_flight(self) -> int:
        return sum(len(b.trials) for b in self.running + self.ready)

    def remaining(self) -> int:  # extension trials (grid_extend) come on top of n_trials
        return self.cfg.n_trials + self.extra - self.finished() - self.in_flight()

    def extend(self) -> bool:
        """Enqueue the grid points a reseeded sampler never ran (grid_extend.missing_points), else the
        trials past an edge optimum of the grid's extend.param; False if none."""
        if self.stop.requested:
            return False
        new = [(p, "missing") for p in missing_points(self.study, self.cfg)] or edge_points(self.study, self.cfg)
        for params, side in new:
            self.study.enqueue_trial(params, user_attrs={MARK: side}, skip_if_exists=False)
        self.extra += len(new)
        return bool(new)

    # -- ask ------------------------------------------------------------------------------------
    def ask_bundles(self, n: int) -> None:
        """Ask n trials and group the same-shape ones into bundles of at most K."""
        t0 = time.time()
        groups: dict[str, list[optuna.trial.Trial]] = {}
        for _ in range(n):
            if self.stop.requested:  # between asks: each GP ask can take seconds
                break
            trial = self.study.ask(self.dists)
            try:
                tcfg = self.trial_config(trial)
            except ConfigError as e:  # e.g. a sampled width that n_heads does not divide
                self._tell(trial, "failed", None, {"reason": f"invalid config: {e}"})
                continue
            trial.set_user_attr("config", to_dict(tcfg))
            groups.setdefault(bundle_key(tcfg), []).append(trial)
        for trials in groups.values():
            for i in range(0, len(trials), self.K):
                part = trials[i:i + self.K]
                b = Bundle(part, self.dir / "bundles" / f"trial-{part[0].number:05d}")
                for t in part:  # recorded before the bundle runs: a driver killed after can re-attach
                    t.set_user_attr("bundle", str(b.dir))
                self.ready.append(b)
        self.asking += time.time() - t0

    def trial_config(self, trial: optuna.trial.Trial) -> TrialConfig:
        """The base config with the trial's sampled and fixed params and, with seeds=per_trial, its
        own seeds (a retry keeps its first attempt's: `seed_of`)."""
        params = {**trial.params, **self.fixed}
        # a space that sets a seed itself (replicates as a grid axis) keeps its own seeds
        if self.cfg.seeds == "per_trial" and not {"train.seed", "train.data_seed"} & set(params):
            seeds = trial_seeds(self.cfg.train.seed, trial.user_attrs.get("seed_of", trial.number))
            params = {"train.seed": seeds[0], "train.data_seed": seeds[1], **params}
        return with_overrides(self.cfg.trial, params)

    def fill(self) -> None:
        free = self.slots_free()
        while free > 0 and not self.stop.requested:  # a stop asks nothing more: ask_bundles returns at once
            if not self.ready:
                n = min(self.remaining(), self.K)
                if n <= 0:
                    return
                self.ask_bundles(n)
                continue
            self.submit(self.ready.pop(0))
            free -= 1
        # ask ahead: the next bundle is sampled while the current ones train
        if not self.ready and self.remaining() > 0:
            self.ask_bundles(min(self.remaining(), self.K))

    def slots_free(self) -> int:
        return self.executor.slots - len(self.running)

    def submit(self, b: Bundle) -> None:
        payload = {"study": self.cfg.name, "storage": storage_url(self.cfg, self.dir),
                   "pruner": to_dict(self.cfg.pruner), "bundle_dir": str(b.dir),
                   "checkpoint_every": self.cfg.executor.checkpoint_every,
                   "trials": [{"number": t.number, "trial_id": t._trial_id, "config": t.user_attrs["config"]}
                              for t in b.trials]}
        b.handle = self.executor.submit(payload, b.dir)
        b.started = time.time()
        if self.freed:
            self.waited += b.started - self.freed.pop(0)
        self.running.append(b)

    # -- tell -----------------------------------------------------------------------------------
    def _tell(self, trial: optuna.trial.Trial, status: str, value: float | None, result: dict) -> None:
        state = {"ok": TS.COMPLETE, "pruned": TS.PRUNED}.get(status, TS.FAIL)
        if state == TS.COMPLETE and (value is None or not math.isfinite(value)):
            state, result = TS.FAIL, {**result, "reason": result.get("reason") or "no final loss"}
        trial.set_user_attr("result", {**result, "status": status})  # curve and provenance included
        self.study.tell(trial.number, value if state == TS.COMPLETE else None, state=state)
        if state == TS.COMPLETE:
            self.tally.ok += 1
            self.tally.best = min(self.tally.best, value)
        elif state == TS.PRUNED:
            self.tally.pruned += 1
        else:
            self.tally.failed += 1
        self.tally.told.append(trial.number)
        if self.tracking is not None:
            self.tracking.trial(trial, result, value, state)

    def fail_or_retry(self, trial: optuna.trial.Trial, reason: str, its_fault: bool = True) -> None:
        """Replace the trial by a copy (same parameters), or fail it once its retries are spent.
        A stopped driver is no fault of the trial (its_fault=False): the copy keeps the attempt
        number, so Ctrl-C and resume, however often, never fail a trial for good."""
        attempt = trial.user_attrs.get("attempt", 1)
        if attempt <= self.cfg.executor.retries or not its_fault:
            trial.set_user_attr("retried", True)
            trial.set_user_attr("reason", f"{reason}; retried")
            self.study.tell(trial.number, state=TS.FAIL)
            carried = {k: trial.user_attrs[k] for k in CARRIED if k in trial.user_attrs}
            self.study.enqueue_trial(trial.params, user_attrs={
                "seed_of": trial.number, **carried, "attempt": attempt + 1 if its_fault else attempt,
                "retry_of": trial.number}, skip_if_exists=False)
        else:
            self._tell(trial, "failed", None, {"reason": f"{reason} (attempt {attempt}, no retries left)"})

    def collect(self) -> None:
        """Bundles that ended: their slots go first to the bundles asked ahead (which need nothing
        from these results), then their trials are told: bookkeeping no slot waits for."""
        now, ended = time.time(), []
        for b in list(self.running):
            timeout = self.cfg.executor.trial_timeout_s
            if not b.handle.done():
                if timeout and now - b.started > timeout:
                    b.handle.cancel()
                    ended.append((b, now, f"timed out after {timeout:.0f} s"))
                continue
            freed = _ended_at(b)
            try:
                outcome = b.handle.result()
            except WorkerLost as e:  # lost: retried
                outcome = str(e)
            except (ExecutorGone, DiskFull):  # no bundle can run, or nothing can be written: the driver stops
                raise
            except Exception as e:  # the worker raised: deterministic, so no retry
                outcome = e
            ended.append((b, freed, outcome))
        for b, freed, _ in ended:
            self.running.remove(b)
            self.executor.release(b.handle)
            self.freed.append(freed)
        while self.ready and self.slots_free() > 0:
            self.submit(self.ready.pop(0))
        for b, _, outcome in ended:
            if isinstance(outcome, str):
                for t in b.trials:  # a stop's SIGTERM to the process group (scancel) ends workers too
                    self.fail_or_retry(t, outcome, its_fault=not self.stop.requested)
            elif isinstance(outcome, Exception):
                for t in b.trials:
                    self._tell(t, "failed", None, {"reason": f"{type(outcome).__name__}: {outcome}"})
            else:
                by_number = {r["number"]: r for r in outcome}
                try:  # a worker that read other data than the study's (a Ray or Slurm node's copy)
                    check_data(self.study, self.cfg.name, outcome[0].get("provenance", {}).get("data") if outcome else None)
                except ConfigError as e:
                    for t in b.trials:
                        self._tell(t, "failed", None, {"reason": str(e)})
                    raise
                self.trained += max((r.get("seconds") or 0.0 for r in outcome), default=0.0)
                for t in b.trials:  # by number: a re-attached bundle may hold a subset of its trials
                    r = by_number[t.number]
                    self._tell(t, r["status"], r.get("final_val_loss"), r)

    def recover(self) -> None:
        """Trials a previous driver left RUNNING: re-attach where the executor can, else replace."""
        bundles: dict[str, list[optuna.trial.Trial]] = {}  # a bundle's trials share one job
        for ft in self.study.get_trials(deepcopy=False, states=(TS.RUNNING,)):
            trial = optuna.trial.Trial(self.study, ft._trial_id)
            if "config" not in ft.user_attrs:  # died while asking: its params may be partial; ask anew
                trial.set_user_attr("retried", True)
                trial.set_user_attr("reason", "asked by a driver that died before running it")
                self.study.tell(ft.number, state=TS.FAIL)
                continue
            bundles.setdefault(ft.user_attrs.get("bundle", ""), []).append(trial)
        for bdir, trials in bundles.items():
            handle = self.executor.reattach(Path(bdir)) if bdir else None
            if handle is None:
                for trial in trials:
                    self.fail_or_retry(trial, "its driver stopped", its_fault=False)
            else:
                self.running.append(Bundle(trials, handle.bundle_dir, handle, time.time()))

    # -- the loop -------------------------------------------------------------------------------
    def write_tables(self) -> None:  # while it runs: what `windtunnel confirm` (ConfirmDriver) writes differs
        write_tables(self.study, self.dir, driver_running=True)

    def write_report(self) -> list[Path]:
        return write_report(self.study, self.dir)

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self._lock.close()  # the next driver may start

    def _run(self) -> dict:
        self.recover()
        start, done_before = time.time(), self.finished()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.cfg.n_trials, initial=self.finished(), unit="trial", dynamic_ncols=True,
                       desc=self.cfg.name)
        last_write = 0.0
        try:
            while True:
                self.fill()
                if self.stop.requested:  # here, not inside an Optuna call: see StopRequest
                    raise KeyboardInterrupt
                told = len(self.tally.told)
                self.collect()
                if bar is not None and len(self.tally.told) != told:
                    bar.n = self.finished()
                    t = self.tally
                    bar.set_postfix_str(f"ok={t.ok} pruned={t.pruned} failed={t.failed} best={t.best:.4f}")
                if time.time() - last_write > 10:
                    self.write_tables()
                    last_write = time.time()
                if not self.running and not self.ready and self.remaining() <= 0 and not self.extend():
                    break
                time.sleep(0.05)
        except (KeyboardInterrupt, ExecutorGone, DiskFull, ConfigError) as e:  # trials left running: the next run re-runs them
            for b in self.running:
                b.handle.cancel()
            self.executor.close()
            if isinstance(e, DiskFull):  # nothing more can be written
                raise
            try:  # the tables and report say what finished (a second Ctrl-C skips them)
                files = self.write_report()
                if self.tracking is not None:
                    self.tracking.artifacts(files)
            finally:
                if self.tracking is not None:
                    self.tracking.finish("KILLED")
            raise
        finally:
            if bar is not None:
                bar.close()
        wall = time.time() - start
        stats = {"wall_s": wall, "slots": self.executor.slots, "trials": self.finished() - done_before,
                 "driver_wait_frac": self.waited / (wall * self.executor.slots) if wall > 0 else 0.0,
                 "train_frac": self.trained / (wall * self.executor.slots) if wall > 0 else 0.0,
                 "ask_frac": self.asking / wall if wall > 0 else 0.0,
                 "population": self.K, "sampler": self.cfg.sampler.type}
        self.study.set_user_attr("invocations", self.study.user_attrs.get("invocations", []) + [stats])
        files = self.write_report()
        if self.tracking is not None:
            self.tracking.artifacts(files)
            self.tracking.finish()
            left = self.tracking.close(timeout=20)
            if left:
                print(left, file=sys.stderr)
        self.executor.close()
        return {"dir": str(self.dir), "finished": self.finished(), "ok": self.tally.ok,
                "pruned": self.tally.pruned, "failed": self.tally.failed, "files": [str(f) for f in files], **stats}


def preflight(cfg: SweepConfig) -> data.Shards:
    """What `windtunnel trial` refuses (no CUDA for train.device=cuda or model.kernels=triton, a
    missing data.source), refused before anything is written, by the same functions, rather than
    failing every trial. Local executor only: Ray's and Slurm's workers run on other machines.
    Returns the data, prepared (and cached) once here instead of by the first workers."""
    trial = cfg.trial
    select_kernels(trial.model.kernels, resolve_device(trial.train.device))
    return data.load(trial.data)


def hold_driver_lock(sweep_dir: Path):
    """One driver per sweep: a second driver would take the first one's running trials for a dead
    driver's and fail or re-run them; it stops instead, naming the first (windtunnel.locks)."""
    try:
        return locks.hold(sweep_dir / "driver.lock")
    except locks.Held as e:
        raise ConfigError(f"{sweep_dir}: another driver is running this sweep ({e}); wait for it, "
                          "or stop it (Ctrl-C or SIGTERM; its trials resume with the next run)") from None


def run_sweep(cfg: SweepConfig, progress: bool = True, driver=Driver) -> dict:
    """Run the sweep with Ctrl-C and SIGTERM pointed at its driver's StopRequest; driver(cfg,
    progress, stop) makes it (windtunnel confirm's ConfirmDriver runs a fixed list of replicates)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        return driver(cfg, progress, stop).run()
    # before the driver opens the study: a signal while it writes there waits for the loop too
    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return driver(cfg, progress, stop).run()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
