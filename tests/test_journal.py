"""The study journal survives a torn write, garbage and a full disk (windtunnel/journal.py): the
earlier trials stay readable, the bad bytes are moved aside (never silently dropped), and the
sweep resumes to exactly n_trials."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from conftest import unavailable
from windtunnel.journal import JournalFile, decode
from windtunnel.search import open_storage

TS = optuna.trial.TrialState


def _study(path: Path) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=optuna.storages.JournalStorage(JournalFile(str(path))),
                               sampler=optuna.samplers.RandomSampler(0), load_if_exists=True)


def _load(path: Path) -> optuna.Study:
    """The study as a reader opens it (create_study appends a record; load_study only reads)."""
    return optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(JournalFile(str(path))),
                             sampler=optuna.samplers.RandomSampler(0))


def _summary(path: Path) -> list[tuple]:
    return [(t.number, t.state.name, t.value, t.params.get("x")) for t in _load(path).get_trials(deepcopy=False)]


def _record_ends(data: bytes) -> list[int]:
    return [i + 1 for i, b in enumerate(data) if b == ord("\n")]


def test_a_cut_at_any_byte_of_the_last_three_records_keeps_the_rest_and_takes_new_trials(tmp_path, capsys):
    """Optuna's own backend (the mutant: JournalFileBackend in place of JournalFile) fails for good
    once a record is appended after a torn line; so does a repair that drops whole records, or one
    that forgets to move the bad bytes aside."""
    full = tmp_path / "full.journal"
    study = _study(full)
    for i in range(4):
        t = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        study.tell(t, 0.1 * i)
    data = full.read_bytes()
    ends = _record_ends(data)
    expect = {e: _summary_of(tmp_path, data[:e]) for e in ends[-4:]}
    for cut in range(ends[-4] + 1, len(data)):  # inside each of the last three records
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        j = d / "study.journal"
        j.write_bytes(data[:cut])
        whole = max(e for e in ends if e <= cut)
        expected = expect[whole]
        assert _summary(j) == expected, cut  # replay: the whole records, nothing more
        s = _load(j)
        s.tell(s.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), 9.0)  # an append after the cut
        after = _summary(j)
        assert after[:len(expected)] == expected and after[-1][1:3] == ("COMPLETE", 9.0), cut
        torn = cut != whole
        moved = list(d.glob("study.journal.damaged-*"))
        assert [m.read_bytes() for m in moved] == ([data[whole:cut]] if torn else []), cut
        assert all(decode(line) for line in j.read_bytes().splitlines())
        shutil.rmtree(d)
    assert "moved to" in capsys.readouterr().err


def _summary_of(tmp_path: Path, data: bytes) -> list[tuple]:
    ref = tmp_path / "ref.journal"
    ref.write_bytes(data)
    try:
        return _summary(ref)
    finally:
        ref.unlink()


def test_garbage_is_skipped_reported_and_moved_aside_and_a_reader_past_it_starts_again(tmp_path, capsys):
    """Garbage and random bytes after the last record: replay skips and names them (a mutant
    that raises, as Optuna does, fails here); the next append moves them aside, and a process that
    had already read past them (its offset inside the repaired file) reads the new record, not
    the middle of one."""
    j = tmp_path / "study.journal"
    study = _study(j)
    study.tell(study.ask(), 1.0)
    before = _summary(j)
    junk = b"not json\n\x00\xff\xfe garbage \x80\n{\"op_code\": \"x\"}\n[1, 2]\n"
    with open(j, "ab") as f:
        f.write(junk)
    reader = _load(j)  # has read past the garbage
    assert _summary(j) == before
    assert capsys.readouterr().err.count("not a journal record") >= 4
    writer = _load(j)
    writer.tell(writer.ask(), 2.0)
    assert [m.read_bytes() for m in tmp_path.glob("study.journal.damaged-*")] == [junk]
    assert "moved to" in capsys.readouterr().err
    got = [(t.number, t.value) for t in reader.get_trials(deepcopy=False)]
    assert got == [(0, 1.0), (1, 2.0)]


def test_a_record_glued_onto_a_torn_line_by_an_older_version_is_read():
    """The damage the issue found ('...-d96d-{"op_code":0,...'): the whole second record is kept
    (a decoder that only tries the line's start loses it)."""
    torn = b'{"op_code":7,"worker_id":"e2acc1ee-d96d-'
    whole = b'{"op_code":0,"worker_id":"w","study_name":"s","directions":[1]}'
    assert decode(torn + whole + b"\n") == {"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}
    assert decode(torn + b"\n") is None


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 4 MB tmpfs (needs root: CI runs as root)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        unavailable("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave_kb: int) -> Path:
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_kb * 1024))
    return filler


@pytest.mark.slow
@pytest.mark.root
def test_a_full_disk_stops_the_sweep_with_one_line_and_it_resumes_to_n_trials(tiny_fs):
    """On a real full filesystem at several amounts of free space: one line naming the disk (not
    an OSError traceback), every record before it readable, and after space is freed the same
    command ends with exactly n_trials. A journal append that left its partial record (the old
    backend), or a worker's ENOSPC recorded as a failed trial, fails here."""
    n = 2
    cmd = [sys.executable, "-m", "windtunnel.cli", "sweep", "quickstart", "-q", f"n_trials={n}", "results_dir=r",
           "train.tokens=12000", "train.eval_every=6000", "tracking.enabled=false", "executor.workers=1",
           "population.size=1", "pruner.type=none"]
    for leave_kb in (4, 48):  # the journal's append fails; a table's write or a worker's
        shutil.rmtree(tiny_fs / "r", ignore_errors=True)
        filler = _fill(tiny_fs, leave_kb)
        first = subprocess.run(cmd, cwd=tiny_fs, capture_output=True, text=True, timeout=300)
        assert first.returncode == 1, (leave_kb, first.stdout, first.stderr)
        lines = first.stderr.strip().splitlines()
        assert "Traceback" not in first.stderr and f"no space left on the filesystem at {tiny_fs}" in lines[-1], \
            (leave_kb, first.stderr)
        journal = tiny_fs / "r" / "quickstart" / "study.journal"
        if journal.exists():
            data = journal.read_bytes()
            assert all(decode(line) for line in data.split(b"\n")[:-1]) and data[-1:] in (b"", b"\n")
        filler.unlink()
        again = subprocess.run(cmd, cwd=tiny_fs, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, (leave_kb, again.stdout, again.stderr)
        trials = optuna.load_study(study_name="quickstart", storage=open_storage(str(journal))).get_trials()
        final = [t for t in trials if not t.user_attrs.get("retried")]
        assert len(final) == n and all(t.state == TS.COMPLETE for t in final), [(t.number, t.state) for t in trials]
