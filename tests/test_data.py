import json

import numpy as np
import pytest

from windtunnel.cli import main
from windtunnel.config import DataConfig
from windtunnel.data import Shards, load, prepare
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
    assert s.val_start == int(len(text) * 0.9)
    w = s.train_windows(np.random.default_rng(0), 4, 16)
    assert w.shape == (4, 17) and w.dtype == np.int64
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left


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
    (tmp_path / "d").mkdir()  # a shard folder of zero tokens, as earlier versions wrote
    (tmp_path / "d" / "tokens.bin").write_bytes(b"")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"tokens": 0, "dtype": "uint16"}))
    with pytest.raises(ConfigError, match="holds no tokens"):
        Shards.open(tmp_path / "d")
