"""`windtunnel transfer RESULTS_DIR/SWEEP|BEST.yaml --target TARGET [KEY=VALUE ...] --out DIR`

Rescales the sweep's winner to the target shape (windtunnel/transfer.py) and writes train.yaml,
launch.sh, launch.sbatch, config.json and transfer.md into DIR (windtunnel/export.py).

Batch size (tokens per step): --batch-size N, or --batch-size-law FILE.json at the target's
loss (--loss L, or L(N, D) from --scaling-law FILE.json). Token budget: --tokens N, or
--tokens-per-param R × N, or the scaling law's tokens per parameter. A given value always wins.
lr: the winner's, × (D / proxy tokens)^-b with --horizon-law FILE.json (`windtunnel fit horizon
--json`), × the depth sweep's drift with --depth-law FILE.json (`windtunnel fit lr-transfer --json`
on sweeps/lr_depth.yaml); transfer.md gives the proxy lr and its width, depth and horizon factors as rows.
KEY=VALUE set target fields: nodes=4 gpus_per_node=8 gpu_memory_gb=80 run_name=... (see
conf/target/*.yaml and windtunnel.config.target.Target).
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path



def add_arguments(p: argparse.ArgumentParser) -> None:
    from windtunnel.config.target import target_names

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("source", metavar="RESULTS_DIR/SWEEP|BEST.yaml", help="a sweep's results folder or its best.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="target fields, e.g. nodes=4 run_name=r1")
    p.add_argument("--target", required=True, metavar="TARGET",
                   help=f"a name in conf/target/ ({', '.join(target_names())}) or a YAML path")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the exported files")
    p.add_argument("--batch-size", type=int, metavar="TOKENS", help="tokens per step (beats the law)")
    p.add_argument("--batch-size-law", metavar="FILE.json", help="`windtunnel fit batch-size --json` output")
    p.add_argument("--loss", type=float, metavar="L", help="the target's loss for the batch-size law (beats the scaling law)")
    p.add_argument("--scaling-law", metavar="FILE.json", help="`windtunnel fit scaling-law|wsd --json` output")
    p.add_argument("--tokens", type=int, metavar="N", help="token budget (beats tokens per parameter)")
    p.add_argument("--tokens-per-param", type=float, metavar="R", help="token budget = R × parameters")
    p.add_argument("--depth-law", metavar="FILE.json",
                   help="`windtunnel fit lr-transfer --json` on a depth sweep: lr × 2^(drift per doubling × "
                        "log2(target layers / proxy layers)) (default: off)")
    p.add_argument("--horizon-law", metavar="FILE.json",
                   help="`windtunnel fit horizon --json` output: lr × (D / proxy tokens)^-b (default: off)")
    p.add_argument("--lr-batch-scaling", default="none", metavar="none|sqrt|BETA|FILE.json",
                   help="none: keep μP's lr (MiniCPM, default); sqrt: × sqrt(batch / proxy batch) (PanGu-π Pro); "
                        "BETA in [0, 1]: × (batch / proxy batch)^BETA; FILE.json: BETA measured, with its interval "
                        "(`windtunnel fit lr-transfer --json` over lr sweeps at two batch sizes: docs/laws.md)")


def run(args) -> int:
    from windtunnel import export, transfer
    from windtunnel.config.target import load_target

    winner = transfer.load_winner(args.source)
    target = load_target(args.target, args.overrides)
    laws = transfer.Laws(
        batch_size=args.batch_size,
        batch_size_law=transfer.load_law(args.batch_size_law, "batch-size") if args.batch_size_law else None,
        loss=args.loss,
        scaling_law=transfer.load_law(args.scaling_law, "scaling-law") if args.scaling_law else None,
        tokens=args.tokens, tokens_per_param=args.tokens_per_param, lr_batch_scaling=args.lr_batch_scaling,
        horizon_law=transfer.load_law(args.horizon_law, "horizon") if args.horizon_law else None,
        depth_law=transfer.load_depth_law(args.depth_law) if args.depth_law else None)
    plan = transfer.plan(winner, target, laws)
    src = plan.trial.data.source
    # best.yaml names the data its sweep read, e.g. a shard folder on its authors' machine; a relative
    # path is read from --out first, as `windtunnel train` does
    if src != "stdlib" and not Path(src).expanduser().exists() and not (Path(args.out) / src).exists():
        plan.warnings.append(f"data.source {src} does not exist on this machine, so the run will stop at its "
                             "start: give the large run's data with the override data_source=PATH (a shard folder "
                             "of `windtunnel data prepare`, a text file or folder) or data_source=stdlib")
    inputs = {"source": args.source, "target": args.target, "overrides": " ".join(args.overrides) or None,
              "--batch-size": args.batch_size, "--batch-size-law": args.batch_size_law, "--loss": args.loss,
              "--scaling-law": args.scaling_law, "--tokens": args.tokens,
              "--tokens-per-param": args.tokens_per_param, "--lr-batch-scaling": args.lr_batch_scaling,
              "--horizon-law": args.horizon_law, "--depth-law": args.depth_law}
    paths = export.export(plan, args.out, inputs)
    lr = plan.large_run
    print(f"{lr['run_name']}: N={plan.value('N (parameters)'):,} tokens={plan.trial.train.tokens:,} "
          f"batch={plan.value('batch size (tokens)'):,} tokens ({plan.trial.train.batch_size} seq = "
          f"{plan.value('GPUs (world size)')} GPUs × {lr['micro_batch']} × {lr['grad_accum']}) "
          f"steps={plan.value('total steps'):,} lr={transfer.fmt(plan.trial.optim.lr)} "
          f"time≈{transfer.duration(plan.value('estimated hours'))}")
    for w in plan.warnings:
        print(f"warning: {w}")
    print("wrote " + ", ".join(shlex.quote(str(p)) for p in paths))
    print(f"launch: {shlex.quote(str(Path(args.out) / 'launch.sh'))}   (Ctrl-C saves and stops it; "
          "the same command again resumes)")
    return 0
