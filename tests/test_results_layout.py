"""results/ holds results only; the commands that made them live in the package and still exist."""
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from windtunnel.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _committed(folder: str) -> list[str]:
    r = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    return r.stdout.split()


def test_results_hold_no_code_and_no_mlflow_store():
    """A script or an MLflow database committed under results/ fails here (the stores are made
    again by `windtunnel report DIR --mlflow`; scripts belong in windtunnel/bench/)."""
    bad = [f for f in _committed("results") if f.endswith((".py", ".sh", ".db")) or "/tracking/" in f]
    assert bad == [], bad


COMMAND = re.compile(r"(?:bash|python3?)\s+((?:[\w.-]+/)+[\w.-]+\.(?:sh|py))|python3?\s+-m\s+([\w.]+)")


def test_every_committed_command_names_a_script_or_module_that_exists():
    """calls.json's commands and the results' READMEs name the scripts that made each result: a
    script moved without them (e.g. gpu.sh back under results/windtunnel/) fails here."""
    texts = [(f, (ROOT / f).read_text()) for f in _committed("results") if f.endswith((".md", ".json"))]
    texts += [("README.md", (ROOT / "README.md").read_text())]
    texts += [(f, (ROOT / f).read_text()) for f in ("docs/benchmarks.md", "docs/results.md") if (ROOT / f).is_file()]
    missing, seen = [], 0
    for name, text in texts:
        for path, module in COMMAND.findall(text):
            seen += 1
            # a path under a hidden folder (.gpu/, .cache/) is a device call's local wrapper, not ours to check
            if path and not path.startswith(("/", "$", ".")) and not (ROOT / path).exists():
                missing.append(f"{name}: {path}")
            if module and module.startswith("windtunnel") and importlib.util.find_spec(module) is None:
                missing.append(f"{name}: -m {module}")
    assert seen > 20 and missing == [], missing


def test_ui_on_results_without_a_store_says_how_to_make_one(tmp_path):
    """The committed sweeps carry their study, not an MLflow store: `windtunnel ui` names the
    command that makes one."""
    from windtunnel.commands.ui import find_store

    (tmp_path / "mup_hp").mkdir()
    (tmp_path / "mup_hp" / "study.journal").write_text("")
    with pytest.raises(ConfigError, match=r"windtunnel report .*mup_hp --mlflow$"):
        find_store(tmp_path, None)
