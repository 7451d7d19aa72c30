"""Issue 29's smaller points, each a one-line message or warning instead of silence."""
import subprocess
import sys

from test_crash_consistency import _outbox


def test_sync_reports_a_torn_last_outbox_line_and_exits_1(tmp_path):
    """It said 'sent 6, 0 pending' and exited 0 while the cut record (the run's finish) was never
    sent; a mutant without the check exits 0 here."""
    tracking = tmp_path / "quickstart" / "tracking"
    _outbox(tracking, 1)
    with open(tracking / "outbox.jsonl", "ab") as f:
        f.write(b'{"uri":"","experiment":"quickstart","op":"fin')
    r = subprocess.run([sys.executable, "-m", "windtunnel.cli", "sync", str(tracking.parent)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "sent 3, 0 pending" in r.stdout
    assert "the outbox ends in 45 bytes of a record cut short" in r.stderr, r.stderr


def test_a_dangling_symlink_as_results_dir_is_named(tmp_path):
    """mkdir said only 'File exists'."""
    import pytest

    from windtunnel.config.hydra import load_sweep
    from windtunnel.errors import ConfigError

    link = tmp_path / "results"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match=rf"results_dir: {link} is a symlink to {tmp_path / 'gone'}, which does not"):
        load_sweep("quickstart", [f"results_dir={link}"])


def test_a_huge_sweep_file_is_refused_before_it_is_read(tmp_path):
    """A 3 GB file was read whole first (a sparse 3 GB file here: refusing it must not read it)."""
    import time

    import pytest

    from windtunnel.config.hydra import load_sweep
    from windtunnel.errors import ConfigError

    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(3 * 2**30)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"big.yaml: 3,072 MiB is no config file \(allowed: up to 16 MiB of YAML\)"):
        load_sweep(str(big), [])
    assert time.perf_counter() - t0 < 5


def test_doubtful_settings_are_warned_about(tmp_path):
    """tokens=1e15, 40 workers on a few cores and searched data.* fields passed in silence."""
    import os

    from windtunnel.config.hydra import load_sweep
    from windtunnel.config.sweep import doubtful

    cfg = load_sweep("quickstart", ["train.tokens=1e15", f"executor.workers={4 * (os.cpu_count() or 1)}",
                                    "+search.data.max_bytes={type: categorical, choices: [300000, 400000]}",
                                    f"results_dir={tmp_path}"])
    got = [w.split(":")[0] for w in doubtful(cfg)]
    assert got == ["train.tokens", "executor.workers", "search.data.max_bytes"], doubtful(cfg)
    assert doubtful(load_sweep("quickstart", [f"results_dir={tmp_path}", "executor.workers=1"])) == []


def test_report_of_a_sweep_whose_trials_all_failed_names_no_best_yaml(tmp_path):
    import optuna

    from windtunnel.results import write_report
    from windtunnel.search import open_storage

    study = optuna.create_study(study_name="s", storage=open_storage(str(tmp_path / "study.journal")))
    t = study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    t.set_user_attr("result", {"status": "failed", "reason": "boom"})
    study.tell(t, state=optuna.trial.TrialState.FAIL)
    files = write_report(study, tmp_path)
    assert not (tmp_path / "best.yaml").exists() and all(f.exists() for f in files), files
