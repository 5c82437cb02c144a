"""A sweep's tasks (alto.sweep): each tenant's data, adapters, monitor, evaluation and export,
checked, with errors that name the field (prefixed tasks[<name>]. in a multi-task sweep).

```yaml
objective: sft                 # sft | dpo (alto.objectives: preference pairs; adapter fields beta, loss_type)
data: {source: chatterbot, max_length: 96, eval_fraction: 0.1, limit: 600}   # or jsonl/text + path,
                               # or hf + path (dataset name or save_to_disk folder) [+ split: train];
                               # records: messages | prompt + completion | text | prompt + chosen +
                               # rejected (dpo; chatterbot's dialogues made into pairs) (alto.records);
                               # train_on: completion (default: assistant/completion tokens) | all;
                               # chatterbot: topics: [trivia, ...] (default: all);
                               # held-out data: eval_fraction of it, or eval_path (jsonl/text/hf) /
                               # eval_split (hf), which replace eval_fraction
defaults: {rank: 8, alpha: 16, lr: 1e-4, micro_batch_size: 4, max_steps: 30}
grid: {rank: [4, 16], lr: [1e-4, 1e-3]}    # cartesian product over these fields
adapters: [{id: wide, rank: 64}]           # explicit extra configurations
search: {sampler: tpe, trials: 48, space: {rank: {low: 4, high: 64, log: true}}}
                                           # or a search algorithm proposes them (alto.search_spec)
monitor: {rule: asha, grace: 8, eta: 2}    # early termination (alto.monitor): asha | median | halving |
                                           # alto (the ALTO paper's detectors, on held-out losses) |
                                           # several joined by + (alto+asha); absent = never stop early
eval: {every: 10, samples: 64, metric: exact_match, max_new_tokens: 32}
                                           # held-out loss every `every` micro-steps (and at the end) on
                                           # the first `samples` held-out sequences; metric (optional):
                                           # exact_match or module:function(prediction, reference) on
                                           # greedy completions of the held-out prompts; dpo:
                                           # reward_accuracy (its default) | reward_margin of its pairs
export: best                               # best (lowest held-out loss; the default with held-out
                                           # data) | last
```
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import Any

from alto.data_spec import data_settings, fail
from alto.inputs import is_int
from alto.metrics import metric_function
from alto.monitor import MonitorConfig
from alto.registry import AdapterConfig, ConfigFieldError, valid_adapter_id
from alto.search_spec import SearchConfig, parse_search

TASK_KEYS = {"objective", "data", "defaults", "grid", "adapters", "search", "monitor", "eval", "export"}  # per task, or shared
OBJECTIVES = ("sft", "dpo")  # alto.objectives' (the spec names them without importing torch)
DPO_METRICS = ("reward_accuracy", "reward_margin")  # alto.objectives.DPO.metrics
DPO_FIELDS = ("beta", "loss_type")  # adapter fields only dpo reads
EXPORTS = ("best", "last")
CONFIG_FIELDS = {f.name for f in dataclasses.fields(AdapterConfig)}

@dataclass(frozen=True)
class EvalConfig:
    """A task's held-out evaluation: loss (and perplexity) every `every` micro-steps of the sweep
    and at the end, on the first `samples` held-out sequences; optionally a metric of greedy
    completions of the held-out prompts, at the end (alto.generate)."""

    every: int | None = 10  # None: at the end only
    samples: int = 64
    metric: str | None = None  # exact_match, or module:function(prediction, reference) -> float
    max_new_tokens: int = 32


@dataclass
class Task:
    """One tenant of the sweep: its data, adapters (by their run-wide names: prefix + id) or the
    search that proposes them, monitor, evaluation and what is exported. `where` prefixes its fields
    in error messages ("" or "tasks[name].")."""

    name: str
    data: dict[str, Any]
    adapters: dict[str, AdapterConfig]  # its grid's and explicit ones (none with a search)
    monitor: MonitorConfig | None  # None: no early termination
    eval: EvalConfig
    export: str  # best | last
    where: str = ""
    prefix: str = ""  # of its adapters' run-wide names ("" or "<name>/")
    search: SearchConfig | None = None
    objective: str = "sft"  # alto.objectives: sft | dpo (preference pairs)


def _check_fields(where: str, values: dict[str, Any]) -> None:
    """Unknown adapter fields, named where they were written (defaults.rnak, grid.rnak, adapters[x].rnak)."""
    for key in values:
        if key not in CONFIG_FIELDS:
            fail(f"{where}.{key}", f"unknown field; fields: {', '.join(sorted(CONFIG_FIELDS))}")


def _adapter_config(written: dict[str, str], values: dict[str, Any]) -> AdapterConfig:
    """The adapter of these field values; a bad value is named where it was written (written: field
    -> its place in the sweep file, e.g. defaults or grid[rank0])."""
    try:
        return AdapterConfig(**values)
    except ConfigFieldError as e:
        fail(f"{written[e.field]}.{e.field}", e.problem)


def as_name(value: Any) -> str:
    """A name or id as written (YAML reads `3` as an int: it is the name "3"); "" for anything else
    (null, true, lists), which the callers reject."""
    return str(value) if isinstance(value, str) or is_int(value) else ""


def _adapter_id(values: dict[str, Any], keys: list[str]) -> str:
    """rank4-lr0p001: the grid values, spelled with what ids allow."""
    text = "-".join(f"{k}{values[k]}" for k in keys).replace(".", "p")
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "adapter"


def _adapters(where: str, values: dict[str, Any], prefix: str) -> dict[str, AdapterConfig]:
    """A task's configurations (its grid's and its explicit ones), named prefix + id."""
    if "search" in values:  # proposed as the run goes (alto.search_spec)
        for key in ("grid", "adapters"):
            if values.get(key):
                fail(f"{where}{key}", "and search: give one (the search proposes every configuration)")
        return {}
    defaults = values.get("defaults", {}) or {}
    grid = values.get("grid", {}) or {}
    extra = values.get("adapters", []) or []
    if not isinstance(defaults, dict):
        fail(f"{where}defaults", "must be a mapping of adapter fields")
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        fail(f"{where}grid", "must map adapter fields to non-empty lists of values")
    if not isinstance(extra, list) or any(not isinstance(a, dict) for a in extra):
        fail(f"{where}adapters", "must be a list of mappings of adapter fields")
    _check_fields(f"{where}defaults", defaults)
    _check_fields(f"{where}grid", grid)
    from_defaults = dict.fromkeys(defaults, f"{where}defaults")
    adapters: dict[str, AdapterConfig] = {}
    keys = list(grid)
    for n, combo in enumerate(itertools.product(*grid.values()) if grid else []):
        values = dict(zip(keys, combo))
        aid = _adapter_id(values, keys)
        if prefix + aid in adapters:  # e.g. lr: [0.001, 1.0e-3]
            fail(f"{where}grid[{aid}]", f"two grid points give the id {aid!r}: values repeat")
        point = f"{where}grid[{aid}]"
        adapters[prefix + aid] = _adapter_config({"seed": point, **from_defaults, **dict.fromkeys(values, point)},
                                                 {"seed": n, **defaults, **values})
    for i, entry in enumerate(extra):
        entry = dict(entry)
        given = entry.pop("id", f"adapter{i}")
        aid = as_name(given)
        if not valid_adapter_id(aid):
            fail(f"{where}adapters[{i}].id", f"{given!r} must be letters, digits, '-' or '_'")
        if prefix + aid in adapters:
            fail(f"{where}adapters[{i}]", f"duplicate id {aid!r}")
        place = f"{where}adapters[{aid}]"
        _check_fields(place, entry)
        adapters[prefix + aid] = _adapter_config({"seed": place, **from_defaults, **dict.fromkeys(entry, place)},
                                                 {"seed": len(adapters), **defaults, **entry})
    if not adapters:
        fail(where.rstrip(".") or "sweep", "no adapters: give a grid and/or an adapters list")
    return adapters


def _monitor(where: str, monitor: Any) -> MonitorConfig | None:
    names = [f.name for f in dataclasses.fields(MonitorConfig)]
    if monitor is None:
        return None
    if not isinstance(monitor, dict) or set(monitor) - set(names):
        fail(f"{where}monitor", f"must be a mapping with keys {', '.join(names)}")
    try:
        return MonitorConfig(**monitor)
    except ValueError as e:  # its errors name the field (monitor.rule=...)
        raise ValueError(f"{where}{e}") from None


def _eval(where: str, given: Any, monitor: MonitorConfig | None, objective: str) -> EvalConfig:
    """The eval settings; with a monitor reading held-out losses, evaluations come at its eval_every.
    A dpo task's metric is one of its objective's held-out metrics (not of generated replies)."""
    w = f"{where}eval"
    if given is None:
        given = {}
    if not isinstance(given, dict) or set(given) - {f.name for f in dataclasses.fields(EvalConfig)}:
        fail(w, "must be a mapping with keys every, samples, metric, max_new_tokens")
    values = {**dataclasses.asdict(EvalConfig()), **given}
    if monitor is not None and monitor.signal == "eval":
        if "every" in given and given["every"] != monitor.eval_every:
            fail(f"{w}.every", f"{given['every']!r} differs from monitor.eval_every={monitor.eval_every}, "
                                "whose held-out losses these evaluations are")
        values["every"] = monitor.eval_every
    if values["every"] is not None and (not is_int(values["every"]) or values["every"] < 1):
        fail(f"{w}.every", f"{values['every']!r} must be an int >= 1 (or null: at the end only)")
    for key in ("samples", "max_new_tokens"):
        if not is_int(values[key]) or values[key] < 1:
            fail(f"{w}.{key}", f"{values[key]!r} must be an int >= 1")
    if objective == "dpo":
        if values["metric"] is not None and values["metric"] not in DPO_METRICS:
            fail(f"{w}.metric", f"{values['metric']!r}: a dpo task's is one of {', '.join(DPO_METRICS)} (of its "
                                 "held-out pairs)")
    elif values["metric"] is not None:  # a user's metric imported now: its error before the run
        try:
            metric_function(values["metric"])
        except ValueError as e:
            fail(f"{w}.metric", str(e))
    return EvalConfig(**values)


def _refuse_dpo_fields(where: str, values: dict[str, Any]) -> None:
    """beta or loss_type set to other than its default for a task that is not dpo (it would change
    nothing): named where it was written; a search space over them too."""
    search = values.get("search")
    space = search.get("space") if isinstance(search, dict) else None
    places = [("defaults", values.get("defaults"), False), ("grid", values.get("grid"), True),
              ("search.space", space, True),
              *((f"adapters[{i}]", a, False) for i, a in enumerate(values.get("adapters") or []))]
    default = AdapterConfig()
    for place, given, several in places:
        for field in DPO_FIELDS if isinstance(given, dict) else ():
            if field in given and (several or given[field] != getattr(default, field)):
                fail(f"{where}{place}.{field}", "applies to objective: dpo only")


def _task(name: str, values: dict[str, Any], where: str, prefix: str) -> Task:
    data = data_settings(where, values.get("data", {}))
    monitor, evaluation = values.get("monitor"), values.get("eval")
    every = evaluation.get("every") if isinstance(evaluation, dict) else None
    if isinstance(monitor, dict) and "eval_every" not in monitor and is_int(every):
        monitor = {**monitor, "eval_every": every}  # a monitor reading held-out losses reads these
    monitor = _monitor(where, monitor)
    adapters = _adapters(where, values, prefix)
    held_out = bool(data["eval_fraction"] or data.get("eval_path") or data.get("eval_split"))
    if (objective := values.get("objective", "sft")) not in OBJECTIVES:
        fail(f"{where}objective", f"{objective!r} must be one of {', '.join(OBJECTIVES)}")
    if objective == "dpo" and held_out and (evaluation is None or isinstance(evaluation, dict)):
        evaluation = {"metric": DPO_METRICS[0], **(evaluation or {})}  # the leaderboard shows it
    evaluation = _eval(where, evaluation, monitor, objective)
    search = None if "search" not in values else parse_search(where, values["search"], values.get("defaults") or {},
                                                              evaluation.every)
    if (export := values.get("export", "best" if held_out else "last")) not in EXPORTS:
        fail(f"{where}export", f"{export!r} must be one of {', '.join(EXPORTS)}")
    if not held_out:
        for key, needs in (("monitor.signal", monitor is not None and monitor.signal == "eval"),
                           ("export", export == "best"), ("eval.metric", evaluation.metric is not None),
                           ("search", search is not None)):
            if needs:
                fail(f"{where}{key}", "needs held-out data: set data.eval_fraction > 0 (or eval_path/eval_split)")
    if objective != "dpo":
        _refuse_dpo_fields(where, values)
    if objective == "dpo" and data["train_on"] == "all":
        fail(f"{where}data.train_on", "all: dpo scores each answer's completion tokens (train_on: completion)")
    if evaluation.metric is not None and data["train_on"] == "all":
        fail(f"{where}eval.metric", "scores completions: it needs train_on: completion (prompts and replies)")
    return Task(name, data, adapters, monitor, evaluation, export, where, prefix, search, objective)


def parse_tasks(raw: dict[str, Any], name: str) -> dict[str, Task]:
    """The sweep's tasks: the top level as one task named `name`, or each entry of `tasks` over the
    top level's settings."""
    shared = {k: raw[k] for k in TASK_KEYS if k in raw}
    if "tasks" not in raw:
        return {name: _task(name, shared, "", "")}
    entries = raw["tasks"]
    if not isinstance(entries, list) or not entries or any(not isinstance(t, dict) for t in entries):
        fail("tasks", "must be a non-empty list of mappings (name, objective, data, defaults, grid, adapters, monitor, "
                       "eval, export)")
    for key in ("data", "defaults"):
        if not isinstance(shared.get(key, {}), dict):
            fail(key, "must be a mapping")
    if shared.get("defaults"):  # named as written (defaults.rnak), not as the task that merged them
        _check_fields("defaults", shared["defaults"])
        _adapter_config(dict.fromkeys(shared["defaults"], "defaults"), shared["defaults"])
    tasks: dict[str, Task] = {}
    for i, entry in enumerate(entries):
        unknown = set(entry) - TASK_KEYS - {"name"}
        if unknown:
            fail(f"tasks[{i}]", f"unknown key {sorted(unknown, key=str)[0]!r}; keys: name, "
                                 f"{', '.join(sorted(TASK_KEYS))}")
        tname = as_name(entry.get("name"))
        if not valid_adapter_id(tname):
            fail(f"tasks[{i}].name", f"{entry.get('name')!r} must be letters, digits, '-' or '_'")
        if tname in tasks:
            fail(f"tasks[{i}].name", f"duplicate task {tname!r}")
        where = f"tasks[{tname}]."
        values = {**shared, **entry}
        for key in ("data", "defaults"):
            if not isinstance(entry.get(key, {}), dict):
                fail(f"{where}{key}", "must be a mapping")
            values[key] = {**shared.get(key, {}), **entry.get(key, {})}
        tasks[tname] = _task(tname, values, where, f"{tname}/")
    return tasks
