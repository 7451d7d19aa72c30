"""Malformed sweep files: exit status 2, one line naming the file and the field, no traceback,
no results directory left behind."""
import subprocess
import sys

import pytest

from windtunnel.config.trial import with_overrides

CASES = {
    "unknown_key": ("n_trial: 5\n", "n_trial: unknown key"),
    "bounds": ("search:\n  optim.lr: {type: float, low: 0.1, high: 0.01}\n", "search.optim.lr: `low <= high` must hold"),
    "log_nonpositive": ("search:\n  optim.lr: {type: float, low: 0.0, high: 0.1, log: true}\n",
                        "search.optim.lr.low: log scale needs low > 0"),
    "sampler": ("sampler: {type: annealing}\n", "sampler.type: must be one of tpe, gp, cmaes, random, grid"),
    "sampler_threads": ("sampler: {type: gp, threads: -2}\n", "sampler.threads: must be >= 0 (0 = auto)"),
    "yaml": ("search:\n  optim.lr: {type: float, low: 1\n", "YAML syntax error"),
    "unknown_field": ("search:\n  optim.learning_rate: {type: float, low: 0.001, high: 0.1}\n",
                      "optim.learning_rate: unknown key"),
    "bad_value": ("model:\n  parametrization: ntk\n", "model.parametrization: must be one of sp, mup"),
    "storage": ("storage: nosuchdb://host/db\n", "storage: 'nosuchdb://host/db' cannot be opened"),
    "tracking_uri": ("tracking: {uri: notaurl}\n", "tracking.uri: must be '' (a local store) or a URI"),
    "name_traversal": ("name: ../../etc\n", "name: must be one plain folder name: letters, digits, '.', '_', '-'"),
    "storage_word": ("storage: foo\n", "storage: must be '' (a journal file in the sweep's folder), a path ending"),
    "storage_sqlite_folder": ("storage: sqlite:////no/such/folder/x.db\n",
                              "storage: sqlite:///PATH must name a file in an existing folder"),
    "step_past_high": ("search:\n  optim.lr: {type: float, low: 0.001, high: 0.01, step: 0.5}\n",
                       "search.optim.lr.step: must be a number > 0 and <= high - low = 0.009 (got 0.5)"),
    "float_on_int": ("search:\n  model.d_model: {type: float, low: 64, high: 256}\n",
                     "search.model.d_model.type: model.d_model is an integer field (allowed: int, categorical, fixed)"),
    # Optuna's own refusals, after the sweep had started (tracebacks); a deadline < 0 killed every bundle
    "sampler_seed": ("sampler: {seed: -1}\n", "sampler.seed: must be in [0, 2^32-1] (got -1)"),
    "pruner_startup": ("pruner: {n_startup_trials: -1}\n", "pruner.n_startup_trials: must be >= 0 (got -1)"),
    "pruner_warmup": ("pruner: {n_warmup_evals: -1}\n", "pruner.n_warmup_evals: must be >= 0 (got -1)"),
    "trial_timeout": ("executor: {trial_timeout_s: -5}\n",
                      "executor.trial_timeout_s: must be a number >= 0 (0 = no deadline) (got -5.0)"),
    # a key of another type was ignored without a word
    "stray_key": ("search:\n  optim.lr: {type: fixed, value: 0.01, low: 0.001}\n",
                  "search.optim.lr.low: not a key of a fixed parameter (allowed: type, value)"),
    # `log: maybe` was read as true; a word among `values` was a TypeError traceback; `values: []` blamed `low`
    "log_not_bool": ("search:\n  optim.lr: {type: float, low: 0.001, high: 0.1, log: maybe}\n",
                     "search.optim.lr.log: must be true or false (got 'maybe')"),
    "values_word": ("search:\n  optim.lr: {type: float, values: [0.001, abc]}\n",
                    "search.optim.lr.values: must be a non-empty list of finite numbers (got [0.001, 'abc'])"),
    "values_empty": ("sampler: {type: grid}\nsearch:\n  optim.lr: {type: float, values: []}\n",
                     "search.optim.lr.values: must be a non-empty list of finite numbers (got [])"),
    # a section that is not a mapping: Hydra's "ConfigTypeError raised while composing config:" named nothing
    "search_list": ("search: [optim.lr]\n",
                    "search: must be a mapping of parameter names to ranges like optim.lr: {type: float, low: 0.001, "
                    "high: 0.1} (got ['optim.lr'])"),
    "section_scalar": ("optim: 0.01\n", "optim: must be a mapping of optim's fields to values (allowed: beta1, "
                       "beta2, eps, grad_clip, lr, weight_decay) (got 0.01)"),
}


