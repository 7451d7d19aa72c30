"""`windtunnel train CONFIG [SECTION.KEY=VALUE ...]`: the large-run trainer (windtunnel/large_run.py).

Run it under torchrun, one process per GPU the export was made for (the exported launch.sh and
launch.sbatch do; a 1-GPU export also runs as one plain process). CONFIG is
the train.yaml that `windtunnel transfer` writes; a relaunch resumes from the latest checkpoint.
Relative paths in it (large_run.run_dir, default runs/RUN_NAME; train.checkpoint_dir, default
RUN_DIR/checkpoints) are read from the folder holding CONFIG; rank 0 logs RUN_DIR/loss.jsonl.
"""
from __future__ import annotations

import json
import os

from windtunnel.errors import ConfigError


def add_arguments(p) -> None:
    import argparse

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("config", metavar="CONFIG", help="train.yaml (a TrialConfig + a large_run section)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="e.g. large_run.steps=100 (train 100 more steps, save, stop) train.eval_every=1000000 (a relaunch may change "
                        "only how the run is carried out: device, checkpoints, evaluation, save points)")
    p.add_argument("--check", action="store_true",
                   help="only check CONFIG and the overrides as a launch would, in this one process (no "
                        "training, nothing written); silent and exit 0 when the launch would start. "
                        "launch.sh and launch.sbatch run it before torchrun")
    p.add_argument("--world", type=int, metavar="N", help="with --check: the launch's process count (nodes × GPUs)")


def run(args) -> int:
    from windtunnel.large_run import check, main

    if args.world is not None and args.world < 1:
        raise ConfigError(f"--world: must be >= 1, the launch's process count (got {args.world})")
    if args.check:
        check(args.config, args.overrides, args.world)
        return 0
    if args.world is not None:  # a launch's world is torchrun's to say
        raise ConfigError("--world: only with --check (a launch takes its world size from torchrun)")
    result = main(args.config, args.overrides)
    if int(os.environ.get("RANK", 0)) == 0:  # the process group is gone by now: torchrun's env
        print(json.dumps(result))
    # Ctrl-C's exit status, saved or not; under torchrun the rank exits 0 (torchrun reports a
    # rank's 130 as a failure with a traceback) and launch.sh exits 130 itself
    return 130 if result.get("stopped") == "SIGINT" and "TORCHELASTIC_RUN_ID" not in os.environ else 0
