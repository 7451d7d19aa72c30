"""Hydra at the edge: compose conf/ (and a sweep file over conf/sweep.yaml) with KEY=VALUE
overrides, then convert once into the project's dataclasses (trial.py, sweep.py). The only module
of the project that imports hydra or omegaconf (tests/test_layering.py checks it).

Hydra's errors name the override, OmegaConf's beneath them the field, each in its own words:
`_override_error` says both in ours, one line naming the field and what is allowed. It reads the
exception's text where OmegaConf gives no attribute for it (the option a config group lacks, the
type a value failed to convert to); that wording is pinned by tests/test_sweep_errors.py.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import shlex
import sys
from pathlib import Path

from windtunnel.config import overrides as kv
from windtunnel.config.overrides import WHOLE_EXPONENT, load_yaml, repo_dir
from windtunnel.config.space import search_overrides
from windtunnel.config.sweep import SWEEP_SECTIONS, SweepConfig, sweep_file, sweep_from_dict
from windtunnel.config.trial import SECTIONS, TYPE_WORDS, TrialConfig, trial_from_dict
from windtunnel.errors import ConfigError


def _register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="trial_schema", node=TrialConfig)
    cs.store(name="sweep_schema", node=SweepConfig)


def _one_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


_OMEGACONF_TYPES = {"Float": "float", "Integer": "int", "String": "str"}  # -> config.TYPE_WORDS


def _section_fields(name: str) -> list[str] | None:
    """The fields of the config section `name` (model, sampler, ...); None if it is no section."""
    cls = {**SECTIONS, **SWEEP_SECTIONS}.get(name)
    return sorted(f.name for f in dataclasses.fields(cls)) if cls else None


def _override_error(e: Exception, overrides: list[str] = (), conf_dir: Path | None = None) -> str:
    """Hydra's first line says only which override failed ("Error merging override optim.lr=abc");
    the OmegaConf error beneath it names the field and what went wrong: say that, in our words."""
    cause = e
    while cause is not None and not getattr(cause, "full_key", None):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        lines = str(e).strip().splitlines()
        if "LexerNoViableAlt" in str(e) and (hint := _quoting_hint(overrides)):
            return f"overrides: {hint}"
        if m := re.match(r"Error parsing override '(.*)'", lines[0] if lines else ""):
            return f"overrides: {m[1]}: must be KEY=VALUE ({lines[1] if len(lines) > 1 else 'unparsable'})"
        if m := re.search(r"Could not find '([\w-]+)/(.*)'", lines[0] if lines else ""):  # a config group's option
            options = [line.strip() for line in lines if line.startswith("\t") and "=" not in line]
            return f"overrides: {m[1]}: no option {m[2]!r} (allowed: {', '.join(options)})"
        if lines and lines[0].startswith("Config group override must be a string"):  # model=5, =5
            groups = {p.name for p in (conf_dir or repo_dir("conf")).iterdir() if p.is_dir()}
            for item in overrides:
                key, _, value = item.lstrip("+~").partition("=")
                if not key:
                    return f"overrides: {item}: must be KEY=VALUE (the key is missing)"
                if key in groups:  # the group set to no option's name (model=tiny beside it is fine)
                    options = sorted(q.stem for q in ((conf_dir or repo_dir("conf")) / key).glob("*.yaml"))
                    if value not in options:
                        return f"overrides: {key}: must name one of its options (allowed: {', '.join(options)}) (got {value!r})"
        return f"overrides: {_one_line(e)}"
    key, first = cause.full_key, _one_line(cause)
    if m := re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", first):
        return f"{key}: must be {TYPE_WORDS.get(_OMEGACONF_TYPES.get(m[2]), m[2])} (got {m[1]!r})"
    if m := re.match(r"Value '(.*)' is not a valid bool", first):
        return f"{key}: must be {TYPE_WORDS['bool']} (got {m[1]!r})"
    if m := re.match(r"Cannot convert '\w+' to string: '(.*)'", first):
        return f"{key}: must be {TYPE_WORDS['str']} (got {m[1]})"
    if m := re.match(r"Invalid value assigned: (\w+) is not a ListConfig", first):
        value = getattr(cause, "value", None)
        return f"{key}: must be a list, e.g. [1000, 2000] (got {m[1] if value is None else repr(value)})"
    if re.match(r"Invalid type assigned: \w+ is not a subclass of \w+", first) and _section_fields(key):
        value = first.rpartition("value: ")[2] if "value: " in first else "?"
        return (f"{key}: is a section, not a config group; set its fields as {key}.FIELD=VALUE "
                f"(allowed: {', '.join(_section_fields(key))}) (got {value!r})")
    if first.startswith("Key ") and " not in " in first:
        owner = getattr(cause, "object_type", None)
        known = sorted(f.name for f in dataclasses.fields(owner)) if dataclasses.is_dataclass(owner) else []
        return f"{key}: unknown key" + (f" (allowed: {', '.join(known)})" if known else "")
    return f"{key}: {first}"


def _quoting_hint(overrides) -> str | None:
    """Hydra's lexer refuses non-ASCII characters outside its quotes, with only
    'LexerNoViableAltException: KEY=VALUE': say how to quote the first such override."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and not value.isascii() and value[:1] not in "'\"":
            inner = f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'
            # the shell's double quotes keep Hydra's single ones, where nothing in it is special to the shell
            paste = f'"{inner}"' if not set(inner) & set('"$`\\!') else shlex.quote(inner)
            return f"{key}: non-ASCII characters must be inside quotes Hydra reads: write {paste}"
    return None


