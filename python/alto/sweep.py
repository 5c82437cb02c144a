"""Sweep files for ``alto tune``: parsing and validation, with errors that name the field.

```yaml
name: demo
model: smollm2                  # or {hf_dir: DIR, gguf_file: F} or {random_llama: {hidden_size: 64, ...}}
base: {dtype: auto}             # the frozen base's weights: auto = bfloat16 on a GPU, float32 on the CPU;
                               # or bfloat16 | float32 | float64 (exact math, device cpu);
                               # quantize: nf4 holds its decoder projections in 4 bits (QLoRA; alto.base)
shard_base: false              # true: the frozen decoder layers sharded over the ranks (FSDP2), adapters
                               # rank-local; auto: sharded when the base does not fit one device
device: auto                   # auto | cpu | cuda
checkpoint_every: 10           # micro-steps
max_running: auto                          # adapters co-located per rank: auto = as many as the memory
                                           # model predicts fit (alto.admission), or a number; the rest queue
max_tokens_per_step: null                  # a cap on a step's predicted tokens per rank (auto admission)
memory_budget_gb: null                     # what a step may use per rank (default: the device's free memory)
packing: true                              # padding-free steps; false pads every row to the step's longest
reclaim: admit                             # or grow: survivors' micro-batches fill freed samples
report_to: [tensorboard, mlflow]           # experiment tracking (alto.tracking; default none)
data: ..., defaults: ..., grid: ..., adapters: ..., monitor: ..., eval: ..., export: ...   # alto.tasks
tasks:                                     # optional: several tasks over the one base, co-located
  - {name: trivia, data: {topics: [trivia]}, grid: {lr: [1e-4, 1e-3]}}
  - {name: ai, data: {topics: [ai]}, eval: {every: 5}}
```
Without ``tasks`` the file is one task, named by ``name``, whose adapters are named by their ids.
With ``tasks``, each task takes data, defaults, grid, adapters, monitor, eval and export from its
own entry, else from the top level (data and defaults merge key by key), and its adapters are named
``<task>/<id>`` (so exported under ``adapters/<task>/<id>``).

The spec layer: this module, alto.tasks, alto.registry's AdapterConfig, alto.monitor's MonitorConfig
and alto.metrics parse and check what the user wrote without importing torch or the compiled library
(alto submit, status and cancel read sweeps where neither is built).
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from alto.inputs import is_int, is_number
from alto.registry import AdapterConfig
from alto.tasks import TASK_KEYS, Task, as_name, fail, parse_tasks
from alto.tracking import TRACKERS

DEFAULT_SWEEP = """
name: chatterbot-topics
model: smollm2
data: {source: chatterbot, max_length: 64, eval_fraction: 0.15}
device: auto
checkpoint_every: 10
defaults: {alpha: 16, micro_batch_size: 4, max_steps: 12, target_modules: [q_proj, v_proj], max_grad_norm: 1.0}
eval: {every: 6, samples: 16}
tasks:
  - name: trivia
    data: {topics: [trivia]}
    grid: {rank: [4, 16], lr: [3.0e-4, 1.0e-3]}
    eval: {every: 6, samples: 16, metric: exact_match, max_new_tokens: 12}
  - {name: ai, data: {topics: [ai]}, grid: {lr: [3.0e-4, 1.0e-3]}}
  - {name: coding, data: {topics: [coding]}, grid: {lr: [3.0e-4, 1.0e-3]}}
