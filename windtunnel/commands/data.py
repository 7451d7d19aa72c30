"""`windtunnel data prepare SOURCE --out DIR`: tokenize text into memory-mapped shards."""
from __future__ import annotations

import json

from windtunnel.errors import ConfigError


def add_arguments(p) -> None:
    p.add_argument("action", choices=["prepare"], help="prepare: tokenize SOURCE into a shard folder")
    p.add_argument("source", help="'stdlib' (this Python's standard library), a text file or a folder")
    p.add_argument("--out", required=True, help="shard folder to write (atomically)")
    p.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    p.add_argument("--vocab-size", help="BPE vocabulary (default 4096; byte is always 256)")
    p.add_argument("--max-bytes", default="8e6", help="cap on the text read (default 8e6)")


def whole_number(flag: str, text: str) -> int:
    """`text` as an integer, written like 8000000, 8_000_000 or 8e6 (as --help writes them)."""
    try:
        value = float(text)
        if value.is_integer():
            return int(value)
    except ValueError:
        pass
    raise ConfigError(f"{flag}: must be an integer, written like 8000000, 8_000_000 or 8e6 (got {text!r})")


def run(args) -> int:
    from windtunnel.config import DataConfig
    from windtunnel.data import Shards, prepare

    default = DataConfig.vocab_size  # the dataclass default: BPE's, and what byte leaves unused
    vocab = default if args.vocab_size is None else whole_number("--vocab-size", args.vocab_size)
    if args.tokenizer == "byte":
        if args.vocab_size is not None and vocab != 256:
            raise ConfigError(f"--vocab-size: the byte tokenizer's vocabulary is fixed at 256 (got {vocab}); "
                              "use --tokenizer bpe to train one")
        vocab = default  # DataConfig checks vocab_size against the BPE range
    max_bytes = whole_number("--max-bytes", args.max_bytes)
    try:  # validates; the error names the flag the user typed, not the config field behind it
        DataConfig(source=args.source, tokenizer=args.tokenizer, vocab_size=vocab, max_bytes=max_bytes)
    except ConfigError as e:
        raise ConfigError(str(e).replace("data.max_bytes", "--max-bytes").replace("data.vocab_size", "--vocab-size")) from None
    out = prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=vocab, max_bytes=max_bytes)
    print(json.dumps(Shards.open(out).manifest))
    return 0