def compose(overrides: list[str], config_name: str = "config", conf_dir: Path | None = None) -> dict:
    """The composed config as plain nested dicts; a bad override raises ConfigError (one line)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    _register_schemas()
    conf_dir = conf_dir or repo_dir("conf")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=[_whole_override(o) for o in overrides])
        return OmegaConf.to_container(cfg, resolve=True)
    except ConfigError:
        raise
    except Exception as e:  # Hydra/OmegaConf errors, as one line naming the key
        raise ConfigError(_override_error(e, overrides, conf_dir)) from None


def _whole_override(item: str) -> str:
    """`train.tokens=2e5` as `train.tokens=200000`: Hydra reads the exponent as a float, which an
    int field refuses (the YAML files read it as an integer: `_whole_or_float`)."""
    key, sep, text = item.partition("=")
    if not sep:
        return item
    whole = lambda t: str(int(float(t))) if WHOLE_EXPONENT.match(t) and float(t).is_integer() else t  # noqa: E731
    if text.startswith("[") and text.endswith("]"):  # train.save_at=[1e5,2e5]; other lists stay as typed
        items = [t.strip() for t in text[1:-1].split(",")]
        return f"{key}=[{','.join(map(whole, items))}]" if any(whole(t) != t for t in items) else item
    return f"{key}={whole(text)}"


def trial_config(overrides: list[str], config_file: str | None = None) -> TrialConfig:
    """A TrialConfig from conf/ + overrides, or from a resolved YAML file (best.yaml) + overrides."""
    if config_file:
        d = load_yaml(config_file)
        if "large_run" in d:
            raise ConfigError(f"{config_file}: a large run's config: run it with "
                              f"`windtunnel train {shlex.quote(str(config_file))}` (or the launch.sh beside it)")
        d = d.get("trial", d)  # best.yaml may wrap the trial with its sweep context
        return trial_from_dict(kv.apply(d, overrides))
    return trial_from_dict(compose(overrides))


def load_sweep(spec: str, overrides: list[str]):
    """The SweepConfig of a sweep file + KEY=VALUE overrides; every error names the file."""
    path = sweep_file(spec)
    content = load_yaml(path)
    allowed = {f.name for f in dataclasses.fields(SweepConfig)} | {"defaults"}
    for key, value in content.items():
        if key not in allowed:
            raise ConfigError(f"{path}: {key}: unknown key (allowed: {', '.join(sorted(allowed))})")
        # a section that is no mapping: Hydra's error names neither the key nor what it needs
        if key == "search" and not isinstance(value, (dict, type(None))):
            raise ConfigError(f"{path}: search: must be a mapping of parameter names to ranges like "
                              f"optim.lr: {{type: float, low: 0.001, high: 0.1}} (got {value!r})")
        if _section_fields(key) and not isinstance(value, (dict, type(None))):
            raise ConfigError(f"{path}: {key}: must be a mapping of {key}'s fields to values "
                              f"(allowed: {', '.join(_section_fields(key))}) (got {value!r})")
    content.setdefault("name", path.stem)
    content = _less_overridden(content, overrides)
    try:
        cfg, fixed = _compose_sweep(content, overrides)
    except ConfigError as e:
        msg = str(e).removeprefix("overrides: ")
    else:
        for name, value in fixed.items():  # said, not silent: the search would have overridden it
            spec = shlex.quote(f"search.{name}={{type: fixed, value: {value}}}")
            print(f"windtunnel sweep: {name}={value}: a searched parameter, fixed at {value} for this sweep "
                  f"(the same as {spec})", file=sys.stderr, flush=True)
        return cfg
    # the file's fault when what it still sets fails the same way alone, else the command line's
    try:
        _compose_sweep(content, [])[0]
        alone = None
    except ConfigError as e:
        alone = str(e).removeprefix("overrides: ")
    raise ConfigError(f"{path if alone == msg else 'command line'}: {msg}")


def _compose_sweep(content: dict, overrides: list[str]):
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    _register_schemas()
    ConfigStore.instance().store(group="sweep", name="current", node=OmegaConf.create(content), package="_global_")
    searched = [o for o in overrides if o.lstrip("+~").startswith("search.")]
    d = compose(["+sweep=current", *(o for o in overrides if o not in searched)], config_name="sweep")
    d["search"] = search_overrides(d.get("search") or {}, searched)
    # KEY=VALUE of a searched parameter fixes it for this sweep (each trial's sampled value
    # replaced it, so the override was silently ignored): {name: value}
    fixed = {}
    for item in overrides:
        name = item.lstrip("+").partition("=")[0]
        section, _, field = name.partition(".")
        if name in d["search"] and isinstance(d.get(section), dict) and field in d[section]:
            both = [o for o in searched if o.lstrip("+~").removeprefix("search.").startswith(name)]
            if both:
                raise ConfigError(f"{name}: both fixed ({item}) and searched ({both[0]}); give one")
            fixed[name] = d[section][field]
            d["search"][name] = {"type": "fixed", "value": fixed[name]}
    return sweep_from_dict(d), fixed


def _less_overridden(content: dict, overrides: list[str]) -> dict:
    """The file's content without the values KEY=VALUE replaces: Hydra merges (and type-checks)
    the file before the overrides, so a bad value there failed even when the command line set it."""
    out = copy.deepcopy(content)
    for item in overrides:
        key, sep, _ = item.lstrip("+").partition("=")
        if not sep or key.startswith(("~", "search.")):  # search.* is applied by search_overrides (space.py)
            continue
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and not isinstance(node.get(leaf), (dict, type(None))):
            del node[leaf]  # a leaf; a section stays (`executor=ray` picks a group under the file's values)
    return out
