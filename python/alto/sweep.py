"""Sweep files for ``alto tune``: parsing and validation, with errors that name the field.

```yaml
name: demo
model: smollm2                  # or {hf_dir: DIR, gguf_file: F} or {random_llama: {hidden_size: 64, ...}}
base: {dtype: auto}             # the frozen base's weights: auto = bfloat16 on a GPU, float32 on the CPU;
                               # or bfloat16 | float32 | float64 (exact math, device cpu)
data: {source: chatterbot, max_length: 96, eval_fraction: 0.1, limit: 600}   # or jsonl/text + path,
                               # or hf + path (dataset name or save_to_disk folder) [+ split: train];
                               # records: messages | prompt + completion | text (alto.data);
                               # train_on: completion (default: assistant/completion tokens) | all
device: auto                   # auto | cpu | cuda
checkpoint_every: 10           # micro-steps
defaults: {rank: 8, alpha: 16, lr: 1e-4, micro_batch_size: 4, max_steps: 30}
grid: {rank: [4, 16], lr: [1e-4, 1e-3]}    # cartesian product over these fields
adapters: [{id: wide, rank: 64}]           # explicit extra configurations
monitor: {rule: asha, grace: 8, eta: 2}    # early termination (alto.monitor); absent = never stop early
max_running: auto                          # adapters co-located per rank: auto = as many as the memory
                                           # model predicts fit (alto.admission), or a number; the rest queue
max_tokens_per_step: null                  # a cap on a step's predicted tokens per rank (auto admission)
memory_budget_gb: null                     # what a step may use per rank (default: the device's free memory)
packing: true                              # padding-free steps; false pads every row to the step's longest
reclaim: admit                             # or grow: survivors' micro-batches fill freed samples
```
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alto.base import device_type
from alto.data import TRAIN_ON
from alto.inputs import is_int, is_number
from alto.monitor import MonitorConfig
from alto.registry import AdapterConfig, valid_adapter_id

DEFAULT_SWEEP = """
name: smollm2-chatterbot
model: smollm2
data: {source: chatterbot, max_length: 64, eval_fraction: 0.1, limit: 400}
device: auto
checkpoint_every: 10
defaults: {alpha: 16, micro_batch_size: 4, max_steps: 12, target_modules: [q_proj, v_proj], max_grad_norm: 1.0}
grid: {rank: [4, 16], lr: [3.0e-4, 1.0e-3]}
"""

TOP_KEYS = {"name", "model", "base", "data", "device", "checkpoint_every", "defaults", "grid", "adapters", "output",
            "monitor", "max_running", "max_tokens_per_step", "memory_budget_gb", "packing", "reclaim"}
DATA_KEYS = {"source", "path", "split", "max_length", "eval_fraction", "limit", "train_on"}
DATA_SOURCES = ("chatterbot", "jsonl", "text", "hf")
MODEL_KEYS = {"hf_dir", "gguf_file", "random_llama"}
BASE_DTYPES = ("auto", "bfloat16", "float32", "float64")
# Sizes of a random_llama that must be positive ints (the rest goes to LlamaConfig as given).
RANDOM_LLAMA_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "max_position_embeddings", "head_dim", "vocab_size")
CONFIG_FIELDS = {f.name for f in dataclasses.fields(AdapterConfig)}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-4 (no dot) as a string; sweep files mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


@dataclass
class Sweep:
    name: str
    model: Any
    data: dict[str, Any]
    device: str
    checkpoint_every: int
    adapters: dict[str, AdapterConfig]
    raw: dict[str, Any] = field(repr=False)
    output: str | None = None
    monitor: MonitorConfig | None = None  # None: no early termination at all
    base_dtype: str = "float32"  # the frozen base's weights (auto resolved for the device)
    max_running: int | None = None  # adapters co-located per rank; None: by memory (alto.admission)
    max_tokens_per_step: int | None = None
    memory_budget_gb: float | None = None
    packing: bool = True
    reclaim: str = "admit"  # when adapters stop: admit queued ones; "grow": also grow survivors' batches


def _fail(where: str, msg: str) -> None:
    raise ValueError(f"{where}: {msg}")


def _adapter_config(where: str, values: dict[str, Any]) -> AdapterConfig:
    unknown = set(values) - CONFIG_FIELDS
    if unknown:
        _fail(where, f"unknown field {sorted(unknown, key=str)[0]!r}; fields: {', '.join(sorted(CONFIG_FIELDS))}")
    try:
        return AdapterConfig(**values)
    except (ValueError, TypeError) as e:
        _fail(where, str(e))


def _base_dtype(base: Any, device: str) -> str:
    """The base setting's dtype, auto resolved for the device (bfloat16 on a GPU, float32 on the CPU)."""
    if base is None:
        base = {}
    if not isinstance(base, dict) or set(base) - {"dtype"}:
        _fail("base", f"{base!r} must be a mapping with key dtype")
    dtype = base.get("dtype", "auto")
    if dtype not in BASE_DTYPES:
        _fail("base.dtype", f"{dtype!r} must be one of {', '.join(BASE_DTYPES)}")
    if dtype == "float64" and device != "cpu":
        _fail("base.dtype", "float64 (exact math for checks) runs on the CPU only: set device: cpu")
    if dtype == "auto":
        return "bfloat16" if device_type(device) == "cuda" else "float32"
    return dtype


