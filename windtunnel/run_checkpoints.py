"""A large run's checkpoints (torch.distributed.checkpoint): the folder train.checkpoint_dir holds.

    step-000000120/    every train.checkpoint_every tokens, at a stop and at the end (keep_last kept)
    stable-<tokens>/   the last stable states (train.save_at), to branch decays from; always kept
    latest             a file naming the newest; replaced atomically after it is complete
    each checkpoint:   the ranks' shards, DCP's .metadata, meta.json (step, tokens, world, time, config)
                       and the SHA-256 of every file (checkpoints.MANIFEST: dcp_seal, dcp_verified)

Each rank writes its shards (resharding on load, so a resume may change the world size) into
`.NAME.tmp`, which rank 0 renames once meta.json is in it. What a launch may load: its own latest
if it trains with the settings it was trained with (resume_changes), or another run's checkpoint
(train.init_from) holding the same model and the same step (a branch).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from windtunnel import checkpoints
from windtunnel.config.trial import TrialConfig, changed_settings, relaunch_changes, settings, to_dict
from windtunnel.errors import ConfigError
from windtunnel.files import write_json, write_text

LATEST, META = "latest", "meta.json"


def latest(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint `latest` names; None when the run has none yet."""
    f = Path(ckpt_dir) / LATEST
    name = f.read_text().strip() if f.is_file() else ""
    return Path(ckpt_dir) / name if name else None


def resumable(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names, as large_run.check sees it: None where its meta.json
    is damaged, since the launch's ranks find that by its checksum and fall back (checkpoints.dcp_verified)."""
    path = latest(ckpt_dir)
    if path is not None and (path / META).is_file() and checkpoints.dcp_step(path) is None:
        return None
    return path


def meta(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / META).read_text())


def by_step(ckpt_dir: Path) -> dict[int, Path]:
    """Every complete checkpoint in ckpt_dir by its step (the first in name order where two share one);
    not those moved aside as damaged (checkpoints.DAMAGED)."""
    out = {}
    for d in sorted(Path(ckpt_dir).iterdir()):
        if not d.name.startswith((".", checkpoints.DAMAGED)) and (d / META).is_file():
            out.setdefault(int(meta(d)["step"]), d)
    return out


def resume_changes(checkpoint: Path, cfg: TrialConfig) -> list[str]:
    """What cfg changes of the settings a run's checkpoint was trained with (config.relaunch_changes)."""
    return relaunch_changes(meta(checkpoint)["config"], cfg)


def _branch_fixed(key: str) -> bool:
    """What a branch (train.init_from) keeps of its checkpoint's settings: the model, and what a step is."""
    return (key.startswith("model.") and key != "model.kernels") or key == "train.batch_size"


def check_checkpoint(path: Path, cfg: TrialConfig, run_dir: Path, resuming: bool) -> None:
    """ConfigError when cfg may not load the checkpoint at path: the run's own `latest` (resuming)
    or train.init_from's (a branch)."""
    if not (path / META).is_file():
        raise ConfigError(f"train.init_from: {path} is not a checkpoint of `windtunnel train` (no meta.json)")
    if resuming:  # the same run goes on: it must be trained as it was
        changed = resume_changes(path, cfg)
        if changed:
            branch = (f"or branch on purpose: a new run_dir with {shlex.quote(f'train.init_from={path}')}"
                      if not any(_branch_fixed(c.split()[0]) for c in changed) else "or export a new run")
            raise ConfigError(f"{changed[0].split()[0]}: {run_dir} was trained with other settings "
                              f"({'; '.join(changed)}); set them back to resume it, {branch}")
    else:  # a branch may change the schedule or the budget, not the model or what a step is
        before, now = settings(meta(path)["config"]), settings(cfg)
        changed = changed_settings(before, now, [k for k in now if _branch_fixed(k)])
        if changed:
            raise ConfigError(f"train.init_from: {path} holds another model or batch ({'; '.join(changed)})")


def clear_partial(ckpt_dir: Path) -> None:
    """Remove the saves a killed launch left half-written (`latest` never named them)."""
    for tmp in Path(ckpt_dir).glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def _state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def save(model, opt, ckpt_dir: Path, name: str, *, step: int, tokens: int, cfg: TrialConfig, keep_last: int) -> None:
    """Every rank writes its shards of the model and optimizer to ckpt_dir/name; rank 0 then
    renames it into place (sealed with the files' checksums: checkpoints.dcp_seal), points `latest`
    at it and drops step-* checkpoints past keep_last but the one `latest` named before."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    final, tmp = ckpt_dir / name, ckpt_dir / f".{name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    try:
        dcp.save(_state(model, opt), checkpoint_id=str(tmp))
    except dcp.api.CheckpointException as e:  # Ctrl-C mid-save arrives wrapped: let it read as one
        if any(isinstance(exc, KeyboardInterrupt) for exc, _ in e.failures.values()):
            raise KeyboardInterrupt from None
        raise
    dist.barrier()
    sums = checkpoints.dcp_hash(tmp, rank, dist.get_world_size())  # each rank a share of the files
    if rank == 0:
        write_json(tmp / META, {"step": step, "tokens": tokens, "world": dist.get_world_size(),
                                "time": time.time(), "config": to_dict(cfg)})
        checkpoints.dcp_seal(tmp, sums)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        before = latest(ckpt_dir)  # kept whatever keep_last says: the fallback if `name` is damaged
        write_text(ckpt_dir / LATEST, name + "\n")
        steps = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
        for old in steps[:-keep_last]:
            if old.name != name and old != before:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(model, opt, path: Path, where: str) -> int:
    """Load the checkpoint at path into model and opt (by allow-list: checkpoints.dcp_load); its step."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, opt)
    checkpoints.dcp_load(state, path, where)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(meta(path)["step"])
