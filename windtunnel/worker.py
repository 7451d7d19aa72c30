"""A stateless worker: train one bundle of trials and return each trial's result.

Every executor runs the same function, `run_bundle(payload)`: the local executor in a fresh
process (`python -m windtunnel.worker BUNDLE_DIR`), Ray as a task, Slurm as a submitit job.
The payload holds each trial's full resolved config; the worker reads nothing else but the
data, reports validation losses to the study's storage so the pruner sees them, and writes
resumable checkpoints into the bundle folder so a requeued job continues where it stopped.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import traceback
from pathlib import Path

from windtunnel.files import write_json

PAYLOAD, RESULT = "payload.json", "result.json"


def _pruning_callback(payload: dict):
    """on_eval for the trainer: report to the study, ask the pruner. None when not pruning."""
    if not payload.get("storage") or payload.get("pruner", {}).get("type", "none") == "none":
        return None
    import optuna

    from windtunnel.search import make_pruner, open_storage
    from windtunnel.config.sweep import PrunerConfig

    study = optuna.load_study(study_name=payload["study"], storage=open_storage(payload["storage"]),
                              pruner=make_pruner(PrunerConfig(**payload["pruner"])))
    trials = [optuna.trial.Trial(study, t["trial_id"]) for t in payload["trials"]]

    def on_eval(k: int, tokens: int, val_loss: float) -> bool:
        trials[k].report(val_loss, step=tokens)
        return trials[k].should_prune()

    return on_eval


def run_bundle(payload: dict) -> list[dict]:
    """Train the payload's trials as one population; one result dict per trial, in order."""
    import torch

    from windtunnel import data
    from windtunnel.config.trial import trial_from_dict, with_overrides
    from windtunnel.provenance import provenance
    from windtunnel.trainer import Population, resolve_device, train_branches

    if payload.get("threads"):
        torch.set_num_threads(int(payload["threads"]))
    ckpt = {}
    if payload.get("bundle_dir"):
        ckpt = {"train.checkpoint_dir": str(Path(payload["bundle_dir"]) / "ckpt"),
                "train.checkpoint_every": int(payload.get("checkpoint_every", 0))}
    cfgs = [with_overrides(trial_from_dict(t["config"]), ckpt) for t in payload["trials"]]
    resumed = _resumed_from(Path(payload["bundle_dir"]) / "ckpt" / "latest.pt") if payload.get("bundle_dir") else None
    on_eval = _pruning_callback(payload)
    stacked = len(cfgs)
    if any(c.train.branch_at for c in cfgs):  # WSD branches run one trial at a time
        stacked = 1
        results = [train_branches(with_overrides(c, {"train.checkpoint_dir": f"{c.train.checkpoint_dir}/{i}"}))
                   for i, c in enumerate(cfgs)]
        device = resolve_device(cfgs[0].train.device)
    else:
        pop = Population(cfgs)
        results, device = pop.run(on_eval=on_eval), pop.device
        pop.release()
    # what the loss depends on beyond the config: a CPU's thread count and the stack's size set
    # the order of float sums (`windtunnel trial --config best.yaml` reads them back)
    # and which tokens it trained on: the driver refuses a study resumed over other data (check_data)
    prov = {**provenance(device), "threads": torch.get_num_threads(), "population": stacked,
            "data": data.identity(data.load(cfgs[0].data).manifest)}
    extra = {"resumed_from_step": resumed} if resumed is not None else {}
    return [{"number": t["number"], **r.to_dict(), "provenance": prov, **extra}
            for t, r in zip(payload["trials"], results)]


def _resumed_from(latest: Path) -> int | None:
    """The step of the checkpoint a requeued job resumes from (the trainer loads it); logged."""
    from windtunnel.checkpoints import previous

    if not latest.exists():
        if not previous(latest).exists():
            return None
        latest = previous(latest)
    from windtunnel import checkpoints

    step = int(checkpoints.load_verified(latest, "train.checkpoint_dir")["step"])
    print(f"windtunnel.worker: resumed from step {step} ({latest})", flush=True)
    return step


def standby(bundles: str) -> int:
    """Load what a bundle needs (torch, the trainer, CUDA), then wait on stdin for the folder
    of the bundle to run; EOF (the sweep ended first) exits. The local executor starts this
    while the previous bundle trains."""
    import time

    t0 = time.perf_counter()
    import torch

    import optuna  # noqa: F401  (the pruner's study)

    import windtunnel.trainer  # noqa: F401  (the model, kernels and data modules with it)
    if torch.cuda.is_available():
        torch.cuda.init()
    ready = time.perf_counter() - t0
    line = sys.stdin.readline().strip()
    if not line:
        return 0
    log = os.open(Path(line) / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for fd in (1, 2):  # from here on the bundle's own log
        os.dup2(log, fd)
    os.close(log)
    print(f"windtunnel.worker: started ahead (ready after {ready:.1f} s, in {bundles})", flush=True)
    return main(line)


def main(bundle_dir: str) -> int:
    d = Path(bundle_dir)
    payload = json.loads((d / PAYLOAD).read_text())
    try:
        out = {"ok": True, "results": run_bundle(payload)}
    except Exception as e:  # the driver records the reason; the sweep goes on
        traceback.print_exc()
        out = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # the driver stops, the trials wait
            out["disk_full"] = e.filename or str(d)
    _free_device_memory()
    write_json(d / RESULT, out, indent=None)  # the bundle's end: the local executor gives the slot away now
    return 0


def _free_device_memory() -> None:
    """Hand the GPU memory back before the result is written: the next bundle may start on this
    GPU while this process is still exiting."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        import gc

        gc.collect()  # the population's tensors and CUDA graphs, should a cycle hold them
        # cuBLAS keeps a workspace per stream it ran on (32 MiB each on Hopper), and each graph capture
        # runs on a new side stream: an H100 test kept 6 of them (192 MiB) after one released population
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()
        held = torch.cuda.memory_reserved()
        if held > 2**30:  # the next bundle's memory check waits for it (executors/local.py); say so in the log
            print(f"windtunnel.worker: {held / 2**30:.1f} GiB still reserved after the bundle", flush=True)


if __name__ == "__main__":
    sys.exit(standby(sys.argv[2]) if sys.argv[1] == "--standby" else main(sys.argv[1]))