def _model_spec(model: Any) -> Any:
    """The model setting, checked: smollm2, or a mapping with hf_dir [+ gguf_file] or random_llama."""
    usage = "must be smollm2, {hf_dir: DIR[, gguf_file: F]} or {random_llama: {...}}"
    if model == "smollm2":
        return model
    if not isinstance(model, dict) or set(model) - MODEL_KEYS or ("hf_dir" in model) == ("random_llama" in model):
        _fail("model", f"{model!r} {usage}")
    for key in ("hf_dir", "gguf_file"):
        if key in model and not (isinstance(model[key], str) and model[key]):
            _fail(f"model.{key}", f"{model[key]!r} must be a non-empty path")
    if "gguf_file" in model and "hf_dir" not in model:
        _fail("model.gguf_file", "needs model.hf_dir (the folder holding the file)")
    if "random_llama" in model:
        cfg = model["random_llama"] if model["random_llama"] is not None else {}
        if not isinstance(cfg, dict):
            _fail("model.random_llama", f"{cfg!r} must be a mapping of LlamaConfig fields")
        for key in RANDOM_LLAMA_SIZES:
            if key in cfg and (not is_int(cfg[key]) or cfg[key] < 1):
                _fail(f"model.random_llama.{key}", f"{cfg[key]!r} must be an int >= 1")
        if "seed" in cfg and (not is_int(cfg["seed"]) or not 0 <= cfg["seed"] < 2**63):
            _fail("model.random_llama.seed", f"{cfg['seed']!r} must be an int in [0, 2**63)")
        heads = cfg.get("num_attention_heads", 32)  # LlamaConfig's defaults
        if "head_dim" not in cfg and cfg.get("hidden_size", 4096) % heads:
            _fail("model.random_llama.num_attention_heads", f"{heads} must divide hidden_size")
        if heads % cfg.get("num_key_value_heads", heads):
            _fail("model.random_llama.num_key_value_heads", f"{cfg['num_key_value_heads']} must divide "
                  f"num_attention_heads={heads}")
    return model


def _as_name(value: Any) -> str:
    """A name or id as written (YAML reads `3` as an int: it is the name "3"); "" for anything else
    (null, true, lists), which the callers reject."""
    return str(value) if isinstance(value, str) or is_int(value) else ""


def _adapter_id(values: dict[str, Any], keys: list[str]) -> str:
    """rank4-lr0p001: the grid values, spelled with what ids allow."""
    text = "-".join(f"{k}{values[k]}" for k in keys).replace(".", "p")
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "adapter"


