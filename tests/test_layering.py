"""The core (model, parametrization, schedule, data, kernels, and the trainer and optimizer built
on them) imports nothing from orchestration: a trial runs where no search, executor, tracker or
CLI is installed (a GPU host without optuna or mlflow), and none of them can reach into it.

Checked twice: what loads when the core is imported, and every module's static imports (the
source's `import` statements, those inside functions too), so an import that would run only on
some path fails here as well."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORE = ["windtunnel.model", "windtunnel.parametrization", "windtunnel.schedule", "windtunnel.data",
        "windtunnel.kernels", "windtunnel.trainer", "windtunnel.optim", "windtunnel.config.trial"]
ORCHESTRATION_PACKAGES = ("optuna", "ray", "mlflow", "submitit", "hydra", "omegaconf")
ORCHESTRATION_MODULES = ("windtunnel.sweep", "windtunnel.search", "windtunnel.executors", "windtunnel.tracking",
                         "windtunnel.commands", "windtunnel.cli", "windtunnel.config.hydra",
                         "windtunnel.worker", "windtunnel.results", "windtunnel.bench")

# What the core may import from the package: itself, and the leaves every layer uses (the trial
# schema, the error type, safe file writes, file locks). Anything else is orchestration.
CORE_MODULES = ("windtunnel.model", "windtunnel.parametrization", "windtunnel.schedule", "windtunnel.data",
                "windtunnel.optim", "windtunnel.trainer", "windtunnel.kernels",
                "windtunnel.checkpoints", "windtunnel.memory",  # saved states; the memory model
                "windtunnel.prose")  # a data source: the prose corpus's extraction
LEAVES = ("windtunnel.config.trial", "windtunnel.errors", "windtunnel.files", "windtunnel.locks")
# Between transfer (the plan), export (its files) and the large run (the trainer a cluster runs),
# the one arrow: export writes transfer's plan. The large run depends on neither.
TRIO = ("windtunnel.transfer", "windtunnel.export", "windtunnel.large_run")
TRIO_ALLOWED = {("windtunnel.export", "windtunnel.transfer")}
# Hydra and OmegaConf stay behind one adapter: every other module reads plain dicts and dataclasses.
HYDRA_PACKAGES = ("hydra", "omegaconf")
HYDRA_ADAPTER = "windtunnel.config.hydra"


def test_the_core_loads_no_orchestration():
    code = (f"import sys\nfor m in {CORE!r}: __import__(m)\n"
            f"print('\\n'.join(sorted(n for n in sys.modules if n.split('.')[0] in {ORCHESTRATION_PACKAGES!r} "
            f"or n.startswith({ORCHESTRATION_MODULES!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"the core imported orchestration modules:\n{out.stdout}"


def _modules() -> dict[str, Path]:
    """Module name -> source file, for windtunnel/ and kernels/ (installed as windtunnel.kernels)."""
    out = {}
    for base, prefix in ((ROOT / "windtunnel", ["windtunnel"]), (ROOT / "kernels", ["windtunnel", "kernels"])):
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("").parts
            if base.name == "windtunnel" and rel[0] == "kernels":
                continue  # the symlink to kernels/
            parts = prefix + [p for p in rel if p != "__init__"]
            out[".".join(parts)] = path
    return out


def static_imports(name: str, path: Path, known: set[str]) -> dict[str, int]:
    """Every module `name`'s source imports (windtunnel's modules and top-level packages) -> line."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                found.setdefault(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.setdefault(module, node.lineno)
            for a in node.names:  # `from windtunnel import data`: the submodule is what is imported
                if f"{module}.{a.name}" in known:
                    found.setdefault(f"{module}.{a.name}", node.lineno)
    return found


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_static_import_runs_from_the_core_or_kernels_to_orchestration():
    """A mutant caught here: `from windtunnel.tracking import ...` inside a trainer function (it
    loads only when that function runs, so the import-time check above misses it), or a kernel
    module importing the trainer (kernels/bench.py did, for its trainer-step rows)."""
    modules = _modules()
    known = set(modules)
    bad = []
    for name, path in sorted(modules.items()):
        if not _under(name, CORE_MODULES):
            continue
        allowed = ("windtunnel.kernels", "windtunnel.errors") if _under(name, ("windtunnel.kernels",)) \
            else CORE_MODULES + LEAVES
        for imported, line in static_imports(name, path, known).items():
            top = imported.split(".")[0]
            if top in ORCHESTRATION_PACKAGES or (top == "windtunnel" and imported != "windtunnel"
                                                 and not _under(imported, allowed)):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {imported}")
    assert bad == [], "the core or the kernels import orchestration:\n" + "\n".join(bad)


def test_transfer_export_and_the_large_run_import_one_way():
    """export may use transfer's plan; transfer and the large run import neither of the others
    (the large run imported transfer.slug, export large_run.resume_changes: both fail here)."""
    modules = _modules()
    known = set(modules)
    edges = {(a, b) for a in TRIO for b in static_imports(a, modules[a], known) if b in TRIO and b != a}
    assert edges <= TRIO_ALLOWED, sorted(edges - TRIO_ALLOWED)


def test_only_the_hydra_adapter_imports_hydra():
    """A mutant caught here: `from omegaconf import OmegaConf` in transfer.py, or transfer.py and
    large_run.py importing the adapter for its YAML reader (they did, as windtunnel.configure)."""
    modules = _modules()
    known = set(modules)
    bad = []
    for name, path in sorted(modules.items()):
        for imported, line in static_imports(name, path, known).items():
            if name != HYDRA_ADAPTER and imported.split(".")[0] in HYDRA_PACKAGES:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {imported}")
            if imported == HYDRA_ADAPTER and _under(name, ("windtunnel.transfer", "windtunnel.large_run")):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {imported}")
    assert bad == [], "only windtunnel/config/hydra.py may import hydra or omegaconf:\n" + "\n".join(bad)
    assert any(i.split(".")[0] in HYDRA_PACKAGES for i in static_imports(HYDRA_ADAPTER, modules[HYDRA_ADAPTER], known))
