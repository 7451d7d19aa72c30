"""launch.sbatch submitted to the real single-node Slurm (fixture `slurm_cluster`): the tiny-cpu
export (2 gloo processes under srun + torchrun) trains a few steps, checkpoints, and the job's
output file holds rank 0's progress lines. test_transfer.py checks the script's quoting."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port, unavailable
from windtunnel.config.trial import DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, TrialConfig, to_dict

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

BIN = Path(sys.executable).parent
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
        "DEADLINE")


def _job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as {field: value} (MinJobAge keeps a finished job there 5 minutes)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    return dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)


def test_launch_sbatch_trains_under_slurm(tmp_path, slurm_cluster):
    if shutil.which("torchrun", path=str(BIN)) is None:
        unavailable(f"torchrun not installed in {BIN}")
    proxy = TrialConfig(model=ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, kernels="torch"),
                        data=DataConfig(max_bytes=300_000), optim=OptimConfig(lr=0.01),
                        schedule=ScheduleConfig(kind="wsd", warmup=0.1, decay=0.2),
                        train=TrainConfig(tokens=10_000, batch_size=8, device="cpu", seed=1))
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"sweep": "t", "number": 0, "value": 3.0, "trial": to_dict(proxy)}))
    out = tmp_path / "export"
    # sbatch hands the job this environment: the venv's windtunnel and torchrun on PATH
    env = {k: v for k, v in os.environ.items() if k != "WINDTUNNEL_EXPORT_DIR"}
    env.update(PATH=f"{BIN}:{env['PATH']}", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo")
    # max_hours 0.05: the job's own time limit is 3 minutes, so a hung run ends by itself
    r = subprocess.run([sys.executable, "-m", "windtunnel.cli", "transfer", str(best), "--target", "tiny-cpu",
                        "run_name=sbatch-test", "checkpoint_every=8192", f"partition={slurm_cluster.partition}",
                        "max_hours=0.05", "--batch-size", "2048", "--tokens", str(24 * 2048), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --time=0:03:00\n" in (out / "launch.sbatch").read_text()

    submit = tmp_path / "submit"  # the job's cwd: its output file lands here
    submit.mkdir()
    # 2 ranks × micro-batch 8 × accumulation 4 = 64 sequences a step; a checkpoint every 4 steps
    r = subprocess.run(["sbatch", "--parsable", str(out / "launch.sbatch"), "large_run.micro_batch=8",
                        "large_run.grad_accum=4", "train.eval_every=8192", "large_run.stop_after_steps=6"],
                       cwd=submit, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    output = submit / f"sbatch-test-{job_id}.out"
    deadline, state = time.monotonic() + 150, {}
    try:
        while time.monotonic() < deadline:
            state = _job(job_id)
            if state.get("JobState") in DONE:
                break
            time.sleep(1)
        else:
            pytest.fail(f"job {job_id} not done after 150 s ({state.get('JobState')}, {state.get('Reason')}): "
                        f"{output.read_text()[-3000:] if output.exists() else 'no output file'}")
    finally:
        if state.get("JobState") not in DONE:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    log = output.read_text() if output.exists() else f"no {output.name} in {submit}"
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), f"{state.get('Reason')}: {log[-3000:]}"

    run = out / "runs" / "sbatch-test"
    assert "windtunnel train: sbatch-test: training 24 steps of 2,048 tokens on 2 cpu processes" in log, log[-3000:]
    assert "windtunnel train: step 4/24" in log, log[-3000:]  # the progress line of the evaluation at step 4
    result = json.loads([line for line in log.splitlines() if line.startswith("{")][-1])
    assert (result["start_step"], result["step"], result["done"]) == (0, 6, False), result
    records = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    start = [r for r in records if r.get("event") == "start"]
    assert len(start) == 1 and start[0]["world"] == 2, start
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000000004"