def _run(args, cwd):
    return subprocess.run([sys.executable, "-m", "windtunnel.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_sweep_file(tmp_path, case):
    text, expected = CASES[case]
    f = tmp_path / f"{case}.yaml"
    f.write_text(text)
    p = _run(["sweep", str(f), f"results_dir={tmp_path / 'results'}"], tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert str(f) in lines[0] and expected in lines[0], lines[0]
    assert [q.name for q in tmp_path.iterdir()] == [f.name]  # no results, no journal named by storage


def test_missing_sweep_file_and_bad_override(tmp_path):
    p = _run(["sweep", str(tmp_path / "nope.yaml")], tmp_path)
    assert p.returncode == 2 and "nope.yaml: no such sweep file" in p.stderr and len(p.stderr.splitlines()) == 1
    p = _run(["sweep", "no_such_sweep"], tmp_path)
    assert p.returncode == 2 and "allowed: " in p.stderr and "quickstart" in p.stderr
    p = _run(["sweep", "quickstart", "executor.wrkers=2", f"results_dir={tmp_path / 'r'}"], tmp_path)
    assert p.returncode == 2 and "wrkers" in p.stderr and len(p.stderr.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_trial_cli_bad_config_exit_2(tmp_path):
    for override, field in [("optim.lr=-1", "optim.lr"), ("model.d_model=102", "model.d_model"),
                            ("model.parametrization=ntk", "model.parametrization")]:
        p = _run(["trial", override], tmp_path)
        assert p.returncode == 2 and field in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=abc", "optim.lr: must be a number (got 'abc')"),
    ("model.d_model=1.5", "model.d_model: must be an integer (got '1.5')"),
    ("train.cuda_graph=maybe", "train.cuda_graph: must be true or false (got 'maybe')"),
    ("model.d_modle=64", "model.d_modle: unknown key (allowed: d_ff, d_model, "),
    ("optim.lr", "overrides: optim.lr: must be KEY=VALUE"),
    # OmegaConf's words, or none naming the field
    ("train.save_at=5", "train.save_at: must be a list, e.g. [1000, 2000] (got 5)"),
    ("model.kernels=[a]", "model.kernels: must be a string (got ['a'])"),
    ("model=5", "overrides: model: must name one of its options (allowed: proxy9m, tiny) (got '5')"),
    ("=5", "overrides: =5: must be KEY=VALUE (the key is missing)"),
    ("model=tiny model=5", "overrides: model: must name one of its options (allowed: proxy9m, tiny) (got '5')"),
    ("data=stdlib =5", "overrides: =5: must be KEY=VALUE (the key is missing)"),
])
def test_bad_override_names_the_field_and_what_is_allowed(override, expected):
    from windtunnel.config.hydra import compose
    from windtunnel.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        compose(override.split(" "))
    assert str(e.value).startswith(expected) and "\n" not in str(e.value), str(e.value)


def test_a_section_set_as_a_value_says_how_to_set_its_fields():
    """`sampler=gp` (sampler is no config group): "Invalid type assigned: str is not a subclass of SamplerConfig"."""
    from windtunnel.config.hydra import load_sweep
    from windtunnel.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_sweep("quickstart", ["sampler=gp"])
    assert str(e.value) == ("command line: sampler: is a section, not a config group; set its fields as "
                            "sampler.FIELD=VALUE (allowed: n_startup_trials, seed, threads, type) (got 'gp')"), str(e.value)


@pytest.mark.parametrize("section, key, value, expected", [
    ("optim", "lr", "abc", "optim.lr: must be a number (got 'abc')"),
    ("optim", "lr", True, "optim.lr: must be a number (got True)"),
    ("model", "d_model", 1.5, "model.d_model: must be an integer (got 1.5)"),
    ("train", "cuda_graph", "maybe", "train.cuda_graph: must be true or false (got 'maybe')"),
    ("train", "save_at", [1, "x"], "train.save_at: must be a list of integers"),
])
def test_wrong_type_in_a_config_file_names_the_field(section, key, value, expected):
    """`trial --config best.yaml` and the transfer build configs from plain dicts, not Hydra."""
    import numpy as np

    from windtunnel.config.trial import TrialConfig, to_dict, trial_from_dict
    from windtunnel.errors import ConfigError

    d = to_dict(TrialConfig())
    d[section][key] = value
    with pytest.raises(ConfigError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        trial_from_dict(d)
    d = to_dict(TrialConfig())
    d["model"]["d_model"], d["optim"]["lr"] = np.int64(64), np.float32(0.02)  # what tables hand over
    assert trial_from_dict(d).model.d_model == 64


def test_large_run_section_is_checked_like_the_trial_sections():
    from windtunnel.errors import ConfigError
    from windtunnel.config.large_run import load_config

    with pytest.raises(ConfigError, match=r"^large_run\.micro_batch: must be an integer \(got 'x'\)"):
        load_config({"large_run": {"micro_batch": "x"}})
    with pytest.raises(ConfigError, match=r"^large_run\.stepz: unknown key \(allowed: .*micro_batch"):
        load_config({"large_run": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"^large_run: must be a mapping"):
        load_config({"large_run": [1]})
    assert load_config({"large_run": {"micro_batch": 2}})[1].micro_batch == 2


def test_overrides_of_a_config_file_read_numbers_as_hydra_does(tmp_path):
    """`trial --config best.yaml train.tokens=2e6 optim.lr=1e-3`: YAML 1.1 alone reads both as strings."""
    import yaml

    from windtunnel.config.trial import TrialConfig, to_dict
    from windtunnel.config.hydra import trial_config

    f = tmp_path / "best.yaml"
    f.write_text(yaml.safe_dump({"trial": to_dict(TrialConfig())}))
    cfg = trial_config(["train.tokens=2e6", "optim.lr=1e-3"], str(f))
    assert cfg.optim.lr == 0.001 and cfg.train.tokens == 2_000_000 and type(cfg.train.tokens) is int


def test_whole_numbers_in_exponent_form_fill_integer_fields(tmp_path):
    """`train.tokens=2e5` on the command line, in a sweep file or a search range, as `2e6` above in a
    config file: an integer; a fraction (1.5) or a small exponent (1e-1) is still refused."""
    from windtunnel.config.hydra import load_sweep, trial_config
    from windtunnel.errors import ConfigError

    cfg = trial_config(["train.tokens=2e5", "model.d_model=1.28e2", "optim.lr=1e-2", "model.init_std=1e0"])
    assert trial_config(["train.save_at=[1e4, 2.5e4]", "train.tokens=3e4"]).train.save_at == [10_000, 25_000]
    assert (cfg.train.tokens, cfg.model.d_model, cfg.optim.lr, cfg.model.init_std) == (200_000, 128, 0.01, 1.0)
    assert type(cfg.train.tokens) is int and type(cfg.model.init_std) is float
    for bad, shown in (("1.5", "'1.5'"), ("1e-1", "'0.1'")):
        with pytest.raises(ConfigError, match=rf"^model\.d_model: must be an integer \(got {shown}\)"):
            trial_config([f"model.d_model={bad}"])
    f = tmp_path / "s.yaml"
    f.write_text("defaults: [_self_]\nn_trials: 4\ntrain: {tokens: 3e4}\n"
                 "search: {train.tokens: {type: int, low: 1e4, high: 2e4}}\n")
    sweep = load_sweep(str(f), ["model.seq_len=6.4e1"])
    assert sweep.trial.train.tokens == 30_000 and sweep.trial.model.seq_len == 64
    p = sweep.search["train.tokens"]
    assert (p["low"], p["high"]) == (10_000, 20_000) and type(p["low"]) is int


def test_unwritable_results_dir_is_one_line(tmp_path):
    """results_dir or a journal's folder under a regular file: exit 1 and the OS's 'Not a directory' or
    'File exists' (naming no field), after the sweep's folder was made; now refused with the config."""
    (tmp_path / "file").write_text("")
    p = _run(["sweep", "quickstart", f"results_dir={tmp_path / 'file' / 'results'}", "n_trials=1"], tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == (f"windtunnel sweep: error: command line: results_dir: "
                                                      f"{tmp_path / 'file' / 'results' / 'quickstart'}: "
                                                      f"{tmp_path / 'file'} is a file, not a folder"), p.stderr
    p = _run(["sweep", "quickstart", f"results_dir={tmp_path / 'r'}", f"storage={tmp_path / 'file' / 's.journal'}",
              "n_trials=1"], tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == (f"windtunnel sweep: error: command line: storage: "
                                                      f"{tmp_path / 'file'} is a file; a folder is needed"), p.stderr
    assert sorted(q.name for q in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("args,expected", [
    (["transfer", "x", "--target", "tiny-cpu", "--out", "o", "--tokens", "abc"], "argument --tokens: invalid int value"),
    (["report", "no/such/folder"], "no/such/folder: no such folder"),
    (["trial", "schedule=wsdd"], "schedule: no option 'wsdd' (allowed: cosine, wsd)"),
    (["sweep", "quickstart", "model.parametrization=ntk"], "error: command line: model.parametrization: must be one of"),
    (["sweep", "quickstart", "name=../../etc"], "command line: name: must be one plain folder name"),
    (["sweep"], "the following arguments are required: sweep (see"),
    (["coord-check", "--widths", "64,100"], "--widths: 100: model.head_dim: must divide model.d_model=100"),
    (["transfer", "no/such/best.yaml", "--target", "tiny-cpu", "--out", "o"], "no such file or folder"),
])
def test_bad_command_line_is_one_line(tmp_path, args, expected):
    p = _run(args, tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], p.stderr


@pytest.mark.parametrize("override, expected", [
    ("train.device=cuda", "train.device: cuda asked for, but no CUDA device is visible"),
    ("model.kernels=triton", "model.kernels: 'triton' needs a CUDA device or TRITON_INTERPRET=1"),
    ("data.source=/no/such/text", "data.source: no such file or folder (got '/no/such/text'"),
])
def test_a_sweep_refuses_what_a_trial_refuses_before_writing(tmp_path, override, expected):
    """Every trial failed, exit 0 and a `best:` line for a best.yaml never written."""
    import os

    if "cuda" in expected.lower() and _cuda():
        pytest.skip("a CUDA device is visible")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "windtunnel.cli", "sweep", "-q", "quickstart", override, "n_trials=30",
                        f"results_dir={tmp_path / 'r'}"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], p.stderr
    assert not (tmp_path / "r").exists()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_the_command_line_wins_over_a_bad_value_in_the_sweep_file(tmp_path):
    """Hydra type-checks the file before the overrides: `n_trials: many` failed even with
    n_trials=1, and the error blamed the command line."""
    from windtunnel.config.hydra import load_sweep
    from windtunnel.errors import ConfigError

    f = tmp_path / "s.yaml"
    f.write_text("n_trials: many\ntrain: {tokens: lots}\n")
    cfg = load_sweep(str(f), ["n_trials=1", "train.tokens=2000"])
    assert cfg.n_trials == 1 and cfg.train.tokens == 2000
    with pytest.raises(ConfigError, match=f"^{f}: train.tokens: must be an integer \\(got 'lots'\\)"):
        load_sweep(str(f), ["n_trials=1"])
    with pytest.raises(ConfigError, match=f"^{f}: train.tokens: must be an integer"):  # a group under the file's values
        load_sweep(str(f), ["n_trials=1", "train=gpu"])
    with pytest.raises(ConfigError, match="^command line: n_trials: must be an integer \\(got 'x'\\)"):
        load_sweep(str(f), ["n_trials=x", "train.tokens=2000"])


def test_sweep_files_read_numbers_as_the_command_line_does(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-2 and 1.0e3 as strings: `high: 1e-2` was 'not a finite number'."""
    from windtunnel.config.hydra import load_sweep

    f = tmp_path / "s.yaml"
    f.write_text("search:\n  optim.lr: {type: float, low: 1.0e-3, high: 1e-2}\noptim: {weight_decay: 1e-1}\n")
    cfg = load_sweep(str(f), [])
    assert cfg.search["optim.lr"] == {"type": "float", "low": 0.001, "high": 0.01} and cfg.optim.weight_decay == 0.1


def test_search_space_overrides_from_the_command_line():
    """A parameter's name holds a dot (optim.lr), so Hydra cannot address it: the sweep loader
    sets a field, a whole parameter, or drops one itself."""
    from windtunnel.config.hydra import load_sweep
    from windtunnel.errors import ConfigError

    base = load_sweep("quickstart", []).search
    s = load_sweep("quickstart", ["search.optim.lr.high=0.01", "~search.model.scale_emb",
                                  "search.model.init_std={type: fixed, value: 0.1}"]).search
    assert s["optim.lr"] == {**base["optim.lr"], "high": 0.01}
    assert "model.scale_emb" not in s and s["model.init_std"] == {"type": "fixed", "value": 0.1}
    with pytest.raises(ConfigError, match=r"search\.optim\.lrr: no such search parameter \(have: optim\.lr"):
        load_sweep("quickstart", ["search.optim.lrr.high=0.1"])
    with pytest.raises(ConfigError, match=r"search\.optim\.lr: `low <= high` must hold"):
        load_sweep("quickstart", ["search.optim.lr.high=1e-5"])


def test_an_override_of_a_searched_parameter_fixes_it_and_says_so(tmp_path, capsys):
    """`windtunnel sweep quickstart optim.lr=0.01` exited 0 and its trials ran at sampled lrs (the
    search replaced the override): now the override fixes the parameter for this sweep, one line
    says so, and the trials asked train at 0.01."""
    from windtunnel.config.hydra import load_sweep
    from windtunnel.errors import ConfigError
    from windtunnel.sweep import Driver

    cfg = load_sweep("quickstart", ["optim.lr=0.01", f"results_dir={tmp_path}", "tracking.enabled=false"])
    assert cfg.search["optim.lr"] == {"type": "fixed", "value": 0.01}
    assert capsys.readouterr().err.splitlines() == [
        "windtunnel sweep: optim.lr=0.01: a searched parameter, fixed at 0.01 for this sweep "
        "(the same as 'search.optim.lr={type: fixed, value: 0.01}')"]
    driver = Driver(cfg, progress=False)
    try:
        driver.ask_bundles(2)
        asked = [t for b in driver.ready for t in b.trials]
        assert asked and all("optim.lr" not in t.params for t in asked)
        assert {with_overrides(cfg.trial, {**t.params, **driver.fixed}).optim.lr for t in asked} == {0.01}
    finally:
        driver._lock.close()
    with pytest.raises(ConfigError, match=r"optim\.lr: both fixed \(optim\.lr=0\.01\) and searched "
                                          r"\(search\.optim\.lr\.high=0\.1\); give one"):
        load_sweep("quickstart", ["optim.lr=0.01", "search.optim.lr.high=0.1"])


def test_absent_clusters_are_one_line_before_anything_is_written(tmp_path):
    """executor=ray at an address nobody listens on (Ray itself retries for minutes), and
    executor=slurm with its controller down (a stand-in scontrol: stopping the suite's real
    Slurm would take it from the other tests)."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    results = tmp_path / "results"
    p = _run(["sweep", "quickstart", "executor=ray", f"executor.address=127.0.0.1:{port}", f"results_dir={results}"],
             tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"executor.address: no Ray cluster answers at 127.0.0.1:{port}" in p.stderr

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'Slurmctld(primary) at vm is DOWN'\nexit 1\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    p = subprocess.run([sys.executable, "-m", "windtunnel.cli", "sweep", "quickstart", "executor=slurm",
                        f"results_dir={results}"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "executor.type: slurm: no controller answers (Slurmctld(primary) at vm is DOWN)" in p.stderr
    assert not results.exists()
