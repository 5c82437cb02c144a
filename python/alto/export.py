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
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from alto.base import Base, is_nf4, no_progress_bars
from alto.gguf_bases import save_hf_folder
from alto.model import LayerTensors, MultiLoraLinear
from alto.registry import Adapter


# Adapters written at once: their copies and writes overlap (safetensors and file writes leave the
# GIL); 32 adapters on 1B widths are ~4.5 GB of float32 weights.
EXPORT_THREADS = 4

# How each of ALTO's per-layer tensors (alto.model.TENSOR_NAMES) is laid out in PEFT's file.
TO_PEFT = {"lora_A": lambda t: t, "lora_B": lambda t: t.T}  # ALTO packs lora_B as [r, out]; PEFT: [out, r]


@contextlib.contextmanager
def _written_whole(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` that replaces it once everything is written into it."""
    tmp = _staging(out)
    try:
        yield tmp
        _put_in_place(tmp, out)
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
    out = Path(out_dir)
    with _written_whole(out) as tmp:
        _write_weights(tmp, weights, adapter, base_model_name, tokenizer)
        _write_record(tmp, adapter, base_model_name, outcome)
    return out


def _write_weights(folder: Path, weights: dict[str, LayerTensors] | Future, adapter: Adapter,
                   base_model_name: str | None, tokenizer: Any) -> None:
    """What PEFT loads: the weights (a future: their host copy under way), the adapter's config,
    the tokenizer's files."""
    if isinstance(weights, Future):
        weights = weights.result()
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
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    if isinstance(tokenizer, Path):  # a tokenizer's files, saved once for many adapters
        shutil.copytree(tokenizer, folder, dirs_exist_ok=True)
    elif tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _write_record(folder: Path, adapter: Adapter, base_model_name: str | None, outcome: dict | None) -> None:
    """alto_adapter.json: the adapter's config and progress, which weights these are and what they are worth."""
    record = {"id": adapter.id, "task": adapter.task, **adapter.progress(), **(outcome or {}),
              "config": adapter.config.to_dict(), "base_model": {"name_or_path": base_model_name}}
    (folder / "alto_adapter.json").write_text(json.dumps(record, indent=2))


class AdapterExports:
    """A run's adapters written to `folder`/<id> (save_peft_adapter's files) by a few threads:
    safetensors' and the file writes leave the GIL. An adapter whose exported weights are settled
    before the end (it ended, and no later evaluation can change which weights it exports:
    alto.sweep_run.SweepRun.start_exports) has them written at once, with its PEFT config and the
    tokenizer's files, under a temporary name while the steps or the end's held-out passes go on;
    the end (finish, then wait) only adds its record and renames the folder into place. 32 SmolLM2
    adapters with every projection are 2 GB of float32 weights: 1.6 s of writes on a 2-core
    machine (4 threads or 1), which the end of a sweep waited for. Every folder is whole or absent:
    a failed run removes its temporary ones (close), a killed one's are removed by the next
    AdapterExports of the folder."""

    def __init__(self, folder: Path, base_model_name: str, tokenizer: Any):
        self.folder, self.base_model_name, self.tokenizer = folder, base_model_name, tokenizer
        # _staging's names (<task>/ holds a multi-task sweep's adapters): a killed run's unfinished folders
        for leftover in [*folder.glob(".*.tmp"), *folder.glob("*/.*.tmp")]:
            shutil.rmtree(leftover, ignore_errors=True)
        self._pool: ThreadPoolExecutor | None = None  # started with the first write, ended by close()
        self._tokenizer_files: Future | None = None  # saved once, copied beside each adapter
        self._tokenizer_dir = None
        # adapter -> (the step of the weights, staging folder, their write) of writes started early
        self._early: dict[str, tuple[int, Path, Future]] = {}
        self._ending: list[tuple[Adapter, Path, Future, dict]] = []  # finish()'s, for wait()

    def started(self, adapter_id: str) -> bool:
        return adapter_id in self._early

    def start(self, adapter: Adapter, step: int, weights: dict[str, LayerTensors] | Future) -> None:
        """Writes the adapter's weights of optimizer step `step` in the background (a future: their
        host copy under way)."""
        staging = _staging(self.folder / adapter.id)
        self._early[adapter.id] = (step, staging, self._submit_weights(staging, weights, adapter))

    def finish(self, adapter: Adapter, weights: dict[str, LayerTensors], step: int, outcome: dict) -> None:
        """The adapter's folder with what it exports (its weights of `step`) and its outcome: the early
        write reused where it is of the same step (the same weights), else all of it written now."""
        early = self._early.pop(adapter.id, None)
        if early is not None and early[0] != step:  # a later evaluation chose other weights
            with contextlib.suppress(Exception):  # (a write that failed: the one below says why, if it fails too)
                early[2].result()
            shutil.rmtree(early[1], ignore_errors=True)
            early = None
        if early is None:
            staging = _staging(self.folder / adapter.id)
            early = (step, staging, self._submit_weights(staging, weights, adapter))
        self._ending.append((adapter, early[1], early[2], outcome))

    def wait(self) -> None:
        """Waits for finish()'s folders and puts them in place (the first failure raises)."""
        while self._ending:
            adapter, staging, written, outcome = self._ending[0]
            written.result()
            _write_record(staging, adapter, self.base_model_name, outcome)
            _put_in_place(staging, self.folder / adapter.id)
            self._ending.pop(0)

    def close(self) -> None:
        """Ends the threads (a later write starts them again); what was not put in place is removed."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pool = self._tokenizer_files = None
        for staging in [e[1] for e in self._early.values()] + [e[1] for e in self._ending]:
            shutil.rmtree(staging, ignore_errors=True)
        self._early, self._ending = {}, []
        if self._tokenizer_dir is not None:
            self._tokenizer_dir.cleanup()
            self._tokenizer_dir = None

    def _submit_weights(self, staging: Path, weights, adapter: Adapter) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(EXPORT_THREADS, thread_name_prefix="alto-export")
        if self._tokenizer_files is None:  # first in the pool's queue: the writes after it wait for it
            self._tokenizer_dir = tempfile.TemporaryDirectory(prefix="alto-tokenizer.")
            self._tokenizer_files = self._pool.submit(self._save_tokenizer, Path(self._tokenizer_dir.name))
        tokenizer = self._tokenizer_files
        return self._pool.submit(lambda: _write_weights(staging, weights, adapter, self.base_model_name,
                                                        tokenizer.result()))

    def _save_tokenizer(self, folder: Path) -> Path:
        self.tokenizer.save_pretrained(folder)
        return folder


def _put_in_place(tmp: Path, out: Path) -> None:
    """A folder written under _staging's name renamed to `out`, over an earlier one (a resumed run's end, redone)."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _staging(out: Path) -> Path:
    """A new temporary folder beside `out`, to be renamed to it once written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not tempfile.mkdtemp: the folder gets the user's umask (mkdtemp's is 0700, unreadable to others)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    return tmp


def save_base(base: Base, folder: Path) -> str:
    """The folder exported adapters name as their base, one AutoModelForCausalLM.from_pretrained
    loads alone. A plain HF folder is named as it is (over an NF4 base too: a QLoRA adapter loads
    over the full-precision base). Any other base (a GGUF file, a random model) is written to
    `folder` once per run, in HF format with its tokenizer: the weights the adapters trained against,
    in the dtype they were loaded in (NF4 ones dequantized). A base sharded over the ranks is loaded
    again whole for it (this rank holds a shard of each layer)."""
    if base.loads_alone:
        return base_name(base, folder)
    if not folder.exists():  # a resumed run's is already whole: folders are renamed into place
        with _written_whole(folder) as tmp, no_progress_bars():
            model = base.reload().model if _sharded(base.model) else base.model
            save_hf_folder(model, _frozen_weights(model), base.tokenizer, tmp)
    return base_name(base, folder)


def base_name(base: Base, folder: Path) -> str:
    """What exported adapters name as their base (save_base's folder, written or not)."""
    return str(base.folder) if base.loads_alone else str(folder.resolve())


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
