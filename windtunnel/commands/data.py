"""`windtunnel data prepare SOURCE --out DIR`: tokenize text into memory-mapped shards."""
from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("action", choices=["prepare"])
    p.add_argument("source", help="'stdlib' (this Python's standard library), a text file or a folder")
    p.add_argument("--out", required=True, help="shard folder to write (atomically)")
    p.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary (default 4096)")
    p.add_argument("--max-bytes", type=int, default=8_000_000, help="cap on the text read (default 8e6)")


def run(args) -> int:
    from windtunnel.config import DataConfig
    from windtunnel.data import Shards, prepare

    DataConfig(source=args.source, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
               max_bytes=args.max_bytes)  # validates, naming the field
    out = prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                  max_bytes=args.max_bytes)
    print(json.dumps(Shards.open(out).manifest))
    return 0
