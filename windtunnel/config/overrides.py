"""What a user types, read outside Hydra with Hydra's rules for numbers: a YAML file (`load_yaml`)
and KEY=VALUE overrides (`apply`, the one parser for every file Hydra does not compose: a trial's
best.yaml, a large run's train.yaml, a target, a confirmation's sweep, a sweep's search space).
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import yaml

from windtunnel.errors import ConfigError


def repo_dir(name: str) -> Path:
    """conf/ or sweeps/ beside the package (an editable install or a checkout)."""
    env = os.environ.get(f"WINDTUNNEL_{name.upper()}")
    return Path(env) if env else Path(__file__).resolve().parents[2] / name


class _Loader(yaml.SafeLoader):
    """YAML 1.2's floats: PyYAML (YAML 1.1) reads 1e-3 (no dot) and 1.0e3 (no exponent sign) as
    strings, while Hydra's conf/ files and overrides read them as numbers."""


_Loader.yaml_implicit_resolvers = {c: [r for r in rs if r[0] != "tag:yaml.org,2002:float"]
                                   for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
    [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
   |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
   |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
   |[-+]?\.(?:inf|Inf|INF)
   |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def _whole_or_float(loader, node):
    """An exponent with a whole value (2e5, 1.5e6) is an integer, so int fields take it as written;
    float fields still hold a float (coerce, OmegaConf convert ints)."""
    text = loader.construct_scalar(node)
    value = loader.construct_yaml_float(node)
    return int(value) if WHOLE_EXPONENT.match(text) and value.is_integer() else value


WHOLE_EXPONENT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE]\+?[0-9]+$")
_Loader.add_constructor("tag:yaml.org,2002:float", _whole_or_float)


MAX_YAML_BYTES = 16 * 2**20  # a config or sweep file is kilobytes; a 3 GB one was read whole, then refused


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such file")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {p.stat().st_size / 2**20:,.0f} MiB is no config file (allowed: up to "
                          f"{MAX_YAML_BYTES // 2**20} MiB of YAML)")
    try:
        d = yaml.load(p.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: must hold a mapping of keys to values")
    return d


def parse_value(text: str):
    """'0.01' -> 0.01, '1e-3' -> 0.001, 'true' -> True, '[1,2]' -> [1, 2], anything else stays a
    string (numbers read as Hydra's overrides read them)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def split(item: str, example: str = "train.tokens=200000") -> tuple[str, str]:
    """(KEY, VALUE's text) of one override, without Hydra's leading '+' (add): the same on every
    command line. No '=' or no key is one line naming the override."""
    key, sep, text = item.lstrip("+").partition("=")
    if not sep or not key:
        raise ConfigError(f"overrides: {item}: must be KEY=VALUE (e.g. {example})")
    return key, text


def apply(d: dict, overrides: Iterable[str], *, raw: Collection[str] = (), example: str = "train.tokens=200000",
          path: Callable[[str], list[str]] | None = None) -> dict:
    """d with each KEY=VALUE set in order, and returned: a dotted KEY nests (train.tokens sets
    d['train']['tokens'], making the section if d has none). VALUE is read by `parse_value`, but
    a KEY in `raw` keeps its text as typed (a run name or a URI is never YAML). path: how a KEY
    nests, if not at each dot (a search parameter's name holds one)."""
    for item in overrides:
        key, text = split(item, example)
        *parents, leaf = path(key) if path else key.split(".")
        node = d
        for i, part in enumerate(parents):
            if node.get(part) is None:  # `large_run:` with nothing under it is YAML's None
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                section = ".".join(parents[:i + 1])
                raise ConfigError(f"{key}: {section} is not a section (got {section}: {node!r})")
        node[leaf] = text if key in raw else parse_value(text)
    return d
