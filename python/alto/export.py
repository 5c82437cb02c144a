"""Saving finished adapters in Hugging Face PEFT's format.

``adapter_config.json`` + ``adapter_model.safetensors`` load with
``peft.PeftModel.from_pretrained(base, dir)``, or with ``AutoPeftModelForCausalLM.from_pretrained(dir)``
alone when the base came from a folder (its path is the config's ``base_model_name_or_path``);
``alto_adapter.json`` beside them records the full ALTO config and the adapter's progress
(status, steps, losses, why it stopped, which step's weights were exported). The folder is written under a temporary name and
renamed, so a crash never leaves a half-written adapter.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from alto.model import LayerTensors
from alto.registry import Adapter


# How each of ALTO's per-layer tensors (alto.model.TENSOR_NAMES) is laid out in PEFT's file.
TO_PEFT = {"lora_A": lambda t: t, "lora_B": lambda t: t.T}  # ALTO packs lora_B as [r, out]; PEFT: [out, r]


def save_peft_adapter(weights: dict[str, LayerTensors], adapter: Adapter, out_dir: str | os.PathLike,
                      base_model_name: str | None = None, gguf_file: str | None = None,
                      outcome: dict | None = None) -> Path:
    """weights: layer path (relative to the causal LM) -> {tensor name: tensor}. base_model_name:
    the base's folder, so that AutoPeftModelForCausalLM.from_pretrained(out_dir) loads base and
    adapter alone (a GGUF base also needs gguf_file=..., recorded in alto_adapter.json). outcome:
    which weights these are and what they are worth (alto.results.Outcome), recorded beside."""
    cfg = adapter.config
    out = Path(out_dir)
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
              "base_model": {"name_or_path": base_model_name, "gguf_file": gguf_file}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
        (tmp / "alto_adapter.json").write_text(json.dumps(record, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