"""


TOP_KEYS = {"name", "model", "base", "device", "checkpoint_every", "output", "max_running", "max_tokens_per_step",
            "memory_budget_gb", "packing", "reclaim", "shard_base", "tasks", "report_to"} | TASK_KEYS
MODEL_KEYS = {"hf_dir", "gguf_file", "random_llama"}
BASE_DTYPES = ("auto", "bfloat16", "float32", "float64")
BASE_QUANTIZE = ("none", "nf4")
# Sizes of a random_llama that must be positive ints (the rest goes to LlamaConfig as given).
RANDOM_LLAMA_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "max_position_embeddings", "head_dim", "vocab_size")



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
    device: str
    checkpoint_every: int
    tasks: dict[str, Task]
    raw: dict[str, Any] = field(repr=False)
    output: str | None = None
    base_dtype: str = "auto"  # the frozen base's weights (auto: resolved where the base loads, alto.base)
    max_running: int | None = None  # adapters co-located per rank; None: by memory (alto.admission)
    max_tokens_per_step: int | None = None
    memory_budget_gb: float | None = None
    packing: bool = True
    reclaim: str = "admit"  # when adapters stop: admit queued ones; "grow": also grow survivors' batches
    base_quantize: str = "none"  # nf4: the decoder projections in 4 bits (alto.base)
    shard_base: bool | str = False  # True, False or "auto" (alto.parallel.shard)
    report_to: tuple[str, ...] = ()  # trackers (alto.tracking.TRACKERS)

    @property
    def adapters(self) -> dict[str, AdapterConfig]:
        """Every task's adapters, by run-wide name."""
        return {aid: cfg for t in self.tasks.values() for aid, cfg in t.adapters.items()}


def _base_setting(base: Any, device: str) -> tuple[str, str]:
    """The base setting: its dtype (auto: bfloat16 on a GPU, float32 on the CPU) and its quantization."""
    if base is None:
        base = {}
    if not isinstance(base, dict) or set(base) - {"dtype", "quantize"}:
        fail("base", f"{base!r} must be a mapping with keys dtype, quantize")
    dtype = base.get("dtype", "auto")
    if dtype not in BASE_DTYPES:
        fail("base.dtype", f"{dtype!r} must be one of {', '.join(BASE_DTYPES)}")
    if dtype == "float64" and device != "cpu":
        fail("base.dtype", "float64 (exact math for checks) runs on the CPU only: set device: cpu")
    quantize = base.get("quantize", "none")
    if quantize not in BASE_QUANTIZE:
        fail("base.quantize", f"{quantize!r} must be one of {', '.join(BASE_QUANTIZE)}")
    return dtype, quantize  # auto: resolved for the device the base loads on (alto.base.load_base)


