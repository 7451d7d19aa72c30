"""Export a transfer plan (windtunnel/transfer.py) as launchable files:

    train.yaml     what `windtunnel train` takes: the target's TrialConfig + a `large_run` section
    launch.sh      torchrun on one node (run it on each node for several; env NNODES, NODE_RANK...)
    launch.sbatch  Slurm: nodes, GPUs (a cpu target: CPUs), time; srun starts one torchrun per node
    config.json    the Hugging Face Llama config `windtunnel export-hf` gives the trained run
    transfer.md    every number with its formula and source

Every value placed in a script is shell-quoted (shlex.quote) or, on `#SBATCH` lines (which no
shell reads), restricted to [A-Za-z0-9._:-]. Every file is written to a temp file and renamed,
and all of them are rendered before the first is written, so an error leaves nothing behind.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import yaml

from windtunnel.errors import ConfigError
from windtunnel.files import check_folder, make_folder, slug, write_text
from windtunnel import memory
from windtunnel.transfer import Plan, fmt

FILES = ("train.yaml", "launch.sh", "launch.sbatch", "config.json", "transfer.md")


def _q(x) -> str:
    return shlex.quote(str(x))


# Before torchrun: a bad config or override is one line and exit 2 here, not one line per rank
# under torchrun's traceback. Skipped where `windtunnel` is not found (torchrun still checks).
_CHECK = """WORLD=""
[[ {counts} =~ ^[0-9]+$ ]] && WORLD={world}
WINDTUNNEL="$(command -v windtunnel || true)"
[[ -z "$WINDTUNNEL" && -x "$VENV_BIN/windtunnel" ]] && WINDTUNNEL="$VENV_BIN/windtunnel"
if [[ -n "$WINDTUNNEL" ]]; then
  "$WINDTUNNEL" train --check ${{WORLD:+--world "$WORLD"}} "$HERE/train.yaml" "$@"
fi"""

# torchrun from PATH, else from the environment `windtunnel transfer` ran in (not activated).
_TORCHRUN = """TORCHRUN="$(command -v torchrun || true)"
[[ -z "$TORCHRUN" && -x "$VENV_BIN/torchrun" ]] && TORCHRUN="$VENV_BIN/torchrun"
if [[ -z "$TORCHRUN" ]]; then
  echo "launch.sh: torchrun not found: activate the environment windtunnel is installed in" \\
       "(source {activate})" >&2
  exit 127
fi"""

# Stopping: torchrun, on SIGINT or SIGTERM, prints a traceback, exits 1 and kills its ranks 30 s
# later, mid-save or not; and its ranks run in sessions of their own, which a terminal's Ctrl-C
# does not reach. So torchrun runs in the background, where it ignores SIGINT (and
# PET_SIGNALS_TO_HANDLE keeps it from taking SIGINT back), and launch.sh hands Ctrl-C or SIGTERM
# to the ranks: each saves at the end of its step and exits 0, and launch.sh exits 130 (143).
# One node on this machine runs its ranks under windtunnel.local_launch instead, which listens on
# 127.0.0.1 only (torchrun's stores listen on every interface, whatever their address says).
_RUN = """STOPPED=0
stop() {{ STOPPED=$1; pkill "-$2" -P "${{PID:-0}}" 2>/dev/null || true; }}
trap 'stop 130 INT' INT
trap 'stop 143 TERM' TERM
if [[ "$NNODES" == 1 && ( "$MASTER_ADDR" == localhost || "$MASTER_ADDR" == 127.0.0.1 ) ]]; then
  PYTHON="$(dirname "$TORCHRUN")/python"
  [[ -x "$PYTHON" ]] || PYTHON=python3
  RANKS=("$PYTHON" -m windtunnel.local_launch "$NPROC_PER_NODE" "$MASTER_PORT" "$RUN_NAME" --)
