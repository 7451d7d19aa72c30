import json
import multiprocessing
import os

import numpy as np
import pytest

from windtunnel.cli import main
from windtunnel.config.trial import DataConfig
from windtunnel.data import Shards, identity, identity_changes, load, prepare
from windtunnel.errors import ConfigError


def test_byte_shards_round_trip(tmp_path):
    text = "def f(x):\n    return x + 1\n" * 200
    src = tmp_path / "a.txt"
    src.write_text(text)
    out = prepare(str(src), tmp_path / "shards")
    s = Shards.open(out, val_fraction=0.1)
    assert s.manifest["tokenizer"] == "byte" and s.manifest["vocab_size"] == 256
    assert s.manifest["tokens"] == len(text.encode())
    assert bytes(np.asarray(s.tokens, dtype=np.uint8)).decode() == text
    assert s.strata.tolist() == [[0, int(len(text) * 0.9), len(text)]]  # tail: one stratum
    w = s.train_windows(np.random.default_rng(0), 4, 16)
    assert w.shape == (4, 17) and w.dtype == np.int64
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left



def test_the_identity_of_shards_is_their_tokens_not_their_path(tmp_path):
    """What a resumed study or validation compares: the same text prepared anywhere is the same data;
    other text at the same path is not (a fresh machine prepares data.source again)."""
    import hashlib

    (tmp_path / "a.txt").write_text("the same text\n" * 300)
    (tmp_path / "b.txt").write_text("other text, one word moved\n" * 300)
    a = Shards.open(prepare(str(tmp_path / "a.txt"), tmp_path / "a")).manifest
    again = Shards.open(prepare(str(tmp_path / "a.txt"), tmp_path / "elsewhere")).manifest
    b = Shards.open(prepare(str(tmp_path / "b.txt"), tmp_path / "b")).manifest
    assert a["tokens_sha256"] == hashlib.sha256((tmp_path / "a" / "tokens.bin").read_bytes()).hexdigest()
    assert identity(a) == identity(again) and identity_changes(identity(a), identity(again)) == []
    changed = identity_changes(identity(a), identity(b))
    assert [c.split()[0] for c in changed] == ["source_hash", "tokens", "tokens_sha256"]
    assert f"source_hash {a['source_hash'][:12]!r} -> {b['source_hash'][:12]!r}" in changed
    older = {k: v for k, v in identity(a).items() if k != "tokens_sha256"}  # a manifest from before the hash
    assert identity_changes(older, identity(a)) == [] and identity_changes(older, identity(b))


def _positions(tmp_path, n: int):
    """Shards whose token ids are their positions: windows show where they were cut."""
    d = tmp_path / "pos"
    d.mkdir()
    np.arange(n, dtype=np.uint32).tofile(d / "tokens.bin")
    (d / "manifest.json").write_text(json.dumps({"tokens": n, "dtype": "uint32", "vocab_size": n}))
    return d


def test_tail_split_draws_the_windows_it_always_drew(tmp_path):
    """The committed results were measured with the tail split: its windows are unchanged."""
    s = Shards.open(_positions(tmp_path, 100_000), val_split="tail")
    val_start = int(100_000 * (1 - 0.02))
    starts = np.random.default_rng(7).integers(0, val_start - 64 - 1, size=32)
    assert (s.train_windows(np.random.default_rng(7), 32, 64)[:, 0] == starts).all()
    assert s.val_windows(5, 64)[:, 0].tolist() == [val_start + 64 * i for i in range(5)]


def test_spread_split_samples_every_stratum_and_trains_on_none_of_it(tmp_path):
    n, f = 1_000_000, 0.02
    s = Shards.open(_positions(tmp_path, n), val_fraction=f, val_split="spread")
    assert len(s.strata) == 9  # 20,000 validation tokens hold 9 strata of >= 2,048
    val = s.eval_windows(18 * 128, 128)
    held_out = np.zeros(n, bool)
    for a, v, b in s.strata:
        held_out[v:b] = True
    assert held_out[val].all() and abs(held_out.mean() - f) < 1e-4
    assert len({np.searchsorted(s.strata[:, 2], w[0], side="right") for w in val}) == 9  # 2 windows from each
    train = s.train_windows(np.random.default_rng(0), 4096, 128)
    assert not held_out[train].any()  # no training window reaches into a validation part
    assert len({np.searchsorted(s.strata[:, 2], w[0], side="right") for w in train}) == 9
    with pytest.raises(ConfigError, match="data.val_split"):
        DataConfig(val_split="random")

