"""A task's `search:` section (alto.tasks): configurations proposed by a search algorithm (Optuna's
samplers, alto.optuna_search) instead of a grid, checked without importing torch or Optuna.

```yaml
search:
  sampler: tpe            # tpe | random | cmaes | grid (Optuna's samplers)
  trials: 48              # configurations in all (grid: default the number of grid points)
  seed: 0                 # the sampler's seed (null: unseeded)
  parallel: 8             # configurations proposed as the steps begin; then one per slot an ended one frees
  pruner: none            # median | halving | hyperband: Optuna's pruner stops trials at evaluation points
                          # (their held-out losses its intermediate values), beside any monitor
  space:                  # adapter fields (the task's defaults give the rest)
    rank: {low: 4, high: 64, log: true}           # a range: ints for int fields (step: optional)
    lr: {low: 1.0e-5, high: 1.0e-3, log: true}
    micro_batch_size: [1, 2, 4]                   # a list: choices
    target_modules: [[q_proj, v_proj], [q_proj, k_proj, v_proj, o_proj]]
```
Each configuration's seed is its trial's number unless the defaults set one. The result a
configuration is told by is its best held-out loss: a search needs held-out data.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

from alto.inputs import is_int, is_number
from alto.registry import AdapterConfig, ConfigFieldError

SAMPLERS = ("tpe", "random", "cmaes", "grid")
PRUNERS = ("none", "median", "halving", "hyperband")
SEARCH_KEYS = {"sampler", "trials", "seed", "parallel", "space", "pruner"}
INT_FIELDS = {f.name for f in dataclasses.fields(AdapterConfig) if f.type in ("int", int)}
FLOAT_FIELDS = {f.name for f in dataclasses.fields(AdapterConfig) if "float" in str(f.type)}
SEARCHABLE = {f.name for f in dataclasses.fields(AdapterConfig)} - {"seed"}


@dataclass(frozen=True)
class Dimension:
    """One adapter field's range (low..high, on a log scale or in steps) or its choices."""

    field: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def is_int(self) -> bool:
        return self.field in INT_FIELDS

    def extremes(self) -> list[Any]:
        """The values a configuration may take at the edges (every choice, or low and high)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


@dataclass(frozen=True)
class SearchConfig:
    sampler: str
    trials: int
    seed: int | None
    parallel: int
    space: tuple[Dimension, ...]
    pruner: str = "none"
    defaults: dict[str, Any] = field(default_factory=dict)  # the task's adapter defaults: the other fields


def _fail(where: str, msg: str) -> None:
    raise ValueError(f"{where}: {msg}")


def _dimension(where: str, name: Any, given: Any, defaults: dict[str, Any]) -> Dimension:
    w = f"{where}.{name}"
    if name not in SEARCHABLE:
        _fail(w, f"not a searchable adapter field; fields: {', '.join(sorted(SEARCHABLE))}")
    if isinstance(given, list):
        if not given:
            _fail(w, "an empty list of choices")
        choices = tuple(tuple(c) if isinstance(c, list) else c for c in given)
        if len(set(map(repr, choices))) != len(choices):
            _fail(w, f"{given!r} repeats a choice")
        dim = Dimension(name, choices=choices)
    elif isinstance(given, dict):
        unknown = set(given) - {"low", "high", "log", "step"}
        if unknown or not {"low", "high"} <= set(given):
            _fail(w, f"{given!r} must be {{low, high[, log][, step]}} or a list of choices")
        if name not in INT_FIELDS | FLOAT_FIELDS:
            _fail(w, "takes a list of choices (not a numeric field)")
        kind, ok = ("an int", is_int) if name in INT_FIELDS else ("a number", is_number)
        for key in ("low", "high") + (("step",) if "step" in given else ()):
            if not ok(given[key]) or not math.isfinite(given[key]):
                _fail(f"{w}.{key}", f"{given[key]!r} must be {kind}")
        log = given.get("log", False)
        if not isinstance(log, bool):
            _fail(f"{w}.log", f"{log!r} must be true or false")
        if not given["low"] < given["high"]:
            _fail(w, f"low {given['low']!r} must be below high {given['high']!r}")
        if log and given["low"] <= 0:
            _fail(f"{w}.low", f"{given['low']!r} must be positive on a log scale")
        if "step" in given and (given["step"] <= 0 or log):
            _fail(f"{w}.step", f"{given['step']!r}: a positive step, without log")
        dim = Dimension(name, float(given["low"]) if name in FLOAT_FIELDS else given["low"],
                        float(given["high"]) if name in FLOAT_FIELDS else given["high"], log, given.get("step"))
    else:
        _fail(w, f"{given!r} must be {{low, high[, log][, step]}} or a list of choices")
    for value in dim.extremes():  # every edge a valid adapter with the task's defaults
        try:
            AdapterConfig(**{**defaults, name: list(value) if isinstance(value, tuple) else value})
        except ConfigFieldError as e:
            _fail(w, f"{value!r}: {e.problem}")
    return dim


def parse_search(where: str, given: Any, defaults: dict[str, Any], eval_every: int | None) -> SearchConfig:
    """A task's search section (where: its place, e.g. "tasks[a]."); defaults: its adapter defaults;
    eval_every: its evaluations' period (None: at the end only)."""
    for key, value in defaults.items():  # the other fields of every configuration, named where written
        if key not in SEARCHABLE | {"seed"}:
            _fail(f"{where}defaults.{key}", f"unknown field; fields: {', '.join(sorted(SEARCHABLE | {'seed'}))}")
    try:
        AdapterConfig(**defaults)
    except ConfigFieldError as e:
        _fail(f"{where}defaults.{e.field}", e.problem)
    w = f"{where}search"
    if not isinstance(given, dict) or set(given) - SEARCH_KEYS:
        _fail(w, f"must be a mapping with keys {', '.join(sorted(SEARCH_KEYS))}")
    sampler = given.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        _fail(f"{w}.sampler", f"{sampler!r} must be one of {', '.join(SAMPLERS)}")
    if sampler == "cmaes" and importlib.util.find_spec("cmaes") is None:
        _fail(f"{w}.sampler", "cmaes needs the cmaes package (pip install cmaes)")
    space = given.get("space")
    if not isinstance(space, dict) or not space:
        _fail(f"{w}.space", "must map adapter fields to ranges {low, high} or lists of choices")
    dims = tuple(_dimension(f"{w}.space", name, value, defaults) for name, value in space.items())
    points = math.prod(len(d.choices) for d in dims if d.choices is not None)
    if sampler == "grid":
        ranged = next((d.field for d in dims if d.choices is None), None)
        if ranged is not None:
            _fail(f"{w}.space.{ranged}", "sampler grid takes lists of choices only")
    trials = given.get("trials", points if sampler == "grid" else 16)
    if not is_int(trials) or trials < 1:
        _fail(f"{w}.trials", f"{trials!r} must be an int >= 1")
    if sampler == "grid" and trials > points:
        _fail(f"{w}.trials", f"{trials} is more than the grid's {points} points (each would run again)")
    seed = given.get("seed", 0)
    if seed is not None and (not is_int(seed) or not 0 <= seed < 2**32):
        _fail(f"{w}.seed", f"{seed!r} must be an int in [0, 2**32) or null")
    parallel = given.get("parallel", 8)
    if not is_int(parallel) or parallel < 1:
        _fail(f"{w}.parallel", f"{parallel!r} must be an int >= 1")
    pruner = given.get("pruner", "none")
    if pruner not in PRUNERS:
        _fail(f"{w}.pruner", f"{pruner!r} must be one of {', '.join(PRUNERS)}")
    if pruner != "none" and eval_every is None:
        _fail(f"{w}.pruner", f"{pruner} prunes on held-out losses during the run: set eval.every")
    return SearchConfig(sampler, trials, seed, min(parallel, trials), dims, pruner, dict(defaults))
