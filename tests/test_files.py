"""windtunnel/files.py is the one way windtunnel writes a file whole: temp beside it, then rename."""
import ast
import os
import stat
from pathlib import Path

import pytest

from windtunnel.errors import ConfigError
from windtunnel.files import append_line, write_atomically, write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
# calls that write a whole file; inside files.py, or in the lambda handed to write_atomically
# (it writes the temp), they are the safe write itself
WRITERS = {"write_text", "write_bytes", "to_csv", "to_parquet", "savefig", "dump", "save", "tofile"}
# the writes that are not a file written whole, each with its reason
ALLOWED = {
    ("windtunnel/data.py", "tofile"),  # into a temp folder renamed whole onto the shard folder
    ("windtunnel/data.py", "save"),  # tokenizer.json, likewise into that temp folder
    ("windtunnel/executors/local.py", "open"),  # a standby worker's output, streamed as it runs
    ("windtunnel/bench/validate_target.py", "open"),  # a launch's output, streamed as it trains
    ("windtunnel/checkpoints.py", "open"),  # the temp, in the callback handed to write_atomically
    ("windtunnel/checkpoints.py", "save"),  # torch.save into that temp, through the checksum
}


def _writes(path: Path):
    """(line, name) of each call in path that writes a file whole outside a write_atomically callback."""
    tree = ast.parse(path.read_text())
    in_lambda = {id(n) for lam in ast.walk(tree) if isinstance(lam, ast.Lambda) for n in ast.walk(lam.body)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in in_lambda:
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in WRITERS:
            if f.attr in ("dump", "save") and not (isinstance(f.value, ast.Name) and f.value.id in ("json", "torch", "yaml", "np")):
                if not (f.attr == "save" and isinstance(f.value, ast.Name) and f.value.id == "tok"):
                    continue
            yield node.lineno, f.attr
        elif isinstance(f, ast.Name) and f.id == "open" and len(node.args) > 1:
            mode = node.args[1]
            if isinstance(mode, ast.Constant) and ("w" in str(mode.value) or "x" in str(mode.value)):
                yield node.lineno, "open"


def test_every_whole_file_windtunnel_writes_goes_through_files_py():
    """A module that writes a file in place (a killed process leaves half of it, a reader sees
    half of it) fails here, naming the line: e.g. a `path.write_text(...)` or `df.to_csv(path)`
    added outside windtunnel/files.py's write_atomically."""
    found = []
    for path in sorted((ROOT / "windtunnel").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "windtunnel/files.py" or rel.startswith("windtunnel/kernels/"):
            continue  # windtunnel/kernels is the symlink to kernels/
        found += [f"{rel}:{line}: {name}" for line, name in _writes(path) if (rel, name) not in ALLOWED]
    assert found == [], "files written in place, not through windtunnel/files.py:\n" + "\n".join(found)


def test_write_keeps_mode_and_names_the_users_path_when_the_folder_cannot_be_made(tmp_path):
    """mode is applied (launch.sh must stay executable; a mkstemp temp is 0600); a file where the
    folder should be is one ConfigError line with the caller's words, not the temp's name."""
    p = tmp_path / "launch.sh"
    write_text(p, "echo hi\n", error="--out: cannot write here", mode=0o755)
    assert stat.S_IMODE(p.stat().st_mode) == 0o755 and p.read_text() == "echo hi\n"
    write_json(tmp_path / "a.json", {"x": 1}, error="--out: cannot write here")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644  # readable by others, as the umask's
    (tmp_path / "blocker").write_text("")
    with pytest.raises(ConfigError, match=r"^--out: cannot write here \(") as e:
        write_text(tmp_path / "blocker" / "x.txt", "x", error="--out: cannot write here")
    assert ".tmp" not in str(e.value) and "\n" not in str(e.value)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.json", "blocker", "launch.sh"]  # no temp left


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "state.json"
    write_json(p, {"v": 1}, fsync=True)

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        write_atomically(p, boom)
    assert p.read_text() == '{\n "v": 1\n}' and os.listdir(tmp_path) == ["state.json"]


def test_append_line_adds_whole_lines(tmp_path):
    p = tmp_path / "loss.jsonl"
    for i in range(3):
        append_line(p, f'{{"step": {i}}}')
    assert p.read_text().splitlines() == ['{"step": 0}', '{"step": 1}', '{"step": 2}']
