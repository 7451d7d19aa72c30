"""Saved states (windtunnel/checkpoints.py): a crafted pickle is refused with one line and runs
nothing; a damaged checkpoint is caught by its checksum and the run falls back to the previous one."""
import os
import pickle
from pathlib import Path

import pytest
import torch

from helpers import tiny_trial
from windtunnel import checkpoints
from windtunnel.config.trial import with_overrides
from windtunnel.errors import ConfigError
from windtunnel.trainer import Population, train_trial

TPS = 8 * 32  # tokens per step of tiny_trial


class _Evil:
    """Unpickling this runs a shell command (what a crafted .pt does with weights_only=False)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_state_given_to_init_from_is_refused_in_one_line_and_runs_nothing(tmp_path):
    """The mutant: torch.load(weights_only=False) in trainer._load runs the command (the marker
    appears) and fails later, or not at all."""
    marker = tmp_path / "PWNED"
    evil = tmp_path / "stable-1000.pt"
    torch.save({"step": 1, "model": {}, "opt": {}, "rngs": [_Evil(marker)], "configs": []}, evil)
    with pytest.raises(ConfigError) as e:
        Population([tiny_trial(init_from=str(evil))])
    msg = str(e.value)
    assert msg.startswith(f"train.init_from: {evil} holds Python objects other than tensors") and "\n" not in msg
    assert "refused without running them" in msg and not marker.exists()


def test_a_crafted_checkpoint_in_a_bundle_is_refused_by_the_worker(tmp_path):
    """worker._resumed_from read latest.pt with weights_only=False before the trainer did."""
    from windtunnel.worker import _resumed_from

    marker = tmp_path / "PWNED"
    latest = tmp_path / "latest.pt"
    torch.save({"step": _Evil(marker)}, latest)
    with pytest.raises(ConfigError, match="^train.checkpoint_dir: .* refused without running them"):
        _resumed_from(latest)
    assert not marker.exists()


def test_a_crafted_dcp_checkpoint_is_refused(tmp_path):
    """The large run's DCP folder: a crafted .metadata (DCP reads it with plain pickle.load) and a
    crafted non-tensor entry (DCP's planner reads it with weights_only=False) are both refused,
    and an honest checkpoint (tensors, an optimizer's param groups) still loads."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "PWNED"
    m = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(m.parameters(), lr=0.123)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    good = tmp_path / "good"
    with pytest.warns(UserWarning):  # no process group: DCP saves as one process
        dcp.save({"model": m.state_dict(), "optim": opt.state_dict()}, checkpoint_id=str(good))
    m2 = torch.nn.Linear(4, 4)
    o2 = torch.optim.AdamW(m2.parameters(), lr=0.5)
    m2(torch.randn(2, 4)).sum().backward()
    o2.step()
    state = {"model": m2.state_dict(), "optim": o2.state_dict()}
    with pytest.warns(UserWarning):
        checkpoints.dcp_load(state, good, "train.init_from")
    assert torch.equal(state["model"]["weight"], m.weight) and state["optim"]["param_groups"][0]["lr"] == 0.123

    meta = tmp_path / "meta"
    with pytest.warns(UserWarning):
        dcp.save({"model": m.state_dict()}, checkpoint_id=str(meta))
    (meta / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ConfigError, match=r"^train.init_from: .*meta holds Python objects .*posix.system"):
        checkpoints.dcp_load({"model": m.state_dict()}, meta, "train.init_from")

    entry = tmp_path / "entry"
    with pytest.warns(UserWarning):
        dcp.save({"x": _Evil(marker)}, checkpoint_id=str(entry))
    with pytest.raises(ConfigError, match=r"^train.checkpoint_dir: .*entry holds Python objects"), \
            pytest.warns(UserWarning):
        checkpoints.dcp_load({"x": None}, entry, "train.checkpoint_dir")
    assert not marker.exists()


def test_a_damaged_latest_checkpoint_is_named_and_the_run_resumes_from_the_previous(tmp_path, capsys):
    """Eight bytes overwritten inside latest.pt's tensor data loaded silently (the run then
    'diverged'). Now the checksum catches it, one line says so, and the run resumes from the
    previous checkpoint to the same final loss as an uninterrupted run (a mutant without the
    check resumes from the damaged weights; one without the previous file cannot resume)."""
    cfg = tiny_trial(checkpoint_dir=str(tmp_path), checkpoint_every=5 * TPS)
    full = train_trial(tiny_trial())

    class Killed(Exception):
        pass

    def kill(step):
        if step == 10:
            raise Killed

    with pytest.raises(Killed):
        Population([cfg]).run(on_checkpoint=kill)
    latest = tmp_path / "latest.pt"
    assert checkpoints.check(latest) is None and checkpoints.previous(latest).exists()
    data = bytearray(latest.read_bytes())
    at = data.index(b"data/0") + 200  # inside the first tensor's bytes (the zip's stored entries)
    data[at:at + 8] = b"\x7f" * 8
    latest.write_bytes(bytes(data))

    pop = Population([with_overrides(cfg, {"train.checkpoint_every": 0})])
    out = pop.run()[0]
    err = capsys.readouterr().err.strip().splitlines()
    assert [ln for ln in err if "damaged" in ln] == [
        f"windtunnel: train.checkpoint_dir: {latest} is damaged ({checkpoints.check(latest)}); "
        f"resuming from the previous checkpoint {checkpoints.previous(latest)}"]
    assert out.final_val_loss == pytest.approx(full.final_val_loss, rel=1e-6)


def test_a_damaged_state_without_a_previous_one_is_one_line(tmp_path):
    path = tmp_path / "stable-1.pt"
    checkpoints.save({"step": 1}, path)
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ConfigError, match=r"^train.init_from: .* is damaged \(its SHA-256 is .*no good previous"):
        checkpoints.load_verified(path, "train.init_from")


def _dcp_checkpoint(folder: Path, step: int) -> Path:
    """A one-process DCP save with the large run's meta.json and manifest, as LargeRun.save writes it."""
    import json

    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning):  # no process group: DCP saves as one process
        dcp.save({"model": torch.nn.Linear(64, 64).state_dict()}, checkpoint_id=str(folder))
    sums = checkpoints.dcp_hash(folder)
    (folder / "meta.json").write_text(json.dumps({"step": step}))
    checkpoints.dcp_seal(folder, sums)
    return folder


