"""`windtunnel train` under torchrun (2 processes, gloo, CPU): export, stop after a checkpoint,
relaunch, and compare with an uninterrupted run."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import unavailable
from helpers import wait_for
from windtunnel.config.trial import DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, TrialConfig, to_dict
from windtunnel.data import identity, load

pytestmark = pytest.mark.distributed

BIN = Path(sys.executable).parent


def curve(run_dir: Path) -> tuple[dict[int, float], list[dict]]:
    losses, events = {}, []
    for line in (run_dir / "loss.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "event" in r:
            events.append(r)
        elif "loss" in r:
            assert r["step"] not in losses, f"step {r['step']} logged twice"
            losses[r["step"]] = r["loss"]
    return losses, events


def export(tmp_path: Path, proxy: TrialConfig, *transfer_args: str) -> tuple[Path, dict]:
    """`windtunnel transfer` of proxy (as a sweep's best.yaml) to the tiny-cpu target: (export dir, env)."""
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"sweep": "t", "number": 0, "value": 3.0, "trial": to_dict(proxy)}))
    out = tmp_path / "export"
    # MASTER_PORT 0: torchrun's rendezvous store binds a free port itself (a port found free here
    # and passed on could be taken by another test's process before torchrun bound it)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MASTER_PORT": "0",
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    r = subprocess.run([sys.executable, "-m", "windtunnel.cli", "transfer", str(best), "--target", "tiny-cpu",
                        "--out", str(out), *transfer_args], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return out, env


def long_export(tmp_path: Path, name: str, checkpoint_every: int) -> tuple[Path, dict]:
    """A one-layer proxy exported with far more steps than a test runs: 16 sequences of 16 tokens a step."""
    proxy = TrialConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=16, kernels="torch"),
                        data=DataConfig(max_bytes=300_000), train=TrainConfig(device="cpu"))
    return export(tmp_path, proxy, f"run_name={name}", "seq_len=16", f"checkpoint_every={checkpoint_every}",
                  "--batch-size", "256", "--tokens", str(100_000 * 256))


