"""Training text for a sweep: the chatterbot-corpus Q/A dialogues (offline, from PyPI), JSONL or
plain-text files, or a Hugging Face dataset; tokenized once and split into train and held-out
sequences."""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from alto.inputs import read_text


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 1..256 (0 = padding): for random-init test models."""

    vocab_size = 257
    pad_id = 0

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]


def chatterbot_texts(language: str = "english") -> list[str]:
    """Every dialogue of chatterbot-corpus as 'User: ...\\nAssistant: ...' turns."""
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data" / language
    if not root.is_dir():
        raise ValueError(f"data: chatterbot-corpus has no language {language!r}")
    texts = []
    for path in sorted(root.glob("*.yml")):
        for conv in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [f"{'User' if i % 2 == 0 else 'Assistant'}: {str(t).strip()}" for i, t in enumerate(conv)]
            if len(turns) >= 2:
                texts.append("\n".join(turns))
    return texts


def row_text(row, where: str) -> str:
    """A record's training text: its 'text' field, or 'prompt' + 'completion'."""
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return row["prompt"] + row["completion"]
    raise ValueError(f"data: {where} needs a 'text' field or 'prompt' and 'completion'")


def jsonl_texts(path: Path) -> list[str]:
    texts = []
    for n, line in enumerate(read_text(path, "data file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data: {path}:{n} is not valid JSON ({e.msg})") from None
        texts.append(row_text(row, f"{path}:{n}"))
    return texts


def hf_texts(name: str, split: str) -> list[str]:
    """A Hugging Face dataset's texts: a folder written by save_to_disk, or anything
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
    return [row_text(row, f"{name}[{split}][{i}]") for i, row in enumerate(ds)]


def load_texts(source: str, path: str | None = None, split: str = "train") -> list[str]:
    if source == "chatterbot":
        texts = chatterbot_texts()
    elif source == "hf":
        if not path:
            raise ValueError("data.path is required for source 'hf' (a dataset name or save_to_disk folder)")
        texts = hf_texts(path, split)
    elif source in ("jsonl", "text"):
        if not path:
            raise ValueError(f"data.path is required for source {source!r}")
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"data.path: no such file {path!r}")
        if source == "jsonl":
            texts = jsonl_texts(p)
        else:
            texts = [b.strip() for b in read_text(p, "data file").split("\n\n") if b.strip()]
    else:
        raise ValueError(f"data.source={source!r} is invalid: one of chatterbot, jsonl, text, hf")
    if not texts:
        raise ValueError(f"data: no texts found in {source} {path or ''}".rstrip())
    return texts


def tokenize(texts: Sequence[str], tokenizer: Tokenizer, max_length: int, eos_id: int | None) -> list[list[int]]:
    """Token ids per text (with EOS when the tokenizer has one), cut to max_length; texts of
    fewer than 2 tokens are dropped (nothing to predict)."""
    out = []
    for t in texts:
        ids = list(tokenizer.encode(t))
        if eos_id is not None:
            ids.append(eos_id)
        ids = ids[:max_length]
        if len(ids) >= 2:
            out.append(ids)
    return out


def split(seqs: Sequence[list[int]], eval_fraction: float, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Deterministic shuffle, then the first eval_fraction (at least 1) is held out."""
    order = list(seqs)
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(order) * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval >= len(order):
        raise ValueError(f"data: {len(order)} sequences are too few to hold out {eval_fraction:.0%} for eval")
    return order[n_eval:], order[:n_eval]
