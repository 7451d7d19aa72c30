"""The one KEY=VALUE parser outside Hydra (windtunnel/config/overrides.py), as a target, a large
run's train.yaml, a trial's best.yaml and a confirmation's sweep read their overrides."""
import pytest
import yaml

from windtunnel.config import overrides
from windtunnel.config.large_run import load_config, read
from windtunnel.config.target import load_target
from windtunnel.config.trial import TrialConfig, to_dict
from windtunnel.errors import ConfigError


def test_a_dotted_key_nests_and_values_read_as_hydra_reads_them():
    d = overrides.apply({"train": {"tokens": 1}}, ["train.tokens=2e5", "+optim.lr=1e-3", "data.source=stdlib"])
    assert d == {"train": {"tokens": 200000}, "optim": {"lr": 0.001}, "data": {"source": "stdlib"}}
    assert overrides.apply({}, ["run.name=007"], raw={"run.name"}) == {"run": {"name": "007"}}


@pytest.mark.parametrize("items, expected", [
    (["train.tokens"], "overrides: train.tokens: must be KEY=VALUE (e.g. train.tokens=200000)"),
    (["=5"], "overrides: =5: must be KEY=VALUE"),
    (["name.x=1"], "name.x: name is not a section (got name: 'sweep')"),
])
def test_a_bad_override_is_one_line_naming_it(items, expected):
    with pytest.raises(ConfigError) as e:
        overrides.apply({"name": "sweep"}, items)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value), str(e.value)


def test_target_and_large_run_overrides_go_through_it(tmp_path):
    # a run name, a folder or a URI keeps its text: YAML would read 007 as 7, 1e3 as 1000
    assert load_target("tiny-cpu", ["run_name=1e3", "nodes=2"]).run_name == "1e3"
    f = tmp_path / "train.yaml"
    f.write_text(yaml.safe_dump({**to_dict(TrialConfig()), "large_run": {"run_name": "r"}}))
    cfg, run = load_config(read(f, ["large_run.run_dir=007", "large_run.steps=1e1", "optim.lr=0.02"]))
    assert (run.run_dir, run.steps, cfg.optim.lr) == ("007", 10, 0.02)
    with pytest.raises(ConfigError, match=r"^overrides: nodes: must be KEY=VALUE \(e.g. nodes=4\)$"):
        load_target("tiny-cpu", ["nodes"])
