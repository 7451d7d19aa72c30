"""The core (model, parametrization, schedule, data, kernels, and the trainer and optimizer built
on them) imports nothing from orchestration: a trial runs where no search, executor, tracker or
CLI is installed (a GPU host without optuna or mlflow), and none of them can reach into it."""
import subprocess
import sys

CORE = ["windtunnel.model", "windtunnel.parametrization", "windtunnel.schedule", "windtunnel.data",
        "windtunnel.kernels", "windtunnel.trainer", "windtunnel.optim", "windtunnel.config"]
ORCHESTRATION_PACKAGES = ("optuna", "ray", "mlflow", "submitit", "hydra", "omegaconf")
ORCHESTRATION_MODULES = ("windtunnel.sweep", "windtunnel.search", "windtunnel.executors", "windtunnel.tracking",
                         "windtunnel.commands", "windtunnel.cli", "windtunnel.configure", "windtunnel.clusters",
                         "windtunnel.worker", "windtunnel.results", "windtunnel.bench")


def test_the_core_loads_no_orchestration():
    code = (f"import sys\nfor m in {CORE!r}: __import__(m)\n"
            f"print('\\n'.join(sorted(n for n in sys.modules if n.split('.')[0] in {ORCHESTRATION_PACKAGES!r} "
            f"or n.startswith({ORCHESTRATION_MODULES!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"the core imported orchestration modules:\n{out.stdout}"
