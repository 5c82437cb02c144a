"""Training data for a sweep: records in the formats TRL's SFTTrainer and HF datasets use, from the
chatterbot-corpus dialogues (offline, from PyPI), JSONL or plain-text files, or a Hugging Face
dataset; tokenized once (chat templates: the tokenizer's own) and split into train and held-out
sequences.

Records (one JSON object each):
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation, rendered with the
  tokenizer's chat template; with ``train_on: completion`` (the default) the loss covers the
  assistant turns only.
- ``{"prompt": ..., "completion": ...}``: strings, or message lists (a conversational prompt and
  the assistant's reply); the loss covers the completion only by default.
- ``{"text": ...}``: the loss covers every token.

A sequence is a list of token ids in which a context-only token (seen by the model, never a
target: a prompt, a user turn) is stored as ``~id`` (negative); :func:`ids_and_labels` turns a
sequence into model inputs and labels. Everything that only needs lengths (packing, admission,
data streams) handles one plain list per sequence.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from alto.inputs import read_text

ROLES = ("system", "user", "assistant", "tool")
Record = tuple[dict[str, Any], str]  # a record and where it came from ("file:line"), for errors


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(self, messages: list[dict], tokenize: bool, add_generation_prompt: bool) -> str: ...


def context(ids: Sequence[int]) -> list[int]:
    """Tokens the model sees but is not trained to predict."""
    return [~i for i in ids]


def ids_and_labels(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels: -100 at context-only tokens) of sequences' tokens."""
    seen = tokens < 0
    return torch.where(seen, ~tokens, tokens), tokens.masked_fill(seen, -100)


def chatterbot_records(topics: Sequence[str] | None = None, language: str = "english") -> list[Record]:
    """The dialogues of chatterbot-corpus (of these topics, default all) as conversations of
    alternating user/assistant turns."""
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
    return records


def _is_messages(value) -> bool:
    return (isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value))


def record_kind(row) -> str | None:
    """messages | prompt | text: the record's format by its fields (None values count as absent:
    HF datasets fill a column missing from a row with None), or None."""
    if not isinstance(row, dict):
        return None
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
        if kind == "prompt":
            p, c = row["prompt"], row["completion"]
            if not (isinstance(p, str) and isinstance(c, str) or _is_messages(p) and _is_messages(c)):
                raise ValueError(f"data: {where}: 'prompt' and 'completion' must both be strings or both "
                                 "lists of {role, content} messages")
            return row, where
        return row, where
    raise ValueError(f"data: {where} needs a 'text' field, 'prompt' and 'completion', or 'messages'")


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
                 topics: Sequence[str] | None = None) -> list[Record]:
    if source == "chatterbot":
        records = chatterbot_records(topics)
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
    return records


