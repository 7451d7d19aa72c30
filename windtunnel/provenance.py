"""Where a result came from: code revision, package versions, device. Stored with every trial."""
from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path


@functools.cache
def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def device_name(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def provenance(device=None) -> dict:
    versions = {}
    for pkg in ("windtunnel", "torch", "triton", "optuna", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"git": git_revision(), "host": platform.node(), "python": platform.python_version(),
            "packages": versions, "device": device_name(device) if device is not None else ""}


TAGGED_PACKAGES = ("windtunnel", "torch", "triton", "numpy", "optuna", "mlflow", "ray", "submitit", "transformers")


def tags() -> dict[str, str]:
    """A tracked run's provenance as MLflow tags: the code's commit (MLflow's own tag, which its UI
    shows; '+dirty' when the tree had uncommitted changes), this host, Python and package versions."""
    git = git_revision()
    out = {"mlflow.source.git.commit": git.removesuffix("+dirty"), "windtunnel.git": git,
           "windtunnel.host": platform.node(), "windtunnel.python": platform.python_version()}
    for pkg in TAGGED_PACKAGES:
        try:
            out[f"windtunnel.version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {k: v for k, v in out.items() if v}
