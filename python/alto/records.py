"""Where a sweep's records come from and what they are: the chatterbot-corpus dialogues (offline,
from PyPI), JSONL or plain-text files, or a Hugging Face dataset, each record checked as it is read
(a bad one is one error naming its file and line). Records are one JSON object each, in the formats
TRL's trainers take:

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation (SFT).
- ``{"prompt": ..., "completion": ...}``: strings, or message lists (a conversational prompt and
  the assistant's reply) (SFT).
- ``{"text": ...}``: plain text (SFT).
- ``{"prompt": ..., "chosen": ..., "rejected": ...}``: a preference pair (DPO), strings or message
  lists (the prompt's turns, then each answer's).

alto.data tokenizes them.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alto.inputs import read_text

ROLES = ("system", "user", "assistant", "tool")
Record = tuple[dict[str, Any], str]  # a record and where it came from ("file:line"), for errors


def chatterbot_records(topics: Sequence[str] | None = None, language: str = "english", pairs: bool = False) -> list[Record]:
    """The dialogues of chatterbot-corpus (of these topics, default all) as conversations of
    alternating user/assistant turns; pairs: as preference pairs instead (preference_pairs)."""
    import yaml
    try:
        import chatterbot_corpus
    except ImportError:
        raise ValueError("data.source=chatterbot needs the chatterbot-corpus package (scripts/install.sh)") from None
    root = Path(chatterbot_corpus.__file__).parent / "data" / language
    if not root.is_dir():
        raise ValueError(f"data: chatterbot-corpus has no language {language!r}")
    files = {path.stem: path for path in sorted(root.glob("*.yml"))}
    for topic in topics or ():
        if topic not in files:
            raise ValueError(f"data.topics: {topic!r} is not a chatterbot-corpus topic; topics: {', '.join(files)}")
    records = []
    for path in (files[t] for t in topics) if topics else files.values():
        for n, conv in enumerate(yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", [])):
            turns = [{"role": ("user", "assistant")[i % 2], "content": str(t).strip()} for i, t in enumerate(conv)]
            if len(turns) >= 2:
                records.append(({"messages": turns}, f"{path.name}[{n}]"))
    return preference_pairs(records) if pairs else records


def preference_pairs(dialogues: Sequence[Record]) -> list[Record]:
    """Each dialogue's first exchange as a preference pair: its reply chosen, and rejected the first
    reply of a later dialogue (cyclically) that says something else (none: the dialogue is left out)."""
    replies = [d["messages"][1]["content"] for d, _ in dialogues]
    out = []
    for i, (d, where) in enumerate(dialogues):
        other = next((r for r in replies[i + 1:] + replies[:i] if r != replies[i]), None)
        if other is not None:
            out.append(({"prompt": d["messages"][:1], "chosen": [d["messages"][1]],
                         "rejected": [{"role": "assistant", "content": other}]}, where))
    return out


def _is_messages(value) -> bool:
    return (isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value))


def record_kind(row) -> str | None:
    """messages | preference | prompt | text: the record's format by its fields (None values count
    as absent: HF datasets fill a column missing from a row with None), or None."""
    if not isinstance(row, dict):
        return None
    if row.get("chosen") is not None or row.get("rejected") is not None:
        return "preference"
    if row.get("messages") is not None:
        return "messages"
    if row.get("prompt") is not None and row.get("completion") is not None:
        return "prompt"
    return "text" if isinstance(row.get("text"), str) else None


def check_record(row, where: str) -> Record:
    """The record if it has one of the formats (see the module docstring), else one clear error."""
    kind = record_kind(row)
    if kind is not None:
        if kind == "messages":
            if not _is_messages(row["messages"]) or not any(m["role"] == "assistant" for m in row["messages"]):
                raise ValueError(f"data: {where}: 'messages' must be a list of {{role, content}} with roles "
                                 f"{', '.join(ROLES)} and at least one assistant turn")
            return row, where
        if kind == "preference":
            answers = (row.get("prompt"), row.get("chosen"), row.get("rejected"))
            if not (all(isinstance(v, str) for v in answers) or all(map(_is_messages, answers))):
                raise ValueError(f"data: {where}: a preference record needs 'prompt', 'chosen' and 'rejected', all "
                                 "strings or all lists of {role, content} messages")
            if isinstance(answers[1], list) and any(m["role"] != "assistant" for m in answers[1] + answers[2]):
                raise ValueError(f"data: {where}: 'chosen' and 'rejected' are the assistant's answers: their "
                                 "messages' role must be assistant")
            return row, where
        if kind == "prompt":
            p, c = row["prompt"], row["completion"]
            if not (isinstance(p, str) and isinstance(c, str) or _is_messages(p) and _is_messages(c)):
                raise ValueError(f"data: {where}: 'prompt' and 'completion' must both be strings or both "
                                 "lists of {role, content} messages")
            return row, where
        return row, where
    raise ValueError(f"data: {where} needs a 'text' field, 'prompt' and 'completion', 'messages', or 'prompt', "
                     "'chosen' and 'rejected'")


def jsonl_records(path: Path) -> list[Record]:
    records = []
    for n, line in enumerate(read_text(path, "data file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data: {path}:{n} is not valid JSON ({e.msg})") from None
        records.append(check_record(row, f"{path}:{n}"))
    return records


def hf_records(name: str, split: str) -> list[Record]:
    """A Hugging Face dataset's records: a folder written by save_to_disk, or anything
    datasets.load_dataset takes (a hub name from the local cache, or local data files)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("data.source=hf needs the datasets package (pip install datasets)") from None
    try:
        if Path(name).is_dir() and any((Path(name) / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ValueError(f"data.path: cannot load dataset {name!r} ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"data.split={split!r} is not a split of {name!r}; splits: {', '.join(ds)}")
        ds = ds[split]
    return [check_record(row, f"{name}[{split}][{i}]") for i, row in enumerate(ds)]


def load_records(source: str, path: str | None = None, split: str = "train",
                 topics: Sequence[str] | None = None, pairs: bool = False) -> list[Record]:
    """A data source's records, each checked; pairs: preference pairs are wanted (chatterbot's
    dialogues are made into pairs; another source's records must be pairs, and only then)."""
    if source == "chatterbot":
        records = chatterbot_records(topics, pairs=pairs)
    elif source == "hf":
        if not path:
            raise ValueError("data.path is required for source 'hf' (a dataset name or save_to_disk folder)")
        records = hf_records(path, split)
    elif source in ("jsonl", "text"):
        if not path or not Path(path).is_file():
            raise ValueError(f"data.path: no such file {path!r} (source {source} needs one)")
        p = Path(path)
        records = jsonl_records(p) if source == "jsonl" else [
            ({"text": b.strip()}, f"{p}[{i}]") for i, b in enumerate(read_text(p, "data file").split("\n\n")) if b.strip()]
    else:
        raise ValueError(f"data.source={source!r} is invalid: one of chatterbot, jsonl, text, hf")
    if not records:
        raise ValueError(f"data: no records found in {source} {path or ''}".rstrip())
    for record, where in records:
        if (record_kind(record) == "preference") != pairs:
            raise ValueError(f"data: {where} is a preference pair (prompt, chosen, rejected): objective dpo trains on "
                             "those" if not pairs else
                             f"data: {where} is not a preference pair (prompt, chosen, rejected), which objective dpo "
                             "trains on")
    return records