else
  RANKS=("$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \\
         --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RUN_NAME")
fi
PET_SIGNALS_TO_HANDLE=SIGTERM,SIGHUP,SIGQUIT "${{RANKS[@]}}" -m windtunnel.cli train "$HERE/train.yaml" "$@" &
PID=$!
RC=""
while [[ -z "$RC" ]]; do  # wait returns early, > 128, each time a trapped signal arrives
  if wait "$PID"; then RC=0; else RC=$?; kill -0 "$PID" 2>/dev/null && RC=""; fi
done
[[ "$RC" == 0 && "$STOPPED" != 0 ]] && exit "$STOPPED"
exit "$RC"
"""


def launch_sh(plan: Plan) -> str:
    t, lr = plan.target, plan.large_run
    venv_bin = Path(sys.executable).parent
    return f"""#!/usr/bin/env bash
# {slug(lr['run_name'])}: `windtunnel train` under torchrun, written by `windtunnel transfer`.
# One node:     ./launch.sh [KEY=VALUE overrides of train.yaml ...]  (listens on 127.0.0.1 only)
# Several:      on every node, MASTER_ADDR=<node 0> NNODES={t.nodes} ./launch.sh
# Environment:  NNODES, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT override the defaults below.
# Stop:         Ctrl-C or SIGTERM: every rank saves at the end of its step; run it again to resume.
#               large_run.steps=N: N more steps, then save and stop.
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
VENV_BIN={_q(venv_bin)}
RUN_NAME={_q(lr['run_name'])}
DEFAULT_NNODES={_q(t.nodes)}
DEFAULT_NPROC_PER_NODE={_q(t.gpus_per_node)}
NNODES="${{NNODES:-$DEFAULT_NNODES}}"
NPROC_PER_NODE="${{NPROC_PER_NODE:-$DEFAULT_NPROC_PER_NODE}}"
MASTER_ADDR="${{MASTER_ADDR:-localhost}}"
MASTER_PORT="${{MASTER_PORT:-29500}}"
{_TORCHRUN.format(activate=_q(venv_bin / 'activate'))}
{_CHECK.format(world='$((NNODES * NPROC_PER_NODE))', counts='"$NNODES$NPROC_PER_NODE"')}
{_RUN.format()}"""


def launch_sbatch(plan: Plan, out_dir: Path) -> str:
    t, lr = plan.target, plan.large_run
    name = slug(lr["run_name"])
    # A CPU target's processes are CPUs of the node's one task: a GPU request there is refused
    # (sbatch: "Invalid generic resource (gres) specification") by a cluster without GPUs.
    cpu = t.device == "cpu"
    gpus = "" if cpu else f"#SBATCH --gpus-per-node={int(t.gpus_per_node)}\n"
    extra = f"#SBATCH --partition={t.partition}\n" if t.partition else ""
    cpus = max(int(t.cpus_per_task), int(t.gpus_per_node)) if cpu else int(t.cpus_per_task)
    if cpus:
        extra += f"#SBATCH --cpus-per-task={cpus}\n"
    return f"""#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --nodes={int(t.nodes)}
#SBATCH --ntasks-per-node=1
{gpus}#SBATCH --time={plan.slurm_time}
#SBATCH --output={name}-%j.out
#SBATCH --open-mode=append
{extra}# Written by `windtunnel transfer`. Submit: sbatch launch.sbatch [KEY=VALUE overrides of train.yaml ...]
# The run resumes from its latest checkpoint, so a job that hits its time limit is resubmitted as is.
set -euo pipefail
HERE={_q(out_dir.resolve())}
HERE="${{WINDTUNNEL_EXPORT_DIR:-$HERE}}"
VENV_BIN={_q(Path(sys.executable).parent)}
RUN_NAME={_q(lr['run_name'])}
NPROC_PER_NODE={_q(t.gpus_per_node)}
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${{MASTER_PORT:-29500}}"
{_CHECK.format(world='$((SLURM_NNODES * NPROC_PER_NODE))', counts='"$SLURM_NNODES$NPROC_PER_NODE"')}
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\
  torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$NPROC_PER_NODE" \\
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RUN_NAME-$SLURM_JOB_ID" \\
  -m windtunnel.cli train "$HERE/train.yaml" "$@"
"""


def hf_config(plan: Plan) -> dict:
    """The config.json that `windtunnel export-hf` writes for this run's checkpoints (a Llama
    config, μP folded into the weights: windtunnel/hf.py); token ids where the tokenizer is known."""
    from windtunnel import hf

    return hf.llama_config(plan.trial.model, plan.target.vocab_size, hf.eos_id(plan.trial))


def _table(header: list[str], rows: list[list]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def transfer_md(plan: Plan, inputs: dict) -> str:
    w, t, tr, lr = plan.winner, plan.target, plan.trial, plan.large_run
    value = "n/a" if w.value is None else fmt(w.value)
    parts = [
        f"# Transfer: {lr['run_name']}",
        "",
        f"Proxy: sweep `{w.sweep}`, {w.which}, objective {value} (`{w.path}`), "
        f"d_model {w.trial.model.d_model}, {w.trial.model.n_layers} layers, parametrization "
        f"{w.trial.model.parametrization}.",
        f"Target: `{t.name}`, d_model {t.d_model}, {t.n_layers} layers, {t.n_heads} heads, d_ff "
        f"{tr.model.ffn_dim}, vocab {t.vocab_size}, seq_len {t.seq_len}; {t.nodes} node(s) × "
        f"{t.gpus_per_node} GPUs of {fmt(t.gpu_memory_gb)} GB.",
        "",
        "Inputs: " + ", ".join(f"{k} = `{v}`" for k, v in inputs.items() if v is not None) + ".",
        "",
    ]
    if plan.warnings:
        parts += ["## Warnings", ""] + [f"- {x}" for x in plan.warnings] + [""]
    parts += ["## Derivation", "",
              "μP rules: windtunnel/parametrization.py (MiniCPM, arXiv 2404.06395); batch-size law: "
              "MiniCPM; scaling law: Chinchilla approach 3; memory model: windtunnel/memory.py.", "",
              _table(["quantity", "value", "formula", "source"],
                     [[r.name, fmt(r.value), r.formula, r.source] for r in plan.rows]), ""]
    parts += ["## Per-group values the target trains with", "",
              _table(["role", "init std", "lr", "weight decay"],
                     [[g["role"], fmt(g["init_std"]), fmt(g["lr"]), fmt(g["weight_decay"])] for g in plan.groups]), ""]
    mem = plan.memory
    parts += ["## Memory per GPU (GiB)", "",
              _table(["part", "GiB", "formula"], [
                  *([part, fmt(mem[part] / memory.GIB), formula] for part, formula in memory.PARTS.items()),
                  ["total", fmt(mem["total"] / memory.GIB), "sum"],
                  ["budget", fmt(mem["budget"] / memory.GIB), f"memory_fraction {fmt(t.memory_fraction)} × "
                                                      f"gpu_memory_gb {fmt(t.gpu_memory_gb)}"],
              ]), ""]
    parts += ["## Launch", "",
              f"- one node: `./launch.sh` (torchrun, {t.gpus_per_node} processes)",
              f"- Slurm: `sbatch launch.sbatch` ({t.nodes} node(s), time limit {plan.slurm_time})",
              f"- checkpoints: `{tr.train.checkpoint_dir}` every {tr.train.checkpoint_every} tokens, "
              f"stable save at {', '.join(map(str, tr.train.save_at)) or 'none'} tokens; a relaunch resumes "
              "from the latest",
              f"- loss log: `{lr['run_dir']}/loss.jsonl` (relative paths are relative to train.yaml's folder)",
              ""]
    return "\n".join(parts)


def _check_checkpoints(plan: Plan, out: Path) -> None:
    """The new train.yaml's first launch would resume the checkpoint its run already has in out:
    refuse now, while the old train.yaml is still there, if that checkpoint was trained otherwise
    (the launch would refuse it too, the same way: run_checkpoints.resume_changes)."""
    from windtunnel import run_checkpoints

    ckpt = Path(plan.trial.train.checkpoint_dir)
    latest = run_checkpoints.latest(ckpt if ckpt.is_absolute() else out / ckpt)
    if latest is None or not (latest / run_checkpoints.META).is_file():
        return  # no checkpoint there (the launch says so itself)
    changed = run_checkpoints.resume_changes(latest, plan.trial)
    if changed:
        raise ConfigError(f"--out: {out} holds run {plan.large_run['run_name']!r} with a checkpoint "
                          f"({latest.name}) trained with other settings ({'; '.join(changed)}); "
                          f"export elsewhere, or remove {latest.parent} to start that run anew")


def export(plan: Plan, out_dir: str | Path, inputs: dict | None = None) -> list[Path]:
    """Write the five files into out_dir (created); returns their paths."""
    out = Path(out_dir)
    check_folder("--out", out)
    _check_checkpoints(plan, out)
    make_folder("--out", out)
    texts = {
        "train.yaml": "# `windtunnel train train.yaml`: written by `windtunnel transfer` (see transfer.md)\n"
                      + yaml.safe_dump(plan.train_yaml(), sort_keys=False),
        "launch.sh": launch_sh(plan),
        "launch.sbatch": launch_sbatch(plan, out),
        "config.json": json.dumps(hf_config(plan), indent=2) + "\n",
        "transfer.md": transfer_md(plan, inputs or {}),
    }
    paths = []
    for name in FILES:
        p = out / name
        write_text(p, texts[name], error=f"--out: cannot write in {p.parent}",
                   mode=0o755 if name.startswith("launch") else 0o644)
        paths.append(p)
    return paths