def launch_until(out: Path, env: dict, run: Path, steps: int, timeout: float = 90,
                 new_session: bool = False) -> subprocess.Popen:
    """launch.sh in the background, returned once rank 0 has logged `steps` steps; fails (and
    stops it) when that does not happen within `timeout`. new_session: in a process group of its
    own, as a terminal's foreground job is (for Ctrl-C: os.killpg)."""
    # a terminal's foreground job starts with SIGINT at its default; pytest run from a background
    # job would hand launch.sh an ignored SIGINT, which bash cannot trap (torchrun's ranks run in
    # sessions of their own, so only launch.sh's trap hands them Ctrl-C)
    # (a handler of this process's own becomes the default in the child at exec; no preexec_fn)
    before = signal.signal(signal.SIGINT, signal.default_int_handler) if new_session else None
    try:
        p = subprocess.Popen(["bash", str(out / "launch.sh")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=new_session)
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)
    log = run / "loss.jsonl"
    try:
        wait_for(lambda: log.exists() and log.read_text().count('"loss"') >= steps, timeout,
                 f"rank 0 to log {steps} steps", p)
    except BaseException:
        for pid in [*rank_pids(p.pid).values(), p.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
        raise
    return p


@pytest.fixture(autouse=True)
def _torchrun():
    """Every test here launches torchrun: missing, it skips (fails in CI)."""
    if shutil.which("torchrun", path=str(BIN)) is None:
        unavailable(f"torchrun not installed in {BIN}")


def torchrun(out, env, *overrides):
    """The export's train.yaml under torchrun with two ranks, as launch.sh runs it, without its check."""
    return subprocess.run([str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
                           "--rdzv_endpoint", "localhost:0", "--rdzv_id", "direct", "-m", "windtunnel.cli",
                           "train", str(out / "train.yaml"), *overrides],
                          capture_output=True, text=True, env=env, timeout=120)


def test_torchrun_two_processes_resume_matches_uninterrupted(tmp_path):
    proxy = TrialConfig(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, kernels="torch"),
        data=DataConfig(max_bytes=300_000),
        optim=OptimConfig(lr=0.01),
        schedule=ScheduleConfig(kind="wsd", warmup=0.1, decay=0.2),
        train=TrainConfig(tokens=10_000, batch_size=8, device="cpu", seed=1),
    )
    out, env = export(tmp_path, proxy, "run_name=resume-test", "checkpoint_every=8192",
                      "--batch-size", "2048", "--tokens", str(24 * 2048))
    # 2 ranks × micro-batch 8 × accumulation 4 = 64 sequences of 32 tokens
    common = ["large_run.micro_batch=8", "large_run.grad_accum=4", "train.eval_every=8192"]

    def launch(*extra):
        r = subprocess.run(["bash", str(out / "launch.sh"), *common, *extra], capture_output=True, text=True,
                           env=env, timeout=120)
        errors = [line for line in r.stderr.splitlines() if "rror" in line or "abort" in line.lower()]
        assert r.returncode == 0, "\n".join(errors[:20]) + r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    # a launch that dies after step 10: the latest checkpoint is step 8 (every 8192 tokens = 4 steps)
    first = launch("large_run.stop_after_steps=10")
    assert first["step"] == 10 and not first["done"]
    run_a = out / "runs" / "resume-test"
    assert (run_a / "checkpoints" / "latest").read_text().strip() == "step-000000008"
    # relaunched with other settings, it would load the old state under them: a new width crashed
    # in the loader, a new batch size resumed silently (the step's tokens changed, the schedule with
    # them). Every rank stops with one line naming each change; a branch (init_from) may change the
    # schedule or budget, not the model. launch.sh's check stops it with one line before torchrun;
    # under torchrun itself (no check) every rank stops with that line.
    def refused(*extra):
        r = subprocess.run(["bash", str(out / "launch.sh"), *common, *extra], capture_output=True, text=True,
                           env=env, timeout=120)
        lines = [line for line in r.stderr.splitlines() if "windtunnel train: " in line]
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
        return lines[0]

    ranks = torchrun(out, env, *common, "model.d_model=128")
    lines = [line for line in ranks.stderr.splitlines() if "windtunnel train: " in line]
    assert ranks.returncode != 0 and len(lines) == 2 and "(model.d_model 64 -> 128)" in lines[0], ranks.stderr[-3000:]
    msg = refused("model.d_model=128", "train.batch_size=128", "large_run.grad_accum=8")
    assert msg.endswith(f"model.d_model: {run_a} was trained with other settings (model.d_model 64 -> 128; "
                        "train.batch_size 64 -> 128); set them back to resume it, or export a new run")
    msg = refused("optim.lr=0.02", "train.save_at=[4096]")  # new save points are free; a new lr is not
    assert "(optim.lr 0.01 -> 0.02); set them back to resume it, or branch on purpose: a new run_dir with " \
           f"train.init_from={run_a / 'checkpoints' / 'step-000000008'}" in msg
    msg = refused(f"large_run.run_dir={tmp_path / 'branch'}", f"train.checkpoint_dir={tmp_path / 'branch' / 'ck'}",
                  f"train.init_from={run_a / 'checkpoints' / 'step-000000008'}", "model.n_heads=2")
    assert "train.init_from: " in msg and "holds another model or batch (model.n_heads 4 -> 2)" in msg
    # a new export over it is refused now, while the old train.yaml is still there; the same one is not
    args = ["run_name=resume-test", "checkpoint_every=8192", "--batch-size", "2048"]
    r = subprocess.run([sys.executable, "-m", "windtunnel.cli", "transfer", str(tmp_path / "best.yaml"), "--target",
                        "tiny-cpu", "--out", str(out), *args, "--tokens", str(48 * 2048)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"--out: {out} holds run 'resume-test' with a checkpoint (step-000000008) trained with other settings" in r.stderr
    assert "train.tokens 49152 -> 98304" in r.stderr
    assert export(tmp_path, proxy, *args, "--tokens", str(24 * 2048))[0] == out
    second = launch()
    assert second == {**second, "start_step": 8, "resumed_from": "step-000000008", "done": True, "step": 24}
    # the uninterrupted run, same seeds
    run_b = tmp_path / "uninterrupted"
    launch(f"large_run.run_dir={run_b}", f"train.checkpoint_dir={run_b / 'checkpoints'}")

    a, events = curve(run_a)
    b, _ = curve(run_b)
    assert [e["step"] for e in events if e["event"] == "start"] == [0, 8]
    assert events[1]["resumed_from"] == "step-000000008" and events[1]["world"] == 2
    # each launch logs which tokens it trains on (windtunnel.bench.validate_target compares them)
    assert events[0]["data"] == events[1]["data"] == identity(load(proxy.data).manifest)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    for step in b:  # float32 on CPU, same reduction order: equal to rounding
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), step
    assert b[24] < b[1] - 1.0  # it learns
    # the last stable state is kept for decay branches; old step checkpoints are pruned (keep_last 2)
    names = sorted(p.name for p in (run_a / "checkpoints").iterdir())
    stable = yaml.safe_load((out / "train.yaml").read_text())["train"]["save_at"]
    assert f"stable-{stable[0]}" in names and "step-000000024" in names and "step-000000004" not in names


def test_ctrl_c_saves_the_current_step_on_every_rank_and_the_relaunch_resumes_there(tmp_path):
    """Ctrl-C (SIGINT to the launch's process group, as a terminal sends it) on launch.sh: every rank
    saves at the end of its step; one line, no traceback, exit 130. It printed torchrun's
    SignalException traceback, exited 1 and saved nothing (the relaunch lost every step since the
    last checkpoint). Then large_run.steps=2 trains two more and saves; an absolute stop at or below
    the saved step is refused (it trained nothing and exited 0). SIGTERM: the test below."""
    out, env = long_export(tmp_path, "sig", checkpoint_every=100_000_000)
    run = out / "runs" / "sig"
    p = launch_until(out, env, run, 3, new_session=True)
    err = ""
    try:
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    losses, events = curve(run)
    assert events and events[-1]["event"] == "sigint", f"events {events[-3:]}, torchrun: {err[-3000:]}"
    last = max(losses)
    assert 3 <= last < 100_000 and events[-1]["step"] == last, (last, events[-3:])
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{last:09d}"
    assert p.returncode == 130 and "Traceback" not in err and "SignalException" not in err, err[-3000:]
    said = [line for line in err.splitlines() if "stopped by" in line]
    assert said == [f"windtunnel train: stopped by SIGINT at step {last:,} of 100,000: saved "
                    f"{run / 'checkpoints' / latest}; the same launch again resumes there"], err[-3000:]

    def launch(*extra):
        return subprocess.run(["bash", str(out / "launch.sh"), *extra], capture_output=True, text=True, env=env,
                              timeout=120)

    r = launch(f"large_run.stop_after_steps={last}")  # refused by launch.sh's check, before torchrun
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert f"large_run.stop_after_steps: an absolute step, and {run} is already at step {last} (got {last}); " \
           "large_run.steps=N trains N more steps, then saves" in r.stderr
    r = launch("train.tokens=1000")  # below train.yaml's save_at: it blamed train.save_at, not the resume
    assert r.returncode == 2 and f"train.tokens: {run} was trained with train.tokens 25600000; set it back" in r.stderr
    r = launch("large_run.steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert (result["start_step"], result["step"], result["stopped"]) == (last, last + 2, "steps")
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{last + 2:09d}"  # saved before it stopped
    losses, events = curve(run)  # no step lost, none logged twice
    assert sorted(losses) == list(range(1, last + 3))
    assert [e["event"] for e in events] == ["start", "sigint", "start", "steps"]


def rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the workers under `parent` (launch.sh, or torchrun): its descendants with RANK
    in their environment."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    ranks, todo = {}, list(children.get(parent, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks.update((int(e[5:]), pid) for e in env if e.startswith(b"RANK="))
    return ranks


def test_one_rank_killed_the_relaunch_resumes_from_the_last_checkpoint(tmp_path):
    """Rank 1 SIGKILLed after step 10 (a checkpoint every 4 steps): the relaunch resumes from the
    last whole checkpoint and logs the losses of an uninterrupted run. Mutants caught: LargeRun.load
    restoring the model but not the optimizer state (set_model_state_dict alone), and batches drawn
    from one generator per launch (LargeRun.batch's generator seeded without the step)."""
    import signal

    out, env = long_export(tmp_path, "kill", checkpoint_every=1024)  # a checkpoint every 4 steps
    run = out / "runs" / "kill"
    p = launch_until(out, env, run, 10)
    err = ""
    try:
        os.kill(rank_pids(p.pid)[1], signal.SIGKILL)  # rank 1 only: rank 0 is left mid-collective
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0, "torchrun should report the lost rank"
    logged = max(curve(run)[0])
    latest = (run / "checkpoints" / "latest").read_text().strip()
    saved = int(latest.removeprefix("step-"))
    assert 8 <= saved <= logged and saved % 4 == 0, (latest, logged, err[-2000:])

    # what a rank killed mid-save leaves (the kill above may or may not have landed in one)
    (run / "checkpoints" / ".step-000000999.tmp" / "half").mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["bash", str(out / "launch.sh"), f"large_run.stop_after_steps={saved + 4}"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert (result["start_step"], result["resumed_from"], result["step"]) == (saved, latest, saved + 4)
    assert not list((run / "checkpoints").glob(".*.tmp")), "the relaunch clears half-written saves"
    losses, events = curve(run)  # curve() fails on a step logged twice: the relaunch dropped the killed tail
    assert sorted(losses) == list(range(1, saved + 5))
    # the losses an uninterrupted run logs (its own folders), bit for bit: same world, one thread per
    # rank, the data a function of the step, and the checkpoint holds weights and Adam states whole
    ref = tmp_path / "uninterrupted"
    r = subprocess.run(["bash", str(out / "launch.sh"), f"large_run.stop_after_steps={saved + 4}",
                        f"large_run.run_dir={ref}", f"train.checkpoint_dir={ref / 'checkpoints'}"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses == curve(ref)[0]
    assert [e["step"] for e in events if e["event"] == "start"] == [0, saved]
    # what results/multigpu reads from such a log: the last launch's rate, where it resumed
    from windtunnel.bench.large_run_stats import throughput

    stats = throughput(run / "loss.jsonl", skip=0)
    assert (stats["world"], stats["launches"], stats["resumed_at_step"], stats["steps"]) == (2, 2, saved, saved + 4)
    assert stats["tokens_per_s_per_gpu"] > 0


def test_a_second_launch_of_a_running_run_stops_and_touches_nothing(tmp_path):
    """launch.sh twice (or a job submitted twice): the second would delete the first one's save in
    progress and cut its loss log; it stops with one line naming the first (launch.sh's check;
    under torchrun itself, every rank)."""
    import signal

    out, env = long_export(tmp_path, "twice", checkpoint_every=1024)
    run = out / "runs" / "twice"
    first = launch_until(out, env, run, 3)
    try:
        second = subprocess.run(["bash", str(out / "launch.sh")], capture_output=True, text=True,
                                env=env, timeout=120)
        ranks = torchrun(out, env)  # without launch.sh's check: every rank stops
        assert first.poll() is None, "the first launch must still be running for this test to mean anything"
        holder = f"pid {rank_pids(first.pid)[0]} "
        for r, n in ((second, 1), (ranks, 2)):
            refusals = [line for line in r.stderr.splitlines() if "another launch is training this run" in line]
            assert r.returncode != 0 and len(refusals) == n and any(holder in line for line in refusals), r.stderr[-3000:]
        logged = max(curve(run)[0])
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    losses, events = curve(run)
    assert events[-1]["event"] == "sigterm", err[-3000:]
    # SIGTERM to launch.sh saves like Ctrl-C: one line, no traceback (torchrun's), exit 143
    assert first.returncode == 143 and "Traceback" not in err and err.count("stopped by SIGTERM at step") == 1, err
    assert sorted(losses) == list(range(1, max(losses) + 1)) and max(losses) >= logged  # no step cut from the log
    assert [e["event"] for e in events] == ["start", "sigterm"]


def test_a_damaged_checkpoint_is_named_and_the_relaunch_resumes_from_the_previous(tmp_path):
    """Eight bytes overwritten in rank 1's shard of the newest DCP checkpoint loaded silently.
    Now its manifest's SHA-256 catches it: one line, the folder moved aside, and the relaunch
    resumes from the checkpoint before it, which keep_last=1 kept. Mutants caught: no check on
    resume (it resumes at step 8), and pruning the previous one (no checkpoint to fall back to)."""
    out, env = long_export(tmp_path, "dmg", checkpoint_every=1024)  # a checkpoint every 4 steps
    run, ck = out / "runs" / "dmg", out / "runs" / "dmg" / "checkpoints"

    def launch(*extra):
        r = subprocess.run(["bash", str(out / "launch.sh"), "large_run.keep_last=1", *extra], capture_output=True,
                           text=True, env=env, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        return r, json.loads(r.stdout.strip().splitlines()[-1])

    launch("large_run.steps=8")
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step-000000004", "step-000000008"]
    listed = (ck / "step-000000008" / "checksums.sha256").read_text()
    assert "  .metadata\n" in listed and "  meta.json\n" in listed and "  __1_0.distcp\n" in listed
    shard = ck / "step-000000008" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:len(data) // 2 + 8] = b"\x7f" * 8
    shard.write_bytes(bytes(data))

    r, result = launch("large_run.steps=2")
    said = [line for line in r.stderr.splitlines() if " is damaged (" in line]
    assert len(said) == 1 and said[0].startswith(f"windtunnel: train.checkpoint_dir: {ck / 'step-000000008'} is "
                                                 "damaged (__1_0.distcp: its SHA-256 is "), r.stderr[-3000:]
    assert said[0].endswith(f"; moved to damaged-step-000000008, resuming from the previous checkpoint "
                            f"{ck / 'step-000000004'}"), said
    assert (result["start_step"], result["resumed_from"], result["step"]) == (4, "step-000000004", 6)
    assert (ck / "latest").read_text().strip() == "step-000000006" and (ck / "damaged-step-000000008").is_dir()
    losses, events = curve(run)
    assert sorted(losses) == list(range(1, 7)) and [e["step"] for e in events if e["event"] == "start"] == [0, 4]
