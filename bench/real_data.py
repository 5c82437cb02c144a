"""Real text for the benchmarks, as JSONL files alto reads (source: jsonl), the same on this machine
and on the GPU machine (which has neither network nor chatterbot-corpus):

- python-docs: the Python Language Reference shipped in CPython's standard library
  (pydoc_data.topics, PSF licence): each topic's paragraphs grouped into chunks of a length drawn
  from 64 to `longest` characters, as prompt ("Python reference, <topic>:") / completion (the chunk)
  records: real prose and code of varied length.
- chatterbot: the chatterbot-corpus dialogues (BSD-3), as chat records (messages), for carrying to
  a machine without the package.
- chatterbot-pairs: the same dialogues as preference pairs (prompt, chosen, rejected strings), for DPO.

Run: python bench/real_data.py python-docs|chatterbot|chatterbot-pairs OUT.jsonl
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def python_docs(path: Path, longest: int = 1500, seed: int = 0) -> Path:
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    with open(path, "w") as f:
        for name in sorted(topics):
            paragraphs = [p.strip() for p in topics[name].split("\n\n") if p.strip()]
            chunk, target = "", rng.randrange(64, longest)
            for p in paragraphs:
                chunk = f"{chunk}\n\n{p}" if chunk else p
                if len(chunk) >= target:
                    f.write(json.dumps({"prompt": f"Python reference, {name}:\n", "completion": chunk[:longest]}) + "\n")
                    chunk, target = "", rng.randrange(64, longest)
            if chunk:
                f.write(json.dumps({"prompt": f"Python reference, {name}:\n", "completion": chunk[:longest]}) + "\n")
    return path


def chatterbot(path: Path) -> Path:
    from alto.records import load_records

    with open(path, "w") as f:
        for record, _where in load_records("chatterbot"):
            f.write(json.dumps(record) + "\n")
    return path


def chatterbot_pairs(path: Path) -> Path:
    """The chatterbot dialogues as preference pairs of strings (alto.records.preference_pairs: the
    reply chosen, another dialogue's rejected), the prompt "User: ...\nAssistant: "."""
    from alto.records import load_records

    with open(path, "w") as f:
        for record, _where in load_records("chatterbot", pairs=True):
            prompt = f"User: {record['prompt'][0]['content']}\nAssistant: "
            f.write(json.dumps({"prompt": prompt, "chosen": record["chosen"][0]["content"],
                                "rejected": record["rejected"][0]["content"]}) + "\n")
    return path


SOURCES = {"python-docs": python_docs, "chatterbot": chatterbot, "chatterbot-pairs": chatterbot_pairs}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in SOURCES:
        sys.exit(__doc__.strip().splitlines()[-1])
    print(SOURCES[sys.argv[1]](Path(sys.argv[2])))
