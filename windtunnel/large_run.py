"""The large-run trainer: one model under torchrun with FSDP2, bf16 on GPU, WSD, resume.

    windtunnel train train.yaml [KEY=VALUE ...]        one process, or under torchrun

train.yaml (written by `windtunnel transfer`, windtunnel/export.py) is a TrialConfig plus a
`large_run` section (windtunnel/config/large_run.py); relative paths in it are the file's folder's.

- Process group, FSDP2 sharding and the evaluation every rank joins: windtunnel/distributed.py.
- The model is windtunnel.model.Transformer with K = 1; init, μP multipliers and AdamW groups
  (windtunnel/optim.py) follow windtunnel/parametrization.py, the rules the wind tunnel trained under.
- Batch: world × large_run.micro_batch × large_run.grad_accum sequences a step. Rank r's windows
  at step s come from a generator seeded with (data_seed, s, r), so a resumed run sees the batches
  the uninterrupted run would have (same world size), with no data state to save.
- Checkpoints (windtunnel/run_checkpoints.py) every train.checkpoint_every tokens, at the stable
  saves (train.save_at) and at the end; a launch resumes from `latest`, or from the newest intact
  one where checksums fail. SIGTERM or SIGINT on any rank saves at the end of the step on every
  rank and stops with one line; so does large_run.steps (a number of steps for this launch).
- Rank 0 appends one JSON line per step to <run_dir>/loss.jsonl and, when
  large_run.tracking_uri is set, tracks the run in MLflow without ever waiting for it
  (windtunnel/tracking/large_run.py: one run per run_dir, FINISHED only when training completed); it
  prints where that log is, then a progress line per evaluation (a minute apart at most), to stderr.
- check() finds in one plain process what a launch would refuse (launch.sh runs it first).
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from windtunnel import checkpoints, locks, memory, run_checkpoints
from windtunnel import data as data_mod
from windtunnel.config.large_run import LargeRunConfig, load_config, read
from windtunnel.config.trial import RELAUNCH_FREE, TrialConfig, settings
from windtunnel.distributed import evaluate, full_tensor, init_distributed, shard_model, wants_cuda
from windtunnel.errors import ConfigError
from windtunnel.files import append_line, check_folder, slug, write_text
from windtunnel.model import Transformer
from windtunnel.optim import param_groups
from windtunnel.schedule import lr_factor


def _taken(run_dir: Path, holder: str) -> ConfigError:
    return ConfigError(f"{run_dir}: another launch is training this run ({holder}); wait for it or stop it "
                       "(SIGTERM saves a checkpoint; the next launch resumes there)")


def check_stop(run: LargeRunConfig, step: int, run_dir: Path) -> None:
    """large_run.stop_after_steps is an absolute step: one the run has already reached would train
    nothing (it exited 0 having done nothing)."""
    if run.stop_after_steps and run.stop_after_steps <= step:
        raise ConfigError(f"large_run.stop_after_steps: an absolute step, and {run_dir} is already at step {step} "
                          f"(got {run.stop_after_steps}); large_run.steps=N trains N more steps, then saves")


def resolve_paths(cfg: TrialConfig, run: LargeRunConfig, base_dir: str | Path):
    """(cfg with data.source resolved, run_dir, checkpoint dir, init_from): relative paths are
    relative to base_dir, the folder holding train.yaml."""
    base = Path(base_dir)
    resolve = lambda p: p if Path(p).is_absolute() else str(base / p)  # noqa: E731
    run_dir = Path(resolve(run.run_dir or f"runs/{slug(run.run_name)}"))
    ckpt_dir = Path(resolve(cfg.train.checkpoint_dir or str(run_dir / "checkpoints")))
    src = cfg.data.source
    if src != "stdlib" and not Path(src).is_absolute() and (base / src).exists():
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=str(base / src)))
    return cfg, run_dir, ckpt_dir, resolve(cfg.train.init_from) if cfg.train.init_from else ""


# --------------------------------------------------------------------------- world size


def check_world(cfg: TrialConfig, run: LargeRunConfig, world: int, launched: bool) -> None:
    """train.batch_size = world × micro_batch × grad_accum. `launched`: under torchrun or launch.sh
    (else a plain `windtunnel train`, whose fix for a many-process export is launch.sh)."""
    per_rank = run.micro_batch * run.grad_accum
    if cfg.train.batch_size == world * per_rank:
        return
    made_for = cfg.train.batch_size // per_rank if cfg.train.batch_size % per_rank == 0 else 0
    if not launched and world == 1 and made_for > 1:
        fix = (f"this train.yaml is for {made_for} processes: run the launch.sh beside it "
               f"(torchrun --nproc_per_node {made_for}) or launch.sbatch")
    else:
        fix = "re-export for this GPU count"
    raise ConfigError(
        f"train.batch_size: must equal world size {world} × large_run.micro_batch {run.micro_batch} "
        f"× large_run.grad_accum {run.grad_accum} = {world * per_rank} (got {cfg.train.batch_size}; {fix})")


# --------------------------------------------------------------------------- the run


class LargeRun:
    def __init__(self, cfg: TrialConfig, run: LargeRunConfig, base_dir: str | Path = "."):
        self.run = run
        cfg, self.run_dir, self.ckpt_dir, self.init_from = resolve_paths(cfg, run, base_dir)
        self.cfg = cfg

        self.rank, self.world, self.device = init_distributed(cfg.train.device)
        check_world(cfg, run, self.world, launched="WORLD_SIZE" in os.environ)  # before the lock writes run_dir
        self._lock = self._hold_run_lock()
        T = cfg.model.seq_len
        # one rank prepares (and caches) the shards; the others then open them
        if self.rank != 0:
            dist.barrier()
        self.shards = data_mod.load(cfg.data)
        if self.rank == 0:
            dist.barrier()
        vocab = data_mod.model_vocab(cfg.model.vocab_size, cfg.data, self.shards.vocab_size)

        memory.check(cfg.model, vocab, run.micro_batch * T, self.device, world=self.world, fsdp=True,
                     what="this large run")  # before it is built: one line, not the OOM killer
        model = Transformer(cfg.model, vocab, population=1)
        roles = model.param_roles()
        # init is a pure function of (config, seed), drawn on the CPU: every rank builds the same
        # weights, then fully_shard keeps each rank's shard
        model.init_trial(0, cfg.model, torch.Generator().manual_seed(cfg.train.seed))
        model.to(self.device)
        shard_model(model, self.world, self.device)  # new DTensor parameters: build groups after this
        groups = param_groups(model, roles, cfg)
        self.base_lrs = [g["lr"] for g in groups]  # train_step sets each group's lr to base × schedule
        o = cfg.optim
        self.opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.model = model
        self.tokens_per_step = cfg.train.batch_size * T
        self.total_steps = math.ceil(cfg.train.tokens / self.tokens_per_step)
        self.ckpt_interval = max(1, round(cfg.train.checkpoint_every / self.tokens_per_step)) \
            if cfg.train.checkpoint_every else 0
        self.stable_steps = {math.ceil(t / self.tokens_per_step): t for t in cfg.train.save_at}
        every = cfg.train.eval_every or cfg.train.tokens // 10
        self.eval_interval = max(1, round(every / self.tokens_per_step))
        self.data_seed = cfg.train.data_seed if cfg.train.data_seed >= 0 else cfg.train.seed
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" \
            else torch.autocast("cpu", enabled=False)
        self.cfg = cfg
        self.step = 0
        self._saved_step = -1  # the step of the newest checkpoint written or loaded
        self._signal = 0  # the stop signal received, ranked as in _STOPS; 0 = none
        self._tracker = None

    def _hold_run_lock(self):
        """One launch per run: a second launch of the same run (a job submitted twice, launch.sh run
        in two shells) would delete the first one's checkpoint in progress and cut its loss log.
        Rank 0 holds <run_dir>/train.lock for the run's life (windtunnel.locks); when it is taken,
        every rank stops with the same one-line error, before anything is written."""
        lock, holder = None, ""
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                lock = locks.hold(self.run_dir / "train.lock")
            except locks.Held as e:
                holder = str(e)
        taken = torch.tensor([int(self.rank == 0 and lock is None)], device=self.device)
        dist.broadcast(taken, 0)
        if taken.item():
            raise _taken(self.run_dir, holder or "see rank 0")
        return lock

    # -- data -----------------------------------------------------------------------------------
    def batch(self, step: int) -> torch.Tensor:
        """(grad_accum, micro_batch, T + 1) windows of this rank at `step`: a pure function of
        (data_seed, step, rank)."""
        r = self.run
        rng = np.random.default_rng([self.data_seed, step, self.rank])
        w = self.shards.train_windows(rng, r.micro_batch * r.grad_accum, self.cfg.model.seq_len)
        return torch.from_numpy(w).view(r.grad_accum, r.micro_batch, -1)

    def evaluate(self) -> float:
        """Mean loss over train.eval_tokens' windows, the same windows at every world size."""
        val = torch.from_numpy(self.shards.eval_windows(self.cfg.train.eval_tokens, self.cfg.model.seq_len))
        return evaluate(self.model, val, self.run.micro_batch, self.device, self.autocast)

    # -- checkpoints (windtunnel/run_checkpoints.py) ---------------------------------------------
    def save(self, name: str) -> None:
        run_checkpoints.save(self.model, self.opt, self.ckpt_dir, name, step=self.step,
                             tokens=self.step * self.tokens_per_step, cfg=self.cfg, keep_last=self.run.keep_last)
        self._saved_step = self.step

    def load(self, path: Path, resuming: bool) -> int:
        """Load a checkpoint: the run's own `latest` (resuming) or train.init_from's; its step."""
        run_checkpoints.check_checkpoint(path, self.cfg, self.run_dir, resuming)
        where = "train.checkpoint_dir" if resuming else "train.init_from"
        self._saved_step = run_checkpoints.load(self.model, self.opt, path, where)
        return self._saved_step

    def latest(self) -> Path | None:
        return run_checkpoints.latest(self.ckpt_dir)

    # -- logging (rank 0) -------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        append_line(self.run_dir / "loss.jsonl", json.dumps(record))
        if self._tracker is not None:
            self._tracker.log_record(record)

    def _open_logs(self, start: int, resumed_from: str | None) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = self.run_dir / "loss.jsonl"
        if log.exists():  # drop what the interrupted launch logged after its checkpoint
            keep = [line for line in log.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start]
            write_text(log, "".join(line + "\n" for line in keep))
        if self.run.tracking_uri:
            from windtunnel.tracking.large_run import RunTracker

            self._tracker = RunTracker.for_run(self.cfg, self.run, self.run_dir, self.world, self.device)
        self._log({"event": "start", "step": start, "resumed_from": resumed_from, "world": self.world,
                   "device": self.device.type, "total_steps": self.total_steps,
                   "data": data_mod.identity(self.shards.manifest)})

    # -- the loop -------------------------------------------------------------------------------
    def train_step(self) -> dict:
        factor = lr_factor(self.cfg.schedule, self.step, self.total_steps)
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * factor
        windows = self.batch(self.step)
        loss_sum = torch.zeros((), device=self.device)
        for w in windows:
            w = w.to(self.device, non_blocking=True)[None]  # (1, micro, T + 1): K = 1
            with self.autocast:
                loss = self.model(w[..., :-1], w[..., 1:])[0]
            (loss / self.run.grad_accum).backward()
            loss_sum += loss.detach().float()
        clip = self.cfg.optim.grad_clip or float("inf")
        norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dist.all_reduce(loss_sum)
        self.step += 1
        return {"step": self.step, "tokens": self.step * self.tokens_per_step,
                "loss": loss_sum.item() / (self.run.grad_accum * self.world),
                "lr": self.cfg.optim.lr * factor, "grad_norm": float(norm)}

    def _stop_requested(self) -> int:
        """The stop signal any rank received (SIGINT wins over SIGTERM), 0 if none: every rank
        stops at the same step, whichever of them the signal reached."""
        flag = torch.tensor([float(self._signal)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return _STOPS[int(flag.item()) - 1] if flag.item() else 0

    def train(self) -> dict:
        if self.rank == 0:
            run_checkpoints.clear_partial(self.ckpt_dir)
        resumed_from = None
        latest = self.latest()
        if latest is not None:
            latest = checkpoints.dcp_verified(latest, "train.checkpoint_dir", self.rank, self.world)
            self.step, resumed_from = self.load(latest, resuming=True), latest.name
        elif self.init_from:
            checkpoints.dcp_verified(Path(self.init_from), "train.init_from", self.rank, self.world, fallback=False)
            self.step, resumed_from = self.load(Path(self.init_from), resuming=False), str(self.init_from)
        start = self.step
        check_stop(self.run, start, self.run_dir)
        self._open_logs(start, resumed_from)
        self._say(f"{self.run.run_name}: {'resuming at step ' + str(start) + ' of' if start else 'training'} "
                  f"{self.total_steps:,} steps of {self.tokens_per_step:,} tokens on {self.world} "
                  f"{self.device.type} process{'es' if self.world > 1 else ''}; loss log {_q(self.run_dir / 'loss.jsonl')}")
        previous = {s: signal.signal(s, self._on_signal) for s in _STOPS} if self._main_thread() else {}
        t0, last, stopped = time.perf_counter(), {}, None
        said = t0
        status = "FAILED"  # MLflow's status, unless the loop ends: completed, or stopped
        try:
            while self.step < self.total_steps:
                if self.run.stop_after_steps and self.step >= self.run.stop_after_steps:
                    break
                last = self.train_step()
                last["seconds"] = time.perf_counter() - t0
                last["world"] = self.world
                if self.device.type == "cuda":
                    last["max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                if not math.isfinite(last["loss"]):
                    self._log({**last, "event": "diverged"})
                    raise RuntimeError(f"loss {last['loss']} at step {self.step}: stopping (diverged)")
                self._log(last)
                val = None
                if self.step % self.eval_interval == 0 or self.step == self.total_steps:
                    val = self.evaluate()
                    self._log({"step": self.step, "tokens": last["tokens"], "val_loss": val})
                if val is not None or time.perf_counter() - said >= 60:  # a line per eval, at least a minute apart otherwise
                    self._progress(last, val, start)
                    said = time.perf_counter()
                if self.step in self.stable_steps:
                    self.save(f"stable-{self.stable_steps[self.step]}")
                elif self.step == self.total_steps or (self.ckpt_interval and self.step % self.ckpt_interval == 0):
                    self.save(f"step-{self.step:09d}")
                sig = self._stop_requested()
                if sig or (self.run.steps and self.step - start >= self.run.steps and self.step < self.total_steps):
                    stopped = signal.Signals(sig).name if sig else "steps"
                    if self._saved_step != self.step:
                        self.save(f"step-{self.step:09d}")
                    self._log({"event": stopped.lower(), "step": self.step})
                    self._say(f"{self._stopped_by(stopped)} at step {self.step:,} of {self.total_steps:,}: saved "
                              f"{_q(self.ckpt_dir / self.latest().name)}; the same launch again resumes there")
                    break
            done = self.step >= self.total_steps
            if done:
                self._log({"event": "done", "step": self.step})
            status = "FINISHED" if done else "KILLED"  # a signal or stop_after_steps ended it early
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            left = self._tracker.close(status) if self._tracker is not None else None
            if left:
                self._say(left)
        return {"start_step": start, "step": self.step, "total_steps": self.total_steps, "done": done,
                "loss": last.get("loss"), "resumed_from": resumed_from, "stopped": stopped,
                "tracking_s": self._tracker.seconds if self._tracker is not None else 0.0}

    def _say(self, line: str) -> None:
        """Rank 0's progress, to stderr (stdout carries the final JSON result)."""
        if self.rank == 0:
            print(f"windtunnel train: {line}", file=sys.stderr, flush=True)

    def _progress(self, last: dict, val: float | None, start: int) -> None:
        rate = (self.step - start) * self.tokens_per_step / max(last["seconds"], 1e-9)
        eta = (self.total_steps - self.step) * self.tokens_per_step / max(rate, 1e-9)
        self._say(f"step {self.step:,}/{self.total_steps:,} tokens {last['tokens']:,} loss {last['loss']:.4f}"
                  + (f" val_loss {val:.4f}" if val is not None else "")
                  + f" {rate:,.0f} tokens/s ETA {datetime.timedelta(seconds=round(eta))}")

    def _stopped_by(self, stopped: str) -> str:
        return f"large_run.steps={self.run.steps} done" if stopped == "steps" else f"stopped by {stopped}"

    def _on_signal(self, signum, frame) -> None:
        # a flag the loop reads at the end of the step: a KeyboardInterrupt mid-step lost every
        # step since the last checkpoint. Repeats are no-ops (Ctrl-C reaches each rank from the
        # terminal and again from launch.sh); SIGINT outranks SIGTERM.
        self._signal = max(self._signal, _STOPS.index(signum) + 1)

    @staticmethod
    def _main_thread() -> bool:
        import threading

        return threading.current_thread() is threading.main_thread()


# The signals that stop a run with a save, in rank order: any rank's SIGINT makes the run's exit 130.
_STOPS = (signal.SIGTERM, signal.SIGINT)


def _q(path) -> str:
    """A path as a shell reads it back (printed for a person to paste)."""
    return shlex.quote(str(path))


def _load(config: str | Path, overrides: list[str] = ()) -> tuple[TrialConfig, LargeRunConfig]:
    d = read(config, overrides)
    try:
        return load_config(d)
    except ConfigError as e:
        raise _blame_the_override(e, config, overrides) from None


def _blame_the_override(e: ConfigError, config, overrides) -> ConfigError:
    """An override that breaks a rule with another field of the file (train.tokens below the file's
    train.save_at) was reported as that field's fault, which the user never touched."""
    field = str(e).split(":", 1)[0]
    keys = [o.partition("=")[0] for o in overrides]
    if field in keys or not keys:
        return e
    try:
        cfg, run = _load(config)
    except ConfigError:
        return e  # the file is wrong by itself
    ours = [o for o in overrides if o.partition("=")[0].split(".")[0] == field.split(".")[0]] or overrides
    key = ours[0].partition("=")[0]
    _, run_dir, ckpt_dir, _ = resolve_paths(cfg, run, Path(config).resolve().parent)
    latest = ckpt_dir / "latest"
    if latest.is_file() and key not in RELAUNCH_FREE and key in settings(cfg):  # what resuming would refuse anyway
        return ConfigError(f"{key}: {run_dir} was trained with {key} {settings(cfg)[key]}; set it back to resume it, "
                           f"or branch on purpose: a new run_dir with "
                           f"{_q(f'train.init_from={ckpt_dir / latest.read_text().strip()}')} (got {ours[0]})")
    return ConfigError(f"{key}: {ours[0]} conflicts with {field} in {config} ({e}); change "
                       f"{field} with it, or leave {key} as it is")


def check(config: str | Path, overrides: list[str] = (), world: int | None = None) -> None:
    """What a launch of CONFIG would refuse, found in one process, with no process group and
    nothing written: launch.sh runs it before torchrun, so a bad config or override is one line
    and exit 2, not one line per rank under torchrun's traceback. world: the launch's process
    count (None: not checked)."""
    cfg, run = _load(config, overrides)
    cfg, run_dir, ckpt_dir, init_from = resolve_paths(cfg, run, Path(config).resolve().parent)
    wants_cuda(cfg.train.device)
    if world is not None:
        check_world(cfg, run, world, launched=True)
    src = cfg.data.source
    if src != "stdlib":
        path = Path(src).expanduser()
        if not path.exists():  # e.g. a results/ best.yaml's shard folder on its authors' machine
            raise ConfigError(f"data.source: {src} does not exist on this machine (allowed: stdlib, a text file "
                              "or folder, a shard folder of `windtunnel data prepare`; e.g. data.source=stdlib)")
    data_mod.model_vocab(cfg.model.vocab_size, cfg.data, data_mod.data_vocab(cfg.data))
    check_folder("large_run.run_dir", run_dir)  # a file in the way: the OS's 'Not a directory', exit 1
    check_folder("train.checkpoint_dir", ckpt_dir)
    try:
        locks.probe(run_dir / "train.lock")
    except locks.Held as e:
        raise _taken(run_dir, str(e)) from None
    latest = run_checkpoints.resumable(ckpt_dir)
    if latest is not None:
        run_checkpoints.check_checkpoint(latest, cfg, run_dir, resuming=True)
        check_stop(run, int(run_checkpoints.meta(latest)["step"]), run_dir)
    elif init_from:
        run_checkpoints.check_checkpoint(Path(init_from), cfg, run_dir, resuming=False)


def main(config: str | Path, overrides: list[str] = ()) -> dict:
    """Load CONFIG (+ dotted KEY=VALUE overrides), train, tear the process group down."""
    cfg, run = _load(config, overrides)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN and LargeRun._main_thread():
        # launch.sh starts torchrun with SIGINT ignored (so torchrun leaves Ctrl-C to the ranks),
        # and its ranks inherit that: until train() takes SIGINT over, Ctrl-C interrupts as usual
        signal.signal(signal.SIGINT, signal.default_int_handler)
    trainer = None
    try:
        trainer = LargeRun(cfg, run, Path(config).resolve().parent)
        result = trainer.train()
        dist.barrier()  # no rank tears its gloo/nccl pairs down while another still uses them
        return result
    finally:
        # The model's FSDP mesh holds the process group: free it first, so that destroying the
        # group joins gloo's threads now. Left to interpreter exit, a gloo thread still releasing
        # the last collective's tensors wanted the GIL from a finalizing Python and aborted a
        # finished run (SIGABRT, "terminate called without an active exception": 3 of 12 resumed
        # CPU runs on 2 busy cores, each reported failed by torchrun).
        del trainer
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
