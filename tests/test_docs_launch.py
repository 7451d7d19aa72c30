"""docs/launch.md's CPU path, from the demo's sweep to a launched and resumed large run, run as
written: a doc that drifts from the CLI fails here. And launch.sh without the environment active."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, unavailable

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def documented_commands() -> list[str]:
    text = (ROOT / "docs" / "launch.md").read_text()
    block = re.search(r"<!-- cpu-path[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert block, "docs/launch.md lost its cpu-path block"
    return [line for line in block[1].splitlines() if line.strip()]


def test_the_documented_cpu_path_runs_as_written(tmp_path):
    """Each line of the block runs in bash from a fresh folder, in order, and must exit 0. `make demo`
    alone is replaced, by the same sweep cut to 2 trials of 20k tokens (the demo itself is a
    minute of CPU; `make demo` is what CI runs first anyway). The two launches run without the
    environment on PATH: launch.sh must find the venv's torchrun (it failed `exec: torchrun: not
    found`). The second launch must resume where the first saved, losing no step."""
    if shutil.which("torchrun", path=str(BIN)) is None:
        unavailable(f"torchrun not installed in {BIN}")
    commands = documented_commands()
    assert commands[0] == "make demo" and any("launch.sh" in c for c in commands), commands
    active = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
              "MASTER_PORT": str(free_port())}
    inactive = {**active, "PATH": ":".join(p for p in os.environ["PATH"].split(":")
                                           if p and not (Path(p) / "torchrun").exists() and not (Path(p) / "windtunnel").exists())}
    outputs = []
    for command in commands:
        if command == "make demo":
            argv = [sys.executable, "-m", "windtunnel.cli", "sweep", "quickstart", "-q", "n_trials=2",
                    "train.tokens=20000", "train.eval_every=10000", "tracking.enabled=false"]
            r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=active, timeout=600)
        else:
            env = inactive if "launch.sh" in command else active
            r = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, env=env,
                               timeout=600)
        assert r.returncode == 0, f"{command}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        outputs.append(r)
    launches = [json.loads(r.stdout.strip().splitlines()[-1]) for c, r in zip(commands, outputs) if "launch.sh" in c]
    assert [(x["start_step"], x["step"], x["stopped"]) for x in launches] == [(0, 10, "steps"), (10, 20, "steps")]
    log = [json.loads(line) for line in (tmp_path / "run" / "runs" / "cpu-demo" / "loss.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in log if "loss" in r) == list(range(1, 21))  # no step lost, none twice
    assert [r["step"] for r in log if r.get("event") == "start"] == [0, 10]


def test_launch_sh_without_torchrun_says_what_to_activate(tmp_path):
    """Without the environment active and without the one transfer ran in, one line naming the
    activate script (it was `exec: torchrun: not found`)."""
    from windtunnel import export

    script = tmp_path / "launch.sh"
    text = export._TORCHRUN.format(activate="/opt/env/bin/activate")
    script.write_text(f"set -euo pipefail\nVENV_BIN={tmp_path / 'gone'}\n{text}\necho started\n")
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 127 and r.stdout == "" and r.stderr.splitlines() == [
        "launch.sh: torchrun not found: activate the environment windtunnel is installed in "
        "(source /opt/env/bin/activate)"], r.stderr
