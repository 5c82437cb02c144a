"""Training data for a sweep: records (alto.records: their sources and formats) tokenized once (chat
templates: the tokenizer's own) and split into train and held-out sequences.

A sequence is a list of token ids in which a context-only token (seen by the model, never a
target: a prompt, a user turn) is stored as ``~id`` (negative); :func:`ids_and_labels` turns a
sequence into model inputs and labels. A record gives one sequence, or a preference pair two
(prompt + chosen, prompt + rejected, the prompt context-only), kept next to each other: a pair is
a sample of two sequences everywhere after (alto.objectives). Everything that only needs lengths
(packing, admission, data streams) handles one plain list per sequence.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from alto.records import Record, load_records, record_kind


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


def _prompted(tokenizer: Tokenizer, prompt: str | list[dict], completion: str | list[dict], eos: list[int],
              train_on: str) -> list[int]:
    """A prompt's and a completion's tokens, the completion trained."""
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


def record_sequences(record: dict[str, Any], tokenizer: Tokenizer, eos_id: int | None, train_on: str) -> list[list[int]]:
    """One record's sequences (see the module docstring): plain text and string completions end with
    EOS (when the tokenizer has one); chat templates write their own end-of-turn tokens."""
    eos = [] if eos_id is None else [eos_id]
    kind = record_kind(record)
    if kind == "messages":
        return [_chat_tokens(tokenizer, record["messages"], 0, train_on)]
    if kind == "prompt":
        return [_prompted(tokenizer, record["prompt"], record["completion"], eos, train_on)]
    if kind == "preference":
        return [_prompted(tokenizer, record["prompt"], record[k], eos, train_on) for k in ("chosen", "rejected")]
    return [list(tokenizer.encode(record["text"])) + eos]


def tokenize(records: Sequence[Record], tokenizer: Tokenizer, max_length: int, eos_id: int | None,
             train_on: str = "completion") -> list[list[int]]:
    """Every record's sequences (context-only tokens as ~id), each cut to max_length; a record with a
    sequence that has no trained token after its first (nothing to predict: e.g. a prompt longer
    than max_length) is dropped (a pair whole)."""
    out = []
    for record, where in records:
        try:
            sequences = [s[:max_length] for s in record_sequences(record, tokenizer, eos_id, train_on)]
        except ValueError as e:
            raise ValueError(f"data: {where}: {e}") from None
        if all(any(t >= 0 for t in s[1:]) for s in sequences):
            out += sequences
    return out


def task_sequences(data: dict[str, Any], tokenizer: Tokenizer, eos_id: int | None,
                   pairs: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held-out) sequences of a task's data settings (alto.tasks): held out from the
    records (eval_fraction) or read from eval_path / eval_split; pairs: preference pairs (DPO),
    two sequences each, held out whole."""
    def sequences(records: Sequence[Record]) -> list[list[int]]:
        if seqs := tokenize(records, tokenizer, data["max_length"], eos_id, data["train_on"]):
            return seqs
        raise ValueError(f"data: none of the {len(records)} records has a token to train on within "
                         f"max_length={data['max_length']}")

    per_sample = 2 if pairs else 1
    train = sequences(load_records(data["source"], data.get("path"), data["split"], data.get("topics"),
                                   pairs)[: data["limit"]])
    if data.get("eval_path") is None and data.get("eval_split") is None:
        return split(train, data["eval_fraction"], per_sample=per_sample)
    held_out = load_records(data["source"], data.get("eval_path") or data["path"], data.get("eval_split") or data["split"],
                            pairs=pairs)
    return split(train, 0.0, per_sample=per_sample)[0], sequences(held_out)


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


def split(seqs: Sequence[list[int]], eval_fraction: float, seed: int = 0,
          per_sample: int = 1) -> tuple[list[list[int]], list[list[int]]]:
    """Deterministic shuffle of the samples (per_sample consecutive sequences each), then the first
    eval_fraction of them (at least 1) is held out."""
    order = [list(seqs[i:i + per_sample]) for i in range(0, len(seqs), per_sample)]
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(order) * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval >= len(order):
        raise ValueError(f"data: {len(order)} {'pairs' if per_sample == 2 else 'sequences'} are too few to hold out "
                         f"{eval_fraction:.0%} for eval")
    return [s for sample in order[n_eval:] for s in sample], [s for sample in order[:n_eval] for s in sample]
