"""`windtunnel data prepare SOURCE --out DIR`: tokenize text into memory-mapped shards.
`windtunnel data prepare prose`: the prose corpus (docs/data.md), fetched, extracted, BPE-tokenized
and cached under ~/.cache/windtunnel."""
from __future__ import annotations

import json
from pathlib import Path

from windtunnel.errors import ConfigError

PROSE_VOCAB = 16384
"""The prose corpus's default BPE vocabulary: the proxy models' (conf/data/stdlib_bpe.yaml's)."""


def add_arguments(p) -> None:
    p.add_argument("action", choices=["prepare", "pack"],
                   help="prepare: tokenize SOURCE into a shard folder; pack: the text of prose's first "
                        "--max-tokens tokens and its tokenizer, xz parts to carry to a machine without apt (--out)")
    p.add_argument("source", help="'stdlib' (this Python's standard library), 'prose' (English documentation "
                                  "from Debian's packages: docs/data.md), a text file (.xz, .gz too) or a folder")
    p.add_argument("--out", help="shard folder to write (atomically); for prose, default: the cache")
    p.add_argument("--tokenizer", choices=["byte", "bpe"], help="default: byte; bpe for prose")
    p.add_argument("--vocab-size", help="BPE vocabulary (default 4096, 16384 for prose; byte is always 256)")
    p.add_argument("--max-bytes", help="cap on the text read (default 8e6; all of prose)")
    p.add_argument("--max-tokens", default="0", help="keep the first N tokens only (default 0: all)")
    p.add_argument("--tokenizer-file", default="", help="bpe: a tokenizer.json to use instead of training one")


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
    from windtunnel.config.trial import DataConfig
    from windtunnel.data import CORPORA, Shards, corpus_shard_dir, prepare

    named = args.source in CORPORA
    args.tokenizer = args.tokenizer or ("bpe" if named or args.tokenizer_file else "byte")
    default = PROSE_VOCAB if named and args.tokenizer == "bpe" else DataConfig.vocab_size  # BPE's, and what byte leaves unused
    vocab = default if args.vocab_size is None else whole_number("--vocab-size", args.vocab_size)
    if args.tokenizer == "byte":
        if args.vocab_size is not None and vocab != 256:
            raise ConfigError(f"--vocab-size: the byte tokenizer's vocabulary is fixed at 256 (got {vocab}); "
                              "use --tokenizer bpe to train one")
        vocab = default  # DataConfig checks vocab_size against the BPE range
    max_bytes = whole_number("--max-bytes", args.max_bytes or ("1e15" if named else "8e6"))
    max_tokens = whole_number("--max-tokens", args.max_tokens)
    if max_tokens < 0:
        raise ConfigError(f"--max-tokens: must be >= 0 (0 = all; got {max_tokens})")
    if args.out is None and not named:
        raise ConfigError(f"--out: required for {args.source!r} (only a named corpus, {', '.join(CORPORA)}, "
                          "has a default folder in the cache)")
    try:  # validates; the error names the flag the user typed, not the config field behind it
        DataConfig(source=args.source, tokenizer=args.tokenizer, vocab_size=vocab, max_bytes=max_bytes)
    except ConfigError as e:
        raise ConfigError(str(e).replace("data.max_bytes", "--max-bytes").replace("data.vocab_size", "--vocab-size")) from None
    if args.action == "pack":
        return _pack(args, vocab, max_tokens)
    out = args.out
    if out is None:
        out = corpus_shard_dir(args.source, args.tokenizer, vocab, max_tokens)
        if max_bytes < 10**15:
            out = out.with_name(out.name + f"-{max_bytes}b")
    out = prepare(args.source, out, tokenizer=args.tokenizer, vocab_size=vocab, max_bytes=max_bytes,
                  max_tokens=max_tokens, tokenizer_file=args.tokenizer_file)
    manifest = Shards.open(out).manifest
    manifest.pop("corpus", None)  # its per-package table stays in the file, not on the screen
    print(json.dumps({"path": str(out), **manifest}))
    return 0


def _pack(args, vocab: int, max_tokens: int) -> int:
    """`data pack prose --max-tokens N --out DIR`: the whole corpus's shards first (their tokenizer,
    kept if prepared), then the text that holds N of its tokens, in xz parts (windtunnel.prose.pack)."""
    from windtunnel import prose
    from windtunnel.data import CORPORA, corpus, corpus_shard_dir, prepare

    if args.source not in CORPORA or args.tokenizer != "bpe":
        raise ConfigError(f"pack: packs a named corpus ({', '.join(CORPORA)}) with --tokenizer bpe (got {args.source!r})")
    if not max_tokens or args.out is None:
        raise ConfigError("--max-tokens: pack needs --max-tokens N (> 0) and --out DIR")
    text, _ = corpus(args.source)
    shards = prepare(args.source, corpus_shard_dir(args.source, "bpe", vocab), tokenizer="bpe", vocab_size=vocab,
                     max_bytes=10**15)
    packed = prose.pack(text, shards / "tokenizer.json", max_tokens, Path(args.out))
    print(json.dumps({"out": args.out, **packed}))
    return 0
