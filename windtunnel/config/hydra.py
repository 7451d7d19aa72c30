"""Hydra at the edge: compose conf/ (and a sweep file over conf/sweep.yaml) with KEY=VALUE
overrides, then convert once into the project's dataclasses (trial.py, sweep.py). The only module
of the project that imports hydra or omegaconf (tests/test_layering.py checks it).

Errors stay one line naming the field: `_override_error` reads the field, its owner and the value
from the attributes of OmegaConf's exception, never its wording; the one failure Hydra reports
without naming anything (a config group set to a number) is checked before it composes.
"""
from __future__ import annotations

import copy
import dataclasses
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


# what a field's annotation (trial.py's `coerce` reads the same) must hold, in words; on the
# command line a list is written in brackets
_WORDS = {**TYPE_WORDS, "list[int]": "a list, e.g. [1000, 2000]", "dict[str, Any]": "a mapping, e.g. {KEY: VALUE}"}


def _section_fields(name: str) -> list[str] | None:
    """The fields of the config section `name` (model, sampler, ...); None if it is no section."""
    cls = {**SECTIONS, **SWEEP_SECTIONS}.get(name)
    return sorted(f.name for f in dataclasses.fields(cls)) if cls else None


def _annotation(key: str) -> str:
    """The annotated type of a field by its full key ('model.d_model' -> 'int', 'train.save_at[0]'
    -> 'int', 'n_trials' -> 'int'); '' for no field."""
    name, index, _ = key.partition("[")
    section, _, field = name.rpartition(".")
    cls = {**SECTIONS, **SWEEP_SECTIONS}.get(section) if section else SweepConfig
    kind = next((str(f.type) for f in dataclasses.fields(cls) if f.name == field), "") if cls else ""
    kind = next((k.strip() for k in kind.split("|") if k.strip() != "None"), "")
    return kind.removeprefix("list[").removesuffix("]") if index and kind.startswith("list[") else kind


def _override_error(e: Exception, overrides: list[str] = ()) -> str:
    """Hydra's first line says only which override failed ("Error merging override optim.lr=abc");
    the OmegaConf error beneath it carries the field (full_key), its owner (object_type) and the
    value: say what the field must hold, in our words, from them."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = e
    while cause is not None and not getattr(cause, "full_key", None):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        if isinstance(e, OverrideParseException):
            if hint := _quoting_hint(overrides):
                return f"overrides: {hint}"
            detail = _one_line(e.__cause__) if e.__cause__ else "unparsable"
            return f"overrides: {e.override}: must be KEY=VALUE ({detail})"
        if isinstance(e, MissingConfigException) and e.options and "/" in (e.missing_cfg_file or ""):
            group, _, option = e.missing_cfg_file.rpartition("/")  # a config group's option
            return f"overrides: {group}: no option {option!r} (allowed: {', '.join(e.options)})"
        return f"overrides: {_one_line(e)}"
    key, value, owner = cause.full_key, getattr(cause, "value", None), getattr(cause, "object_type", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        known = sorted(f.name for f in dataclasses.fields(owner)) if dataclasses.is_dataclass(owner) else []
        return f"{key}: unknown key" + (f" (allowed: {', '.join(known)})" if known else "")
    kind = _annotation(key)
    # a scalar as the command line typed it; a list or mapping as it was read
    scalar = isinstance(value, (str, int, float, bool)) and not kind.startswith("list")
    shown = repr(str(value)) if scalar else repr(value)
    if isinstance(cause, ValidationError) and _section_fields(key):
        return (f"{key}: is a section, not a config group; set its fields as {key}.FIELD=VALUE "
                f"(allowed: {', '.join(_section_fields(key))}) (got {shown})")
    if isinstance(cause, ValidationError) and kind in _WORDS:
        return f"{key}: must be {_WORDS[kind]} (got {shown})"
    return f"{key}: {_one_line(cause)}"


def _group_error(overrides: list[str], conf_dir: Path) -> str | None:
    """Checked before Hydra composes: it refuses a config group set to no option's name (model=5)
    and an override with no key (=5) alike, with "Config group override must be a string or a
    list. Got int", which names neither the override nor the group."""
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for item in overrides:
        key, sep, text = item.lstrip("+~").partition("=")
        if not key:
            return f"overrides: {item}: must be KEY=VALUE (the key is missing)"
        if key in groups and sep and not isinstance(kv.parse_value(text), (str, list)):
            options = sorted(q.stem for q in (conf_dir / key).glob("*.yaml"))
            return f"overrides: {key}: must name one of its options (allowed: {', '.join(options)}) (got {text!r})"
    return None


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
    if msg := _group_error(overrides, conf_dir):
        raise ConfigError(msg)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=[_whole_override(o) for o in overrides])
        return OmegaConf.to_container(cfg, resolve=True)
    except ConfigError:
        raise
    except Exception as e:  # Hydra/OmegaConf errors, as one line naming the key
        raise ConfigError(_override_error(e, overrides)) from None


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