def _model_spec(model: Any) -> Any:
    """The model setting, checked: smollm2, or a mapping with hf_dir [+ gguf_file] or random_llama."""
    usage = "must be smollm2, {hf_dir: DIR[, gguf_file: F]} or {random_llama: {...}}"
    if model == "smollm2":
        return model
    if not isinstance(model, dict) or set(model) - MODEL_KEYS or ("hf_dir" in model) == ("random_llama" in model):
        fail("model", f"{model!r} {usage}")
    for key in ("hf_dir", "gguf_file"):
        if key in model and not (isinstance(model[key], str) and model[key]):
            fail(f"model.{key}", f"{model[key]!r} must be a non-empty path")
    if "gguf_file" in model and "hf_dir" not in model:
        fail("model.gguf_file", "needs model.hf_dir (the folder holding the file)")
    if "random_llama" in model:
        cfg = model["random_llama"] if model["random_llama"] is not None else {}
        if not isinstance(cfg, dict):
            fail("model.random_llama", f"{cfg!r} must be a mapping of LlamaConfig fields")
        for key in RANDOM_LLAMA_SIZES:
            if key in cfg and (not is_int(cfg[key]) or cfg[key] < 1):
                fail(f"model.random_llama.{key}", f"{cfg[key]!r} must be an int >= 1")
        if "seed" in cfg and (not is_int(cfg["seed"]) or not 0 <= cfg["seed"] < 2**63):
            fail("model.random_llama.seed", f"{cfg['seed']!r} must be an int in [0, 2**63)")
        heads = cfg.get("num_attention_heads", 32)  # LlamaConfig's defaults
        if "head_dim" not in cfg and cfg.get("hidden_size", 4096) % heads:
            fail("model.random_llama.num_attention_heads", f"{heads} must divide hidden_size")
        head_dim = cfg.get("head_dim", cfg.get("hidden_size", 4096) // heads)
        if head_dim % 2:  # transformers >= 5.2x says so when the config is made, older releases in the first forward
            fail("model.random_llama", f"head_dim {head_dim} (hidden_size / num_attention_heads unless given) must be "
                                       "even: rope rotates pairs of dimensions")
        if heads % cfg.get("num_key_value_heads", heads):
            fail("model.random_llama.num_key_value_heads", f"{cfg['num_key_value_heads']} must divide "
                  f"num_attention_heads={heads}")
    return model


def parse_sweep(text: str, source: str = "sweep") -> Sweep:
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        fail(source, "must be a mapping of sweep settings")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        fail(source, f"unknown key {sorted(unknown, key=str)[0]!r}; keys: {', '.join(sorted(TOP_KEYS))}")
    given = raw.get("name", "sweep")
    name = as_name(given)
    if not name or "/" in name or name in (".", ".."):
        fail("name", f"{given!r} must be a plain folder name (it names runs/<name>)")
    device = raw.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        fail("device", f"{device!r} must be auto, cpu or cuda")
    every = raw.get("checkpoint_every", 10)
    if not is_int(every) or every < 1:
        fail("checkpoint_every", f"{every!r} must be an int >= 1")
    model = _model_spec(raw.get("model", "smollm2"))
    base_dtype, base_quantize = _base_setting(raw.get("base"), device)
    shard_base = raw.get("shard_base", False)
    if not (isinstance(shard_base, bool) or shard_base == "auto"):
        fail("shard_base", f"{shard_base!r} must be true, false or auto")
    tasks = parse_tasks(raw, name)
    first, *rest = tasks.values()
    if other := next((t for t in rest if t.objective != first.objective), None):
        fail(f"{other.where}objective", f"{other.objective} differs from {first.where}objective {first.objective}: a "
                                        "run trains one objective (run the tasks as two sweeps)")
    if first.objective == "dpo" and shard_base is not False:
        # each rank scores its own new sequences with the base alone: a sharded base's forwards are
        # collectives every rank must join
        fail("shard_base", f"{shard_base!r}: a dpo sweep's base is replicated (shard_base: false)")
    max_running = raw.get("max_running", "auto")
    if max_running != "auto" and (not is_int(max_running) or max_running < 1):
        fail("max_running", f"{max_running!r} must be auto or an int >= 1")
    cap = raw.get("max_tokens_per_step")
    if cap is not None and (not is_int(cap) or cap < 2):
        fail("max_tokens_per_step", f"{cap!r} must be an int >= 2 (or null: no cap)")
    budget = raw.get("memory_budget_gb")
    if budget is not None and (not is_number(budget) or not 0 < budget < 2**40):
        fail("memory_budget_gb", f"{budget!r} must be a positive number of GB (or null: the device's)")
    for key in ("max_tokens_per_step", "memory_budget_gb"):
        if raw.get(key) is not None and max_running != "auto":
            fail(key, f"applies to max_running: auto (admission by memory), not max_running: {max_running}")
    packing = raw.get("packing", True)
    if not isinstance(packing, bool):
        fail("packing", f"{packing!r} must be true or false")
    reclaim = raw.get("reclaim", "admit")
    if reclaim not in ("admit", "grow"):
        fail("reclaim", f"{reclaim!r} must be admit or grow")
    report_to = raw.get("report_to", [])
    report_to = [] if report_to in ("none", None) else [report_to] if isinstance(report_to, str) else report_to
    if not isinstance(report_to, list) or len(set(map(str, report_to))) != len(report_to):
        fail("report_to", f"{raw['report_to']!r} must be a list of trackers: {', '.join(TRACKERS)}")
    for tracker in report_to:
        if not isinstance(tracker, str) or tracker not in TRACKERS:
            fail("report_to", f"{tracker!r} must be one of {', '.join(TRACKERS)}")
        if importlib.util.find_spec(tracker) is None:
            fail("report_to", f"{tracker} is not installed: pip install {TRACKERS[tracker].package}")
    if raw.get("output") is not None and not (isinstance(raw["output"], str) and raw["output"]):
        fail("output", f"{raw['output']!r} must be a folder path")
    return Sweep(name, model, device, every, tasks, raw, raw.get("output"), base_dtype,
                 None if max_running == "auto" else max_running, cap, budget, packing, reclaim, base_quantize,
                 shard_base, tuple(report_to))
