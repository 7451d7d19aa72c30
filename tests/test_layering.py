"""The core (model, parametrization, schedule, data, kernels, and the trainer and optimizer built
on them) imports nothing from orchestration: a trial runs where no search, executor, tracker or
CLI is installed (a GPU host without optuna or mlflow), and none of them can reach into it.

Checked twice: what loads when the core is imported, and every module's static imports (the
source's `import` statements, those inside functions too), so an import that would run only on
some path fails here as well. The same static imports show that transfer, export, the HF export
and the large run depend on each other one way only, and that the fits read a sweep's folder
through results.py's layout."""
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
# Transfer (the plan), export (its files), the HF export (a run's weights as a Llama checkpoint)
# and the large run (the trainer a cluster runs), each with the modules it was split into, and the
# only arrows between them: the large run knows none of the others; export-hf reads the large
# run's config and checkpoints; export writes the plan and the HF config and checks the run's
# checkpoints; transfer and the large run share nothing.
PARTS = {
    "large run": ("windtunnel.large_run", "windtunnel.distributed", "windtunnel.run_checkpoints"),
    "hf export": ("windtunnel.hf",),
    "transfer": ("windtunnel.transfer", "windtunnel.transfer_steps", "windtunnel.transfer_lr",
                 "windtunnel.transfer_inputs"),
    "export": ("windtunnel.export",),
}
ARROWS = {("hf export", "large run"), ("export", "transfer"), ("export", "hf export"), ("export", "large run")}
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


def _arrows() -> dict[tuple[str, str], list[str]]:
    """(importing part, imported part) -> the imports that make that arrow."""
    modules = _modules()
    known = set(modules)
    layer_of = {m: part for part, ms in PARTS.items() for m in ms}
    arrows: dict[tuple[str, str], list[str]] = {}
    for name, layer in layer_of.items():
        for imported, line in static_imports(name, modules[name], known).items():
            other = layer_of.get(imported)
            if other is not None and other != layer:
                arrows.setdefault((layer, other), []).append(f"{modules[name].relative_to(ROOT)}:{line}: {imported}")
    return arrows


def test_transfer_export_hf_and_the_large_run_import_one_way():
    """No two of transfer, export, the HF export and the large run import each other both ways,
    and no arrow but ARROWS (which run one way) joins them. Mutants caught: the large run
    importing transfer.slug, export's large_run.resume_changes turned around (the large run
    importing export), transfer reading the large run's checkpoint layout."""
    assert not any(pair[::-1] in ARROWS for pair in ARROWS), "ARROWS itself runs both ways"
    arrows = _arrows()
    both = sorted({tuple(sorted(pair)) for pair in arrows if pair[::-1] in arrows})
    assert both == [], "imports running both ways: " + "; ".join(
        f"{a} <-> {b}: {arrows[(a, b)] + arrows[(b, a)]}" for a, b in both)
    other = {pair: where for pair, where in arrows.items() if pair not in ARROWS}
    assert other == {}, f"imports outside ARROWS {sorted(ARROWS)}: {other}"


def test_the_layers_hold_every_split_module():
    """A module split out of transfer, export or the large run is listed in PARTS (else the test
    above would not see its imports); every listed module exists."""
    modules = _modules()
    listed = {m for ms in PARTS.values() for m in ms}
    assert listed <= set(modules), sorted(listed - set(modules))
    family = [m for m in modules if m.split(".")[-1].startswith(("transfer", "large_run", "export", "hf"))
              and m.count(".") == 1]
    assert set(family) <= listed, sorted(set(family) - listed)


def test_the_fits_read_a_sweeps_folder_through_results_only():
    """A sweep folder's layout has one home, windtunnel/results.py: the fits and transfer's inputs
    name none of its files themselves (a string that is exactly such a name, as frames.py's
    SWEEP_SOURCES held), and reading the layout loads no optuna (the fits run without it)."""
    from windtunnel import results

    names = {results.STUDY, results.TRIALS, results.TRIALS_PARQUET, results.CURVES, results.BRANCHES,
             results.BEST, results.REPORT}
    modules = _modules()
    readers = [m for m in modules if _under(m, ("windtunnel.fits", "windtunnel.transfer_inputs"))]
    bad = [f"{modules[m].relative_to(ROOT)}:{node.lineno}: {node.value!r}" for m in readers
           for node in ast.walk(ast.parse(modules[m].read_text()))
           if isinstance(node, ast.Constant) and node.value in names]
    assert bad == [], "a sweep folder's file named outside results.py:\n" + "\n".join(bad)
    code = "import sys, windtunnel.fits, windtunnel.results; print(sorted(m for m in sys.modules if m.startswith('optuna')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


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
            if imported == HYDRA_ADAPTER and name in PARTS["transfer"] + PARTS["large run"]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {imported}")
    assert bad == [], "only windtunnel/config/hydra.py may import hydra or omegaconf:\n" + "\n".join(bad)
    assert any(i.split(".")[0] in HYDRA_PACKAGES for i in static_imports(HYDRA_ADAPTER, modules[HYDRA_ADAPTER], known))
