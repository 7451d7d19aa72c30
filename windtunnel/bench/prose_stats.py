"""The prose corpus's size, measured (docs/data.md): per Debian package, its .deb's bytes, the
prose kept, that prose's tokens under the corpus's BPE and the CPU seconds its extraction took;
written to OUT/README.md (a table) and OUT/prose.json (the rows).

    python -m windtunnel.bench.prose_stats [--vocab-size 16384] [--out results/prose]

It prepares what is missing first (`windtunnel data prepare prose`: download, extraction, BPE) and
says how long each step took here; a package's tokens are its text's, encoded as the shards were
(line by line), so they add up to the shards' count, which is checked.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from windtunnel.data import cache_root, corpus, corpus_shard_dir, prepare
from windtunnel.files import write_json, write_text


def package_tokens(text: bytes, tok) -> int:
    """Tokens of text, encoded line by line as `windtunnel.data` encodes a corpus."""
    lines = text.decode("utf-8", errors="replace").splitlines(keepends=True)
    return sum(len(e.ids) for i in range(0, len(lines), 10_000) for e in tok.encode_batch(lines[i:i + 10_000]))


def measure(vocab: int) -> dict:
    from tokenizers import Tokenizer

    from windtunnel import prose

    had_text = prose.built(cache_root() / "corpora")
    t0 = time.monotonic()
    text_file, meta = corpus("prose")
    t1 = time.monotonic()
    shards = corpus_shard_dir("prose", "bpe", vocab)
    had_shards = (shards / "manifest.json").is_file()
    prepare("prose", shards, tokenizer="bpe", vocab_size=vocab, max_bytes=10**15)
    t2 = time.monotonic()
    manifest = json.loads((shards / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(shards / "tokenizer.json"))
    parts = prose.corpus_dir(cache_root() / "corpora") / "packages"
    rows = []
    with open(text_file, "rb") as f:
        for r in meta["packages"]:
            data = f.read(r["bytes"])
            deb = cache_root() / "corpora" / "debs" / r["deb"]
            cost = (parts / r["part"]).with_suffix(".json") if "part" in r else None
            rows.append({"package": r["package"], "deb_bytes": deb.stat().st_size if deb.is_file() else None,
                         "files": r["files"], "bytes": r["bytes"], "tokens": package_tokens(data, tok),
                         "cpu_seconds": json.loads(cost.read_text())["cpu_seconds"] if cost and cost.is_file() else None})
    total = sum(r["tokens"] for r in rows)
    if total != manifest["tokens"]:  # the table would not describe the shards
        raise SystemExit(f"prose_stats: packages' tokens add up to {total}, the shards hold {manifest['tokens']}")
    return {"rows": rows, "tokens": total, "bytes": sum(r["bytes"] for r in rows), "vocab_size": manifest["vocab_size"],
            "text_sha256": meta["text_sha256"], "shards": str(shards),
            "seconds": {"corpus_text": round(t1 - t0, 1), "bpe_and_shards": round(t2 - t1, 1),
                        "count": round(time.monotonic() - t2, 1)},
            "cached": {"corpus_text": had_text, "bpe_and_shards": had_shards}}


def markdown(m: dict, command: str) -> str:
    def mb(b):
        return "" if b is None else f"{b / 1e6:.1f}"

    lines = ["# The prose corpus, measured", "",
             f"`{command}` wrote this file and `prose.json` beside it. Text SHA-256 `{m['text_sha256'][:16]}…`, "
             f"BPE vocabulary {m['vocab_size']:,}, shards `{Path(m['shards']).name}`.", "",
             "| package | .deb MB | files | prose MB | tokens (M) | bytes/token | extraction CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in m["rows"]:
        bpt = f"{r['bytes'] / r['tokens']:.2f}" if r["tokens"] else ""
        cpu = "" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.0f}"
        lines.append(f"| {r['package']} | {mb(r['deb_bytes'])} | {r['files']:,} | {mb(r['bytes'])} | "
                     f"{r['tokens'] / 1e6:.2f} | {bpt} | {cpu} |")
    debs = sum(r["deb_bytes"] or 0 for r in m["rows"])
    cpu = sum(r["cpu_seconds"] or 0 for r in m["rows"])
    lines.append(f"| **total ({len(m['rows'])} packages)** | {debs / 1e6:,.0f} | {sum(r['files'] for r in m['rows']):,} | "
                 f"{m['bytes'] / 1e6:.1f} | **{m['tokens'] / 1e6:.1f}** | {m['bytes'] / m['tokens']:.2f} | {cpu:,.0f} |")
    s, c = m["seconds"], m["cached"]
    lines += ["", f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), shared with other "
              "jobs while this ran, so wall times are upper bounds. The extraction's CPU seconds (pdftotext's "
              f"included) add up to {cpu / 3600:.1f} CPU hours: about {cpu / 3600 / (os.cpu_count() or 1):.1f} h of "
              f"wall time on these {os.cpu_count()} CPUs when idle.",
              f"This command: corpus text {'cached' if c['corpus_text'] else 'built'} ({s['corpus_text']:.0f} s), "
              f"BPE training and tokenizing {'cached' if c['bpe_and_shards'] else 'done here'} "
              f"({s['bpe_and_shards']:.0f} s), counting each package's tokens {s['count']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--out", default="results/prose")
    args = p.parse_args(argv)
    m = measure(args.vocab_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "prose.json", m)
    command = "python -m windtunnel.bench.prose_stats" + (f" --vocab-size {args.vocab_size}" if args.vocab_size != 16384 else "")
    write_text(out / "README.md", markdown(m, command))
    print(f"prose_stats: {m['tokens'] / 1e6:.1f}M tokens in {m['bytes'] / 1e6:.0f} MB from {len(m['rows'])} packages -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
