"""Memory checked before a model is built (windtunnel/memory.py): one model for the sweep, the
transfer plan and the check; a trial that cannot fit is one line naming the sizes; a worker the
kernel's OOM killer ended is reported as out of memory."""
import itertools
import signal
import subprocess

import pytest
from helpers import tiny_trial
from windtunnel import cli, memory
from windtunnel.config.target import load_target
from windtunnel.config.trial import with_overrides
from windtunnel.errors import ConfigError
from windtunnel.trainer import Population


@pytest.mark.parametrize("overrides", [["model.d_model=4096", "model.n_layers=64"], ["model.d_model=65536"]])
def test_a_trial_that_cannot_fit_is_refused_in_one_line_before_it_is_built(overrides, capsys):
    """The issue's runs: the first grew to 22 GB over 70 s until the kernel killed it (exit 137),
    the second printed a 60-line traceback. A mutant without the check does one of those."""
    code = cli.main(["trial", *overrides, "train.device=cpu", "data.max_bytes=300000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("windtunnel trial: error: model: this trial needs ~") and "M parameters" in err[0]
    assert "GiB for" in err[0] and "shrink model.d_model / model.n_layers" in err[0]


def test_a_population_is_checked_as_a_whole(monkeypatch):
    """K trials stacked need K times the states: a check of one trial's would pass."""
    cfg = tiny_trial()
    one = memory.estimate(cfg.model, 256, 8 * 32, population=1, device="cpu").total
    monkeypatch.setattr(memory, "free_bytes", lambda device: (3.5 * one, "test"))
    Population([cfg] * 3)
    with pytest.raises(ConfigError, match=r"^model: this population needs .* × 4 trials"):
        Population([with_overrides(cfg, {"train.seed": s}) for s in range(4)])


def test_a_sweep_worker_waits_for_the_memory_its_gpu_is_handing_back(monkeypatch, tmp_path):
    """On an H100 a sweep lost its second bundle of 30 trials to the check: the first bundle's process
    still held ~31 GiB while it exited. A local executor's GPU workers get WINDTUNNEL_MEMORY_WAIT_S, and
    the check then waits for the memory to come free; without it (a user's own trial) it fails at once.
    (Free memory is faked below: a CPU cannot hold memory back as an exiting CUDA process does.)"""
    from windtunnel.config.sweep import ExecutorConfig
    from windtunnel.executors import local

    monkeypatch.setattr(local, "_visible_gpus", lambda: ["0"])
    ex = local.LocalExecutor(ExecutorConfig(type="local"))
    proc = ex._spawn(0, ["--standby", str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        env = dict(kv.split("=", 1) for kv in open(f"/proc/{proc.pid}/environ").read().split("\0") if "=" in kv)
    finally:
        proc.stdin.close()  # EOF: the standby worker exits
        proc.wait(timeout=60)
    assert float(env["WINDTUNNEL_MEMORY_WAIT_S"]) >= 30 and env["CUDA_VISIBLE_DEVICES"] == "0"

    cfg = tiny_trial()
    need = memory.estimate(cfg.model, 256, 8 * 32, device="cpu").total
    monkeypatch.setattr(memory, "WAIT_POLL_S", 0.01)

    def exiting(polls_until_free):
        frees = itertools.chain(itertools.repeat(0.5 * need, polls_until_free), itertools.repeat(2 * need))
        return lambda device: (next(frees), "test")

    monkeypatch.setattr(memory, "free_bytes", exiting(5))
    monkeypatch.delenv("WINDTUNNEL_MEMORY_WAIT_S", raising=False)
    with pytest.raises(ConfigError, match=r"^model: this trial needs"):
        memory.check(cfg.model, 256, 8 * 32, cpu())
    monkeypatch.setenv("WINDTUNNEL_MEMORY_WAIT_S", env["WINDTUNNEL_MEMORY_WAIT_S"])
    monkeypatch.setattr(memory, "free_bytes", exiting(5))
    assert memory.check(cfg.model, 256, 8 * 32, cpu()).total == need
    monkeypatch.setenv("WINDTUNNEL_MEMORY_WAIT_S", "0.1")  # memory that never comes: the same one line, later
    monkeypatch.setattr(memory, "free_bytes", exiting(10**9))
    with pytest.raises(ConfigError, match=r"^model: this trial needs"):
        memory.check(cfg.model, 256, 8 * 32, cpu())


def cpu():
    import torch

    return torch.device("cpu")


def test_the_transfer_plan_and_the_sweep_use_the_one_memory_model(tmp_path):
    """The transfer plan's memory rows are memory.estimate's (they had their own formula, the
    sweep another): a change to one model shows in both."""
    import yaml

    from windtunnel import transfer
    from windtunnel.config.trial import to_dict

    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"sweep": "t", "number": 0, "value": 3.0, "trial": to_dict(tiny_trial())}))
    target = load_target("tiny-cpu", ["seq_len=16"])
    plan = transfer.plan(transfer.load_winner(str(best)), target,
                         transfer.Laws(batch_size=256, tokens=12 * 256))
    micro = plan.value("micro-batch (sequences per GPU)")
    est = memory.estimate(plan.trial.model, target.vocab_size, micro * 16, world=target.world, fsdp=True)
    assert plan.memory["states"] == est.states and plan.memory["total"] == pytest.approx(est.total)


def test_a_worker_the_oom_killer_ended_is_reported_as_out_of_memory(tmp_path, monkeypatch):
    """It read 'worker exited with status -9 before writing a result', which never says memory."""
    from windtunnel.executors import WorkerLost, local

    kills = iter([7, 8])
    monkeypatch.setattr(local, "oom_kills", lambda: next(kills))
    proc = subprocess.Popen(["sleep", "60"])
    handle = local.LocalHandle(proc, tmp_path, 0)
    proc.send_signal(signal.SIGKILL)
    with pytest.raises(WorkerLost, match=r"^out of memory: the kernel's OOM killer ended the worker"):
        handle.result()