def test_a_damaged_dcp_checkpoint_falls_back_to_the_previous_and_says_so(tmp_path, capsys):
    """The large run's checkpoints: a byte changed in a shard, a file gone or a manifest cut short
    is named in one line; the newest is moved aside, `latest` names the previous good one, which
    is returned. A branch's train.init_from has no fallback: one line."""
    old, new = _dcp_checkpoint(tmp_path / "step-000000004", 4), _dcp_checkpoint(tmp_path / "step-000000008", 8)
    assert checkpoints.dcp_check(new) is None and checkpoints.dcp_verified(new, "train.checkpoint_dir") == new
    shard = next(new.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1  # one bit
    shard.write_bytes(bytes(data))
    bad = checkpoints.dcp_check(new)
    assert bad.startswith(f"{shard.name}: its SHA-256 is ") and "checksums.sha256 records" in bad
    with pytest.raises(ConfigError, match=rf"^train.init_from: {new} is damaged \({shard.name}: .*\)$"):
        checkpoints.dcp_verified(new, "train.init_from", fallback=False)
    assert checkpoints.dcp_verified(new, "train.checkpoint_dir") == old
    assert capsys.readouterr().err.splitlines() == [
        f"windtunnel: train.checkpoint_dir: {new} is damaged ({bad}); moved to damaged-step-000000008, "
        f"resuming from the previous checkpoint {old}"]
    assert not new.exists() and (tmp_path / "damaged-step-000000008").is_dir()
    assert (tmp_path / "latest").read_text() == "step-000000004\n"

    (old / "meta.json").unlink()  # a file gone
    assert checkpoints.dcp_check(old) == "meta.json is missing"
    with pytest.raises(ConfigError, match="is damaged \\(meta.json is missing\\) and no good previous checkpoint"):
        checkpoints.dcp_verified(old, "train.checkpoint_dir")
    (old / "checksums.sha256").write_text("")  # a manifest cut short vouches for nothing
    assert checkpoints.dcp_check(old) == "checksums.sha256 does not list .metadata"


def test_the_save_after_a_fallback_keeps_the_good_previous_not_the_damaged_file(tmp_path, capsys):
    path = tmp_path / "latest.pt"
    for step in (1, 2):
        checkpoints.save({"step": step}, path, keep_previous=True)
    data = path.read_bytes()
    path.write_bytes(data[:-8] + bytes(8))  # step 2's file damaged
    assert checkpoints.load_verified(path, "test")["step"] == 1
    checkpoints.save({"step": 3}, path, keep_previous=True)  # the resumed run's next save
    prev = checkpoints.previous(path)
    assert checkpoints.check(prev) is None and checkpoints.load(prev, "test")["step"] == 1
    assert checkpoints.load_verified(path, "test")["step"] == 3
