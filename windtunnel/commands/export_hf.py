"""`windtunnel export-hf SOURCE --out DIR [--step N] [--trial K]`: a trained model as a Hugging Face
Llama folder (safetensors, config.json, generation_config.json, tokenizer) that transformers,
vLLM and lm-eval-harness load with no remote code; μP's multipliers are folded into the weights
(windtunnel/hf.py).

SOURCE: a trial's saved state (a trainer checkpoint .pt: latest.pt, stable-TOKENS.pt) or the
trainer's checkpoint folder (latest.pt, or the state of --step N), a large run's folder (its run
folder, checkpoints folder, or `windtunnel transfer`'s --out: its latest checkpoint, or --step
N's), or one checkpoint folder (holding meta.json).
Needs the `hf` extra: pip install 'windtunnel[hf]'.
"""
from __future__ import annotations

import argparse
import re

from windtunnel.errors import ConfigError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size: a size such as 5GB, 500MB or 1000000 (got {text!r})")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("source", metavar="SOURCE", help="a trial's .pt, a large run's folder, or a checkpoint folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the model (created)")
    p.add_argument("--step", type=int, default=None, metavar="N", help="a large run's checkpoint of step N (default: latest)")
    p.add_argument("--trial", type=int, default=None, metavar="K",
                   help="which trial of a population's state (needed when it holds several)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype (default float32: the trained master weights, exactly)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="safetensors shards past this (default 5GB)")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="a BPE run's tokenizer.json when its data is not prepared on this machine")


def run(args) -> int:
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise ConfigError("export-hf: needs safetensors (pip install 'windtunnel[hf]')") from None
    from windtunnel import hf

    hf.export(args.source, args.out, step=args.step, trial=args.trial, dtype=args.dtype,
              max_shard_bytes=size(args.max_shard_size), tokenizer=args.tokenizer)
    return 0
