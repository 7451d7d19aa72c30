"""A sweep's search space (the `search:` section of sweeps/NAME.yaml), explicit in Optuna's habit
rather than the Hydra sweeper's expression strings:

    search:
      optim.lr:        {type: float, low: 1.0e-3, high: 0.1, log: true}   # high is inclusive
      model.d_model:   {type: int, low: 64, high: 256, step: 64}
      model.parametrization: {type: categorical, choices: [sp, mup]}
      schedule.decay:  {type: fixed, value: 0.1}
      optim.lr:        {type: float, values: [0.001, 0.002, 0.004]}       # a grid (sampler: grid)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from windtunnel.config.overrides import apply
from windtunnel.config.trial import TrialConfig, check_field, field_type, with_overrides
from windtunnel.errors import ConfigError

PARAM_TYPES = ("float", "int", "categorical", "fixed")
PARAM_KEYS = ("type", "low", "high", "step", "log", "choices", "value", "values")
_RANGE = ("type", "low", "high", "step", "log", "values")  # values: a grid's points
TYPE_KEYS = {"float": _RANGE, "int": _RANGE, "categorical": ("type", "choices"), "fixed": ("type", "value")}


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()
    value: Any = None
    values: tuple = ()


def parse_search(search: dict, base: TrialConfig) -> dict[str, Param]:
    """Check every entry of the search space; errors name the entry, the rule and the values."""
    out = {}
    for name, spec in search.items():
        where = f"search.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: must be a mapping like {{type: float, low: 0.001, high: 0.1}} (got {spec!r})")
        bad = set(spec) - set(PARAM_KEYS)
        if bad:
            raise ConfigError(f"{where}.{sorted(bad)[0]}: unknown key (allowed: {', '.join(PARAM_KEYS)})")
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            raise ConfigError(f"{where}.type: must be one of {', '.join(PARAM_TYPES)} (got {kind!r})")
        stray = set(spec) - set(TYPE_KEYS[kind])  # `{type: fixed, value: 0.01, low: 1}` meant something else
        if stray:
            raise ConfigError(f"{where}.{sorted(stray)[0]}: not a key of a {kind} parameter "
                              f"(allowed: {', '.join(TYPE_KEYS[kind])})")
        check_field(isinstance(spec.get("log", False), bool), f"{where}.log", "must be true or false", spec.get("log"))
        if "values" in spec and kind in ("float", "int"):  # a grid's points: min and max below are its bounds
            vals = spec["values"]
            check_field(isinstance(vals, (list, tuple)) and len(vals) > 0 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals),
                f"{where}.values", "must be a non-empty list of finite numbers", vals)
        p = Param(name=name, type=kind, low=spec.get("low"), high=spec.get("high"), step=spec.get("step"),
                  log=bool(spec.get("log", False)), choices=tuple(spec.get("choices") or ()),
                  value=spec.get("value"), values=tuple(spec.get("values") or ()))
        if kind in ("float", "int"):
            if p.values:
                p = dataclasses.replace(p, low=min(p.values), high=max(p.values))
            for bound in ("low", "high"):
                v = getattr(p, bound)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                    raise ConfigError(f"{where}.{bound}: must be a finite number (got {v!r})")
            if p.low > p.high:
                raise ConfigError(f"{where}: `low <= high` must hold (got low={p.low}, high={p.high})")
            if p.log and p.low <= 0:
                raise ConfigError(f"{where}.low: log scale needs low > 0 (got {p.low})")
            if p.log and p.step is not None:
                raise ConfigError(f"{where}.step: cannot be combined with log: true (got step={p.step})")
            if kind == "int" and not all(float(v).is_integer() for v in (p.low, p.high)):
                raise ConfigError(f"{where}: int bounds must be integers (got low={p.low}, high={p.high})")
            if p.step is not None:  # Optuna cuts high to low + k·step: a step past high leaves only low
                ok = (isinstance(p.step, (int, float)) and not isinstance(p.step, bool) and 0 < p.step <= p.high - p.low
                      and (kind == "float" or float(p.step).is_integer()))
                check_field(ok, f"{where}.step", f"must be {'a whole number' if kind == 'int' else 'a number'} > 0 "
                            f"and <= high - low = {p.high - p.low:g}", p.step)
            if kind == "float" and field_type(name) == "int":  # its probes could all be whole numbers
                raise ConfigError(f"{where}.type: {name} is an integer field (allowed: int, categorical, fixed)")
        elif kind == "categorical" and not p.choices:
            raise ConfigError(f"{where}.choices: must be a non-empty list (got {spec.get('choices')!r})")
        elif kind == "fixed" and "value" not in spec:
            raise ConfigError(f"{where}.value: must be set for type fixed")
        # the name must be a real trial field, and every value it can take must be valid there
        for v in _probe_values(p):
            try:
                with_overrides(base, {name: v})
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        out[name] = p
    return out


def search_overrides(search: dict, overrides: list[str]) -> dict:
    """`search.optim.lr.high=0.01` sets one field of a parameter, `search.optim.lr={type: fixed,
    value: 0.01}` a whole one, `~search.optim.lr` drops it. Hydra cannot: a parameter's name holds
    a dot (`optim.lr`), which its override paths read as nesting."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in search.items()}
    for item in overrides:
        key = item.lstrip("+").partition("=")[0]
        name = key.lstrip("~").removeprefix("search.")
        if key.startswith("~"):
            if out.pop(name, None) is None:
                raise ConfigError(f"{key}: no such search parameter (have: {', '.join(out) or 'none'})")
            continue
        param, _, field = name.rpartition(".")
        if field in PARAM_KEYS and param and not isinstance(out.get(param), dict):
            raise ConfigError(f"search.{param}: no such search parameter (have: {', '.join(out) or 'none'}); "
                              f"add one whole: 'search.{param}={{type: float, low: ..., high: ...}}'"
                              if param not in out else
                              f"search.{param}: must be a mapping like {{type: float, low: 0.001, high: 0.1}}")
        apply(out, [item.lstrip("+").removeprefix("search.")], path=_search_path,
              example="search.PARAM.FIELD=VALUE, search.PARAM={...} or ~search.PARAM")
    return out


def _search_path(name: str) -> list[str]:
    param, _, field = name.rpartition(".")
    return [param, field] if field in PARAM_KEYS and param else [name]


def _probe_values(p: Param) -> list:
    if p.type in ("float", "int"):
        vals = list(p.values) or [p.low, p.high]
        return [int(v) for v in vals] if p.type == "int" else vals
    if p.type == "categorical":
        return list(p.choices)
    return [p.value]


def grid_space(space: dict[str, Param]) -> dict[str, list]:
    """The grid sampler's points: `values`, categorical choices, or low..high by step."""
    grid = {}
    for name, p in space.items():
        if p.type == "fixed":
            continue
        if p.type == "categorical":
            grid[name] = list(p.choices)
        elif p.values:
            grid[name] = list(p.values)
        elif p.step:
            n = int(round((p.high - p.low) / p.step)) + 1
            grid[name] = [p.low + i * p.step for i in range(n)]
        else:
            raise ConfigError(f"search.{name}: the grid sampler needs `values` or `step` (got a continuous range)")
    return grid
