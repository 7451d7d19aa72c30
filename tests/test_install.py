"""What `make install` installs: every package the code imports is declared in pyproject.toml, and
constraints.txt (which `make install` passes to pip) pins each declared one."""
import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# imports whose distribution may not be installed here (an optional extra), by name
NOT_INSTALLED = {"liger_kernel": "liger-kernel"}
# left to `make install`'s own choice of build (CPU or CUDA), so not pinned
UNPINNED = {"torch", "triton"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extras: tuple[str, ...]) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]
    return {norm(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in reqs}


def imported(folders: list[str]) -> dict[str, str]:
    """Top-level third-party modules imported under folders -> a file importing it."""
    out = {}
    for folder in folders:
        for f in (ROOT / folder).rglob("*.py"):
            # modules beside the file (tests/helpers.py, a script's helpers.py), run from its folder: not packages
            local = {p.stem for p in [*f.parent.glob("*.py"), *(ROOT / "tests").glob("*.py")]} | \
                {p.name for p in f.parent.iterdir() if p.is_dir()}
            for node in ast.walk(ast.parse(f.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for n in names:
                    top = n.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "windtunnel" and top not in local:
                        out.setdefault(top, str(f.relative_to(ROOT)))
    return out


def test_every_imported_package_is_declared():
    """Catches an import whose package only arrives as another's dependency (sqlalchemy via mlflow):
    the code's direct imports are the code's to declare."""
    dists = packages_distributions()
    for folders, extras in ((["windtunnel", "kernels"], ("hf", "bench")), (["tests"], ("test", "hf", "bench"))):
        have = declared(extras)
        for module, where in imported(folders).items():
            names = {norm(d) for d in dists.get(module, [NOT_INSTALLED.get(module, module)])}
            assert names & have, f"{where} imports {module} ({', '.join(sorted(names))}), which pyproject.toml does not declare"


def test_constraints_pin_every_declared_package_and_make_install_uses_them():
    pins = {norm(line.split("==")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    missing = declared(("test", "hf")) - pins - UNPINNED
    assert not missing, f"constraints.txt pins no version of {sorted(missing)} (make constraints)"
    assert {"ray", "submitit", "sqlalchemy"} <= pins
    install = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt -e '.[test,hf]'" in install and "import ray, submitit" in install