def _render(tokenizer: Tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    """A conversation through the tokenizer's chat template, as ids (the template writes any
    special tokens itself)."""
    from jinja2 import TemplateError  # transformers' template engine

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (ValueError, TypeError, TemplateError) as e:  # no chat template, or one refusing these turns
        raise ValueError(f"cannot render it with the tokenizer's chat template ({str(e).splitlines()[0]})") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def _chat_tokens(tokenizer: Tokenizer, messages: list[dict], trained_from: int, train_on: str) -> list[int]:
    """A conversation's tokens, the assistant turns from message `trained_from` on trained (the
    rest context-only). Each turn's span is where the rendering of the conversation up to it ends,
    compared on token ids: a template that renders a conversation's beginning differently from the
    whole cannot be masked this way (train_on: all can still use it)."""
    full = _render(tokenizer, messages, False)
    if train_on == "all":
        return full
    out, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < trained_from:
            continue
        if i == 0:
            raise ValueError("the conversation starts with an assistant turn: nothing prompts it (train_on: all "
                             "trains on every token)")
        start = _render(tokenizer, messages[:i], True)
        end = _render(tokenizer, messages[: i + 1], False) if i + 1 < len(messages) else full
        if full[: len(start)] != start or full[: len(end)] != end or not done <= len(start) <= len(end):
            raise ValueError("the chat template does not render the conversation's beginning as a prefix of the "
                             "whole, so its assistant tokens cannot be found (train_on: all trains on every token)")
        out += context(full[done : len(start)]) + full[len(start) : len(end)]
        done = len(end)
    return out + context(full[done:])


def record_tokens(record: dict[str, Any], tokenizer: Tokenizer, eos_id: int | None, train_on: str) -> list[int]:
    """One record's tokens (see the module docstring): plain text and string completions end with
    EOS (when the tokenizer has one); chat templates write their own end-of-turn tokens."""
    eos = [] if eos_id is None else [eos_id]
    kind = record_kind(record)
    if kind == "messages":
        return _chat_tokens(tokenizer, record["messages"], 0, train_on)
    if kind == "prompt":
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list):
            return _chat_tokens(tokenizer, prompt + completion, len(prompt), train_on)
        # TRL's convention: prompt and prompt + completion tokenized, the completion is what
        # follows the prompt's tokens (a token merged across the boundary counts as completion)
        whole = list(tokenizer.encode(prompt + completion)) + eos
        if train_on == "all":
            return whole
        head = list(tokenizer.encode(prompt))
        n = next((i for i, (a, b) in enumerate(zip(head, whole)) if a != b), min(len(head), len(whole)))
        return context(whole[:n]) + whole[n:]
    return list(tokenizer.encode(record["text"])) + eos


def tokenize(records: Sequence[Record], tokenizer: Tokenizer, max_length: int, eos_id: int | None,
             train_on: str = "completion") -> list[list[int]]:
    """Every record's tokens (context-only ones as ~id), cut to max_length; a sequence with no
    trained token after its first (nothing to predict: e.g. a prompt longer than max_length) is
    dropped."""
    out = []
    for record, where in records:
        try:
            tokens = record_tokens(record, tokenizer, eos_id, train_on)[:max_length]
        except ValueError as e:
            raise ValueError(f"data: {where}: {e}") from None
        if any(t >= 0 for t in tokens[1:]):
            out.append(tokens)
    return out


def task_sequences(data: dict[str, Any], tokenizer: Tokenizer, eos_id: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held-out) sequences of a task's data settings (alto.sweep): held out from the
    records (eval_fraction) or read from eval_path / eval_split."""
    def sequences(records: Sequence[Record]) -> list[list[int]]:
        if seqs := tokenize(records, tokenizer, data["max_length"], eos_id, data["train_on"]):
            return seqs
        raise ValueError(f"data: none of the {len(records)} records has a token to train on within "
                         f"max_length={data['max_length']}")

    train = sequences(load_records(data["source"], data.get("path"), data["split"], data.get("topics"))[: data["limit"]])
    if data.get("eval_path") is None and data.get("eval_split") is None:
        return split(train, data["eval_fraction"])
    held_out = load_records(data["source"], data.get("eval_path") or data["path"], data.get("eval_split") or data["split"])
    return split(train, 0.0)[0], sequences(held_out)


def prompt_and_reply(tokens: Sequence[int]) -> tuple[list[int], list[int]] | None:
    """A held-out sequence as (prompt ids, reference reply ids): its last trained span and all
    before it; None without context before it (nothing prompts it)."""
    end = len(tokens)
    while end and tokens[end - 1] < 0:  # context after the reply (a template's trailing newline)
        end -= 1
    start = end
    while start and tokens[start - 1] >= 0:
        start -= 1
    return None if start in (0, end) else ([t if t >= 0 else ~t for t in tokens[:start]], list(tokens[start:end]))


def split(seqs: Sequence[list[int]], eval_fraction: float, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Deterministic shuffle, then the first eval_fraction (at least 1) is held out."""
    order = list(seqs)
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(order) * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval >= len(order):
        raise ValueError(f"data: {len(order)} sequences are too few to hold out {eval_fraction:.0%} for eval")
    return order[n_eval:], order[:n_eval]
