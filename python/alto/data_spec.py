"""A task's data settings (alto.tasks' `data:`), checked without importing torch, with the defaults
filled in; errors name the field (data.max_length, tasks[x].data.path).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from alto.inputs import is_int, is_number

DATA_KEYS = {"source", "path", "split", "max_length", "eval_fraction", "limit", "train_on", "topics", "eval_path",
             "eval_split"}
DATA_SOURCES = ("chatterbot", "jsonl", "text", "hf")
TRAIN_ON = ("completion", "all")  # the loss on the completion tokens only, or on every token


def fail(where: str, msg: str) -> None:
    raise ValueError(f"{where}: {msg}")


def data_settings(where: str, data: Any) -> dict[str, Any]:
    """A task's data settings, checked, with the defaults filled in."""
    if not isinstance(data, dict) or set(data) - DATA_KEYS:
        fail(f"{where}data", f"must be a mapping with keys {', '.join(sorted(DATA_KEYS))}")
    eval_source = data.get("eval_path") is not None or data.get("eval_split") is not None
    data = {"source": "chatterbot", "max_length": 128, "eval_fraction": 0.1, "limit": None, "split": "train",
            "train_on": "completion", **data}
    w = f"{where}data."
    if data["source"] not in DATA_SOURCES:
        fail(f"{w}source", f"{data['source']!r} must be one of {', '.join(DATA_SOURCES)}")
    if not is_int(data["max_length"]) or data["max_length"] < 2:
        fail(f"{w}max_length", f"{data['max_length']!r} must be an int >= 2")
    if not is_number(data["eval_fraction"]) or not 0 <= data["eval_fraction"] < 1:
        fail(f"{w}eval_fraction", f"{data['eval_fraction']!r} must be in [0, 1)")
    if data["limit"] is not None and (not is_int(data["limit"]) or data["limit"] < 2):
        fail(f"{w}limit", f"{data['limit']!r} must be an int >= 2")
    if data["train_on"] not in TRAIN_ON:
        fail(f"{w}train_on", f"{data['train_on']!r} must be one of {', '.join(TRAIN_ON)}")
    for key in ("split", "eval_split"):
        if key in data and not isinstance(data[key], str):
            fail(f"{w}{key}", f"{data[key]!r} must be a split name")
    chatterbot = data["source"] == "chatterbot"
    if "topics" in data and (not chatterbot or not isinstance(data["topics"], list) or not data["topics"]
                             or not all(isinstance(t, str) for t in data["topics"])):
        fail(f"{w}topics", f"{data['topics']!r} must be a non-empty list of chatterbot-corpus topics "
                            "(with source: chatterbot)")
    if eval_source:  # the held-out data: eval_path / eval_split replace eval_fraction (a shared one too)
        data["eval_fraction"] = 0.0
    if chatterbot and eval_source:
        fail(f"{w}{'eval_path' if 'eval_path' in data else 'eval_split'}",
             "chatterbot holds out eval_fraction of its dialogues (no eval_path/eval_split)")
    if "eval_split" in data and data["source"] != "hf":
        fail(f"{w}eval_split", f"applies to source hf, not {data['source']}")
    for key in ("path", "eval_path"):
        if key == "path" and chatterbot or key == "eval_path" and "eval_path" not in data:
            continue
        if not (isinstance(data.get(key), str) and data[key]):
            fail(f"{w}{key}", f"{data.get(key)!r}: source {data['source']} needs a path")
        if data["source"] in ("jsonl", "text") and not Path(data[key]).is_file():
            fail(f"{w}{key}", f"{data[key]!r} is not a file" if Path(data[key]).exists()
                  else f"no such file {data[key]!r}")
    return data
