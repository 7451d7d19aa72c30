"""What `windtunnel sweep` says when it ends: failures, a complete sweep, where the best is."""
import subprocess
import sys


def _sweep(tmp_path, *overrides):
    return subprocess.run([sys.executable, "-m", "windtunnel.cli", "sweep", "-q", "quickstart",
                           "tracking.enabled=false", "train.tokens=16000", "train.eval_every=8000",
                           f"results_dir={tmp_path}", *overrides],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_a_run_whose_every_trial_failed_exits_1_without_a_best(tmp_path):
    """It exited 0 and printed `best: .../best.yaml`, a file never written."""
    p = _sweep(tmp_path, "n_trials=2", "model.vocab_size=100")  # below the data's 256: every worker refuses it
    assert p.returncode == 1, p.stdout + p.stderr
    assert "(0 ok, 0 pruned, 2 failed this run)" in p.stdout and "best:" not in p.stdout
    d = tmp_path / "quickstart"
    assert p.stderr.strip().splitlines()[-1] == (f"windtunnel sweep: all 2 trials of this run failed; their reasons: "
                                                 f"{d}/trials.csv, their workers' logs: {d}/bundles/*/worker.log")
    assert not (d / "best.yaml").exists() and list(d.glob("bundles/*/worker.log"))


def test_a_complete_sweep_says_so_and_how_to_add_trials(tmp_path):
    p = _sweep(tmp_path, "n_trials=1")
    assert p.returncode == 0 and "best:" in p.stdout, p.stdout + p.stderr
    p = _sweep(tmp_path, "n_trials=1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == ("quickstart: already complete: 1 trials; raise n_trials (now 1) to add more, "
                                      "e.g. n_trials=2")
    assert "best:" in p.stdout