def test_bpe_shards_round_trip(tmp_path):
    from tokenizers import Tokenizer

    src = tmp_path / "corpus"
    src.mkdir()
    text = "import os\nprint(os.path.join('a', 'b'))\n" * 300
    (src / "x.py").write_text(text)
    out = prepare(str(src), tmp_path / "bpe", tokenizer="bpe", vocab_size=300)
    s = Shards.open(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert s.vocab_size <= 300 and s.manifest["dtype"] == "uint16"
    assert tok.decode(np.asarray(s.tokens).tolist()) == text


def test_stdlib_default_is_cached(tmp_path):
    cfg = DataConfig(max_bytes=200_000, cache_dir=str(tmp_path))
    a = load(cfg)
    b = load(cfg)
    assert a.path == b.path and a.manifest["source"] == "python-stdlib" and a.manifest["tokens"] == 200_000
    assert json.loads((a.path / "manifest.json").read_text())["source_hash"]
    v1, v2 = a.val_windows(3, 32), b.val_windows(3, 32)
    assert (v1 == v2).all() and v1.shape == (3, 33)


def test_empty_text_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert main(["data", "prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty.txt holds no text" in err
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]  # no shards, no temp folder
    (tmp_path / "texts").mkdir()  # a folder of empty files: only the newlines that would join them
    for name in ("a.txt", "b.txt"):
        (tmp_path / "texts" / name).write_bytes(b"")
    assert main(["data", "prepare", str(tmp_path / "texts"), "--out", str(tmp_path / "d")]) == 2
    assert "holds no text" in capsys.readouterr().err and not (tmp_path / "d").exists()
    (tmp_path / "d").mkdir()  # a shard folder of zero tokens, as earlier versions wrote
    (tmp_path / "d" / "tokens.bin").write_bytes(b"")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"tokens": 0, "dtype": "uint16"}))
    with pytest.raises(ConfigError, match="holds no tokens"):
        Shards.open(tmp_path / "d")


