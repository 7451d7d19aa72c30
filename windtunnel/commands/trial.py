"""`windtunnel trial [KEY=VALUE ...]`: train one trial and print its result."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from windtunnel.commands import stdout_may_close
from windtunnel.errors import ConfigError


def add_arguments(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides of conf/config.yaml, e.g. optim.lr=0.02 model.d_model=128")
    p.add_argument("--config", metavar="FILE", help="a resolved trial config (e.g. a sweep's best.yaml)")
    p.add_argument("--json", action="store_true", help="print the whole result (with the loss curve) as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from windtunnel.config.hydra import trial_config
    from windtunnel.trainer import train_trial

    if args.config:
        path = Path(args.config)
        if path.is_dir():
            hint = f" (e.g. {path / 'best.yaml'})" if (path / "best.yaml").is_file() else ""
            raise ConfigError(f"--config: {path} is a folder; a trial config file is needed{hint}")
        if not path.is_file():
            raise ConfigError(f"--config: {path}: no such file (allowed: a trial config file, e.g. a sweep's best.yaml)")
    cfg = trial_config(args.overrides, args.config)
    if cfg.train.save_at and not cfg.train.checkpoint_dir:  # the trainer saves them there, else nowhere
        raise ConfigError(f"train.save_at: needs train.checkpoint_dir=DIR, the folder its states are saved in "
                          f"(got save_at {cfg.train.save_at} and no checkpoint_dir)")
    if args.config:
        _as_trained(args.config, cfg)
    result = train_trial(cfg, progress=not (args.quiet or args.json))
    with stdout_may_close():
        if args.json:
            print(json.dumps(result.to_dict(), indent=1))
        else:
            loss = "n/a" if result.final_val_loss is None else f"{result.final_val_loss:.4f}"
            print(f"status={result.status} val_loss={loss} tokens={result.tokens} params={result.params} "
                  f"tokens/s={result.tokens_per_s:,.0f} seconds={result.seconds:.1f}"
                  + (f" reason={result.reason!r}" if result.reason else ""))
    return 0 if result.status == "ok" else 1


def _as_trained(config_file: str, cfg) -> None:
    """A sweep's best.yaml says how its trial was trained: on a CPU with the same thread count
    (unless OMP_NUM_THREADS says otherwise) the loss comes back bit for bit; trained in a
    population of several, it comes back within float noise (the stacked sums run in another order)."""
    import torch

    from windtunnel.config.overrides import load_yaml
    from windtunnel.data import identity, identity_changes, load
    from windtunnel.trainer import resolve_device

    how = load_yaml(config_file).get("trained_with") or {}
    cpu_both = str(how.get("device", "")).startswith("cpu") and resolve_device(cfg.train.device).type == "cpu"
    if how.get("threads") and cpu_both and "OMP_NUM_THREADS" not in os.environ:  # a GPU worker's threads mean nothing here
        torch.set_num_threads(int(how["threads"]))
        print(f"windtunnel trial: {how['threads']} CPU thread(s), as the sweep trained it "
              "(OMP_NUM_THREADS=N sets another count)", file=sys.stderr)
    if int(how.get("population") or 1) > 1:
        print(f"windtunnel trial: the sweep trained this trial in a population of {how['population']}: "
              "its loss comes back within float noise, not bit for bit", file=sys.stderr)
    changed = identity_changes(how.get("data") or {}, identity(load(cfg.data).manifest))
    if changed:
        print(f"windtunnel trial: data.source {cfg.data.source} holds other tokens than the sweep trained this "
              f"trial on ({'; '.join(changed)}): its loss will not come back", file=sys.stderr)
