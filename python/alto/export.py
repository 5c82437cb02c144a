"""Saving finished adapters in Hugging Face PEFT's format, each loading the way a PEFT user loads one:
``AutoPeftModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``.

``adapter_config.json`` + ``adapter_model.safetensors`` + the base's tokenizer (its chat template
included, as TRL saves it); ``alto_adapter.json`` beside them records the full ALTO config and the
adapter's progress (status, steps, losses, why it stopped, which step's weights were exported). The
config's ``base_model_name_or_path`` is a folder ``AutoModelForCausalLM.from_pretrained`` loads
alone: the base's own folder, or, for a base that is not one (a GGUF file, a random model), its
copy in HF format written once per run (:func:`save_base`). Every folder is written under a
temporary name and renamed, so a crash never leaves a half-written one.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from alto.base import Base, is_nf4, no_progress_bars
from alto.model import LayerTensors, MultiLoraLinear
from alto.registry import Adapter


# How each of ALTO's per-layer tensors (alto.model.TENSOR_NAMES) is laid out in PEFT's file.
TO_PEFT = {"lora_A": lambda t: t, "lora_B": lambda t: t.T}  # ALTO packs lora_B as [r, out]; PEFT: [out, r]


@contextlib.contextmanager
def _written_whole(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` that replaces it once everything is written into it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not tempfile.mkdtemp: the folder gets the user's umask (mkdtemp's is 0700, unreadable to others)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_peft_adapter(weights: dict[str, LayerTensors], adapter: Adapter, out_dir: str | os.PathLike,
                      base_model_name: str | None = None, tokenizer: Any = None,
                      outcome: dict | None = None) -> Path:
    """weights: layer path (relative to the causal LM) -> {tensor name: tensor}. base_model_name:
    a folder AutoModelForCausalLM.from_pretrained loads alone (save_base's), so that
    AutoPeftModelForCausalLM.from_pretrained(out_dir) loads base and adapter alone; tokenizer: the
    base's (or a folder of its saved files), saved beside. outcome: which weights these are and what they are worth
    (alto.results.Outcome), recorded beside."""
    cfg = adapter.config
    tensors = {}
    for path, layer in weights.items():
        for name, t in layer.items():
            tensors[f"base_model.model.{path}.{name}.weight"] = TO_PEFT[name](t.detach().float().cpu()).contiguous()
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": sorted(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    record = {"id": adapter.id, "task": adapter.task, **adapter.progress(), **(outcome or {}), "config": cfg.to_dict(),
              "base_model": {"name_or_path": base_model_name}}
    out = Path(out_dir)
    with _written_whole(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
        (tmp / "alto_adapter.json").write_text(json.dumps(record, indent=2))
        if isinstance(tokenizer, Path):  # a tokenizer's files, saved once for many adapters
            shutil.copytree(tokenizer, tmp, dirs_exist_ok=True)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def save_base(base: Base, folder: Path) -> str:
    """The folder exported adapters name as their base, one AutoModelForCausalLM.from_pretrained
    loads alone. A plain HF folder is named as it is (over an NF4 base too: a QLoRA adapter loads
    over the full-precision base). Any other base (a GGUF file, a random model) is written to
    `folder` once per run, in HF format with its tokenizer: the weights the adapters trained against,
    in the dtype they were loaded in (NF4 ones dequantized). A base sharded over the ranks is loaded
    again whole for it (this rank holds a shard of each layer)."""
    if base.loads_alone:
        return str(base.folder)
    if not folder.exists():  # a resumed run's is already whole: folders are renamed into place
        model = base.reload().model if _sharded(base.model) else base.model
        with _written_whole(folder) as tmp, no_progress_bars():
            _blank_copy(model).save_pretrained(tmp, state_dict=_frozen_weights(model))
            base.tokenizer.save_pretrained(tmp)
    return str(folder.resolve())


def _blank_copy(model: nn.Module) -> nn.Module:
    """A weightless model of the same class, config and dtype, which saves given weights as a plain
    HF model: transformers refuses to save a GGUF-loaded one (its GGUF quantizer does not serialize)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF file's: these weights are dequantized
    with torch.device("meta"):
        return type(model)(config).to(model.dtype)


def _frozen_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base's weights under the names the model had before ALTO's layers wrapped its
    projections (alto.model.MultiLoraLinear: base.weight; the adapters' packs left out), NF4 ones
    dequantized (moved to the CPU one by one: a GPU may not hold them all at full precision)."""
    wrapped = {path for path, module in model.named_modules() if isinstance(module, MultiLoraLinear)}
    out = {}
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in wrapped:  # an adapter pack
            continue
        if owner.endswith(".base") and owner.removesuffix(".base") in wrapped:
            name = f"{owner.removesuffix('.base')}.{leaf}"
        out[name] = t.get_original_weight().cpu() if is_nf4(t) else t
    return out


def _sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