def test_out_of_other_settings_is_an_error_and_same_settings_are_kept(tmp_path, capsys):
    src, out = tmp_path / "t.txt", str(tmp_path / "d")
    src.write_text("def f(x):\n    return x + 1\n" * 300)
    bpe = ["data", "prepare", str(src), "--out", out, "--tokenizer", "bpe", "--vocab-size", "300"]
    assert main(bpe) == 0
    before = (tmp_path / "d" / "tokens.bin").read_bytes()
    capsys.readouterr()
    assert main(["data", "prepare", str(src), "--out", out, "--tokenizer", "byte"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out:" in err and "already holds bpe shards" in err
    assert main(bpe[:-1] + ["400"]) == 2  # another vocabulary asked
    assert main(bpe) == 0 and "already prepared" in capsys.readouterr().err
    assert (tmp_path / "d" / "tokens.bin").read_bytes() == before


def test_out_that_is_a_file_or_a_folder_of_other_things_is_an_error(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello world\n" * 50)
    (tmp_path / "f").write_text("mine")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("mine")
    for out in ("f", "notes"):
        assert main(["data", "prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--out:" in err
    assert (tmp_path / "f").read_text() == "mine" and os.listdir(tmp_path / "notes") == ["a.md"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left


def _prepare_after(barrier, src, out):
    barrier.wait()  # both start together, so both find out free and race to publish
    prepare(src, out)


def test_two_writers_of_the_same_shards_both_succeed(tmp_path):
    src = tmp_path / "t.txt"
    src.write_bytes(bytes(range(256)) * 16_000)  # 4 MB: long enough for the writers to overlap
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_prepare_after, args=(barrier, str(src), tmp_path / "d")) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert Shards.open(tmp_path / "d").manifest["tokens"] == 256 * 16_000
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left


def test_a_writers_lock_appears_already_held(tmp_path, monkeypatch):
    """Another writer's cleaner takes every `.d.*.lock` nobody holds: a lock file visible before
    its flock could be taken in that window, and its writer fail with Held (a two-worker test run
    under load saw it). So when prepare flocks its lock, neither the lock nor the temp folder is
    visible yet: the folder, which the cleaner deletes when its lock is free, comes after."""
    from windtunnel import locks

    src = tmp_path / "t.txt"
    src.write_bytes(b"some text " * 100)
    flock, seen = locks.fcntl.flock, []

    def watching(f, op):
        if op & locks.fcntl.LOCK_EX:
            seen.append(sorted(p.name for p in tmp_path.glob(".d.*") if not p.name.endswith(".new")))
        return flock(f, op)

    monkeypatch.setattr(locks.fcntl, "flock", watching)
    prepare(str(src), tmp_path / "d")
    assert seen and seen[0] == [], seen
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nothing of the lock left


def test_a_killed_prepare_leaves_a_temp_folder_the_next_one_clears(tmp_path):
    """SIGKILL mid-prepare (BPE training takes seconds) leaves its temp folder; the next prepare
    there removes it (nobody holds its lock) and publishes a folder others can read (0755, whatever the umask)."""
    import signal
    import time

    src = tmp_path / "t.txt"
    src.write_text("".join(f"line {i} of words and more words {i * 7919 % 1000}\n" for i in range(60_000)))
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=prepare, args=(str(src), tmp_path / "d"), kwargs={"tokenizer": "bpe", "vocab_size": 2048})
    child.start()
    deadline = time.time() + 60
    while not any(p.is_dir() for p in tmp_path.glob(".d.*")) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert list(tmp_path.glob(".d.*")) and not (tmp_path / "d").exists()
    from windtunnel import locks

    live = tmp_path / ".d.live"  # a live writer's (it holds the lock beside it): kept
    live.mkdir()
    held = locks.hold(tmp_path / ".d.live.lock")
    prepare(str(src), tmp_path / "d")
    assert sorted(p.name for p in tmp_path.glob(".d.*")) == [".d.live", ".d.live.lock"]
    held.close()
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_max_bytes_reads_8e6_and_8_000_000_and_rejects_fractions(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello world\n" * 50)
    for i, n in enumerate(["8e6", "8_000_000", "2e2"]):
        assert main(["data", "prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / f"d{i}"),
                     "--max-bytes", n]) == 0
    assert Shards.open(tmp_path / "d2").manifest["tokens"] == 200  # 2e2 caps the 600-byte text
    capsys.readouterr()
    for bad in ("8.5", "abc"):
        assert main(["data", "prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "e"),
                     "--max-bytes", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--max-bytes: must be an integer" in err
    assert main(["data", "prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "e"), "--max-bytes", "0"]) == 2
    assert "--max-bytes: must be > 0 (got 0)" in capsys.readouterr().err  # the flag, not data.max_bytes


def test_vocab_size_with_byte_is_an_error_and_a_short_bpe_vocabulary_a_note(tmp_path, capsys):
    src = str(tmp_path / "t.txt")
    (tmp_path / "t.txt").write_text("def f(x):\n    return x + 1\n" * 300)
    assert main(["data", "prepare", src, "--out", str(tmp_path / "b"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--vocab-size:" in err and "256" in err
    assert not (tmp_path / "b").exists()
    assert main(["data", "prepare", src, "--out", str(tmp_path / "b"), "--vocab-size", "256"]) == 0
    assert main(["data", "prepare", src, "--out", str(tmp_path / "p"), "--tokenizer", "bpe",
                 "--vocab-size", "1e5"]) == 0
    held = Shards.open(tmp_path / "p").vocab_size
    assert held < 100_000 and f"stopped at {held}" in capsys.readouterr().err