def parse_sweep(text: str, source: str = "sweep") -> Sweep:
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        _fail(source, "must be a mapping of sweep settings")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        _fail(source, f"unknown key {sorted(unknown, key=str)[0]!r}; keys: {', '.join(sorted(TOP_KEYS))}")

    data = raw.get("data", {"source": "chatterbot"})
    if not isinstance(data, dict) or set(data) - DATA_KEYS:
        _fail("data", f"must be a mapping with keys {', '.join(sorted(DATA_KEYS))}")
    data = {"source": "chatterbot", "max_length": 128, "eval_fraction": 0.1, "limit": None, "split": "train",
            "train_on": "completion", **data}
    if data["source"] not in DATA_SOURCES:
        _fail("data.source", f"{data['source']!r} must be one of {', '.join(DATA_SOURCES)}")
    if not is_int(data["max_length"]) or data["max_length"] < 2:
        _fail("data.max_length", f"{data['max_length']!r} must be an int >= 2")
    if not is_number(data["eval_fraction"]) or not 0 <= data["eval_fraction"] < 1:
        _fail("data.eval_fraction", f"{data['eval_fraction']!r} must be in [0, 1)")
    if data["limit"] is not None and (not is_int(data["limit"]) or data["limit"] < 2):
        _fail("data.limit", f"{data['limit']!r} must be an int >= 2")
    if data["train_on"] not in TRAIN_ON:
        _fail("data.train_on", f"{data['train_on']!r} must be one of {', '.join(TRAIN_ON)}")
    if not isinstance(data["split"], str):
        _fail("data.split", f"{data['split']!r} must be a split name")
    if data["source"] != "chatterbot" and not (isinstance(data.get("path"), str) and data["path"]):
        _fail("data.path", f"{data.get('path')!r}: source {data['source']} needs a path")
    if data["source"] in ("jsonl", "text") and not Path(data["path"]).is_file():
        _fail("data.path", f"{data['path']!r} is not a file" if Path(data["path"]).exists()
              else f"no such file {data['path']!r}")

    device = raw.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        _fail("device", f"{device!r} must be auto, cpu or cuda")
    every = raw.get("checkpoint_every", 10)
    if not is_int(every) or every < 1:
        _fail("checkpoint_every", f"{every!r} must be an int >= 1")
    model = _model_spec(raw.get("model", "smollm2"))
    base_dtype = _base_dtype(raw.get("base"), device)

    defaults = raw.get("defaults", {}) or {}
    grid = raw.get("grid", {}) or {}
    extra = raw.get("adapters", []) or []
    if not isinstance(defaults, dict):
        _fail("defaults", "must be a mapping of adapter fields")
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        _fail("grid", "must map adapter fields to non-empty lists of values")
    if not isinstance(extra, list) or any(not isinstance(a, dict) for a in extra):
        _fail("adapters", "must be a list of mappings of adapter fields")

    adapters: dict[str, AdapterConfig] = {}
    keys = list(grid)
    for n, combo in enumerate(itertools.product(*grid.values()) if grid else []):
        values = dict(zip(keys, combo))
        aid = _adapter_id(values, keys)
        if aid in adapters:  # e.g. lr: [0.001, 1.0e-3]
            _fail(f"grid[{aid}]", f"two grid points give the id {aid!r}: values repeat")
        adapters[aid] = _adapter_config(f"grid[{aid}]", {"seed": n, **defaults, **values})
    for i, entry in enumerate(extra):
        entry = dict(entry)
        given = entry.pop("id", f"adapter{i}")
        aid = _as_name(given)
        if not valid_adapter_id(aid):
            _fail(f"adapters[{i}].id", f"{given!r} must be letters, digits, '-' or '_'")
        if aid in adapters:
            _fail(f"adapters[{i}]", f"duplicate id {aid!r}")
        adapters[aid] = _adapter_config(f"adapters[{aid}]", {"seed": len(adapters), **defaults, **entry})
    if not adapters:
        _fail(source, "no adapters: give a grid and/or an adapters list")
    monitor = raw.get("monitor")
    if monitor is None:
        monitor_cfg = None
    elif not isinstance(monitor, dict) or set(monitor) - {f.name for f in dataclasses.fields(MonitorConfig)}:
        _fail("monitor", f"must be a mapping with keys {', '.join(f.name for f in dataclasses.fields(MonitorConfig))}")
    else:
        monitor_cfg = MonitorConfig(**monitor)  # its errors name the field (monitor.rule=...)
        if monitor_cfg.signal == "eval" and not data["eval_fraction"]:
            _fail("monitor.signal", "eval needs held-out data: set data.eval_fraction > 0")
    max_running = raw.get("max_running", "auto")
    if max_running != "auto" and (not is_int(max_running) or max_running < 1):
        _fail("max_running", f"{max_running!r} must be auto or an int >= 1")
    cap = raw.get("max_tokens_per_step")
    if cap is not None and (not is_int(cap) or cap < 2):
        _fail("max_tokens_per_step", f"{cap!r} must be an int >= 2 (or null: no cap)")
    budget = raw.get("memory_budget_gb")
    if budget is not None and (not is_number(budget) or not 0 < budget < 2**40):
        _fail("memory_budget_gb", f"{budget!r} must be a positive number of GB (or null: the device's)")
    for key in ("max_tokens_per_step", "memory_budget_gb"):
        if raw.get(key) is not None and max_running != "auto":
            _fail(key, f"applies to max_running: auto (admission by memory), not max_running: {max_running}")
    packing = raw.get("packing", True)
    if not isinstance(packing, bool):
        _fail("packing", f"{packing!r} must be true or false")
    reclaim = raw.get("reclaim", "admit")
    if reclaim not in ("admit", "grow"):
        _fail("reclaim", f"{reclaim!r} must be admit or grow")
    given = raw.get("name", "sweep")
    name = _as_name(given)
    if not name or "/" in name or name in (".", ".."):
        _fail("name", f"{given!r} must be a plain folder name (it names runs/<name>)")
    if raw.get("output") is not None and not (isinstance(raw["output"], str) and raw["output"]):
        _fail("output", f"{raw['output']!r} must be a folder path")
    return Sweep(name, model, data, device, every, adapters, raw, raw.get("output"), monitor_cfg, base_dtype,
                 None if max_running == "auto" else max_running, cap, budget, packing, reclaim)
