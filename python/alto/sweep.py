"""Sweep files for ``alto tune``: parsing and validation, with errors that name the field.

```yaml
name: demo
model: smollm2                  # or {hf_dir: DIR, gguf_file: F} or {random_llama: {hidden_size: 64, ...}}
                               # [+ dtype: float32 (default) | float64 (exact math, device cpu)]
data: {source: chatterbot, max_length: 96, eval_fraction: 0.1, limit: 600}   # or jsonl/text + path,
                               # or hf + path (dataset name or save_to_disk folder) [+ split: train]
device: auto                   # auto | cpu | cuda
checkpoint_every: 10           # micro-steps
defaults: {rank: 8, alpha: 16, lr: 1e-4, micro_batch_size: 4, max_steps: 30}
grid: {rank: [4, 16], lr: [1e-4, 1e-3]}    # cartesian product over these fields
adapters: [{id: wide, rank: 64}]           # explicit extra configurations
monitor: {rule: asha, grace: 8, eta: 2}    # early termination (alto.monitor); absent = never stop early
max_running: 8                             # adapter slots per rank; the rest queue and take freed slots
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

TOP_KEYS = {"name", "model", "data", "device", "checkpoint_every", "defaults", "grid", "adapters", "output",
            "monitor", "max_running", "reclaim"}
DATA_KEYS = {"source", "path", "split", "max_length", "eval_fraction", "limit"}
DATA_SOURCES = ("chatterbot", "jsonl", "text", "hf")
MODEL_KEYS = {"hf_dir", "gguf_file", "random_llama", "dtype"}
MODEL_DTYPES = ("float32", "float64")
# Sizes of a random_llama that must be positive ints (the rest goes to LlamaConfig as given).
RANDOM_LLAMA_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "max_position_embeddings", "head_dim")
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
    max_running: int | None = None  # adapter slots on the GPU; the rest wait in the queue
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


def _model_spec(model: Any, device: str) -> Any:
    """The model setting, checked: smollm2, or a mapping with hf_dir [+ gguf_file] or random_llama
    [+ dtype]."""
    usage = "must be smollm2, {hf_dir: DIR[, gguf_file: F]} or {random_llama: {...}} [+ dtype]"
    if model == "smollm2":
        return model
    if not isinstance(model, dict) or set(model) - MODEL_KEYS or ("hf_dir" in model) == ("random_llama" in model):
        _fail("model", f"{model!r} {usage}")
    for key in ("hf_dir", "gguf_file"):
        if key in model and not (isinstance(model[key], str) and model[key]):
            _fail(f"model.{key}", f"{model[key]!r} must be a non-empty path")
    if "gguf_file" in model and "hf_dir" not in model:
        _fail("model.gguf_file", "needs model.hf_dir (the folder holding the file)")
    dtype = model.get("dtype", "float32")
    if dtype not in MODEL_DTYPES:
        _fail("model.dtype", f"{dtype!r} must be one of {', '.join(MODEL_DTYPES)}")
    if dtype == "float64" and device != "cpu":
        _fail("model.dtype", "float64 (exact math for checks) runs on the CPU only: set device: cpu")
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
    data = {"source": "chatterbot", "max_length": 128, "eval_fraction": 0.1, "limit": None, "split": "train", **data}
    if data["source"] not in DATA_SOURCES:
        _fail("data.source", f"{data['source']!r} must be one of {', '.join(DATA_SOURCES)}")
    if not is_int(data["max_length"]) or data["max_length"] < 2:
        _fail("data.max_length", f"{data['max_length']!r} must be an int >= 2")
    if not is_number(data["eval_fraction"]) or not 0 <= data["eval_fraction"] < 1:
        _fail("data.eval_fraction", f"{data['eval_fraction']!r} must be in [0, 1)")
    if data["limit"] is not None and (not is_int(data["limit"]) or data["limit"] < 2):
        _fail("data.limit", f"{data['limit']!r} must be an int >= 2")
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
    model = _model_spec(raw.get("model", "smollm2"), device)

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
    max_running = raw.get("max_running")
    if max_running is not None and (not is_int(max_running) or max_running < 1):
        _fail("max_running", f"{max_running!r} must be an int >= 1")
    reclaim = raw.get("reclaim", "admit")
    if reclaim not in ("admit", "grow"):
        _fail("reclaim", f"{reclaim!r} must be admit or grow")
    given = raw.get("name", "sweep")
    name = _as_name(given)
    if not name or "/" in name or name in (".", ".."):
        _fail("name", f"{given!r} must be a plain folder name (it names runs/<name>)")
    if raw.get("output") is not None and not (isinstance(raw["output"], str) and raw["output"]):
        _fail("output", f"{raw['output']!r} must be a folder path")
    return Sweep(name, model, data, device, every, adapters, raw, raw.get("output"), monitor_cfg, max_running, reclaim)
