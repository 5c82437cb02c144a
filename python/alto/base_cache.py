"""GGUF bases kept converted to Hugging Face format between runs. transformers reads a GGUF file's
metadata and dequantizes its weights in Python at every load: SmolLM2-135M's (a 49k-token vocabulary)
took ~10 s on a 2-core CPU, where its converted folder (safetensors, tokenizer.json) loads in ~0.3 s.
The first load of a file writes its copy, in the dtype it was loaded in, under $ALTO_CACHE (default
$XDG_CACHE_HOME/alto or ~/.cache/alto; `ALTO_CACHE=off`: none kept); later loads of the same file
(path, size and modification time), dtype and transformers/gguf versions read the copy, if its files
are as written (MANIFEST: sizes and modification times; a write through a hard link changes them).
A run's base/ (alto.export.save_base) is linked from it. Safe to delete at any time. Nothing here
ever fails a run: an unwritable cache or an unreadable or changed copy is one warning line, and the
GGUF file is read as before."""
from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

OFF = ("off", "0", "none", "")
MANIFEST = "alto_cache.json"  # each file of a copy -> [size, mtime_ns] as written


def cache_root() -> Path | None:
    setting = os.environ.get("ALTO_CACHE")
    if setting is not None:
        return None if setting.strip().lower() in OFF else Path(setting).expanduser()
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alto"
    except RuntimeError:  # no home directory to be found: nothing is kept
        return None


def entry_for(gguf_path: Path, dtype: torch.dtype) -> Path | None:
    """The folder that holds (or will hold) this GGUF file converted in `dtype` (None: cache off)."""
    root = cache_root()
    if root is None:
        return None
    path = gguf_path.resolve()
    stat = path.stat()
    versions = [importlib.metadata.version(p) for p in ("transformers", "gguf")]  # either may change a conversion
    key = "\0".join(map(str, (path, stat.st_size, stat.st_mtime_ns, dtype, *versions)))
    return root / "gguf" / f"{path.stem}-{str(dtype).removeprefix('torch.')}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def warn(message: str) -> None:
    print(f"alto: {message}", file=sys.stderr, flush=True)


def blank_copy(model: nn.Module) -> nn.Module:
    """A weightless model of the same class, config and dtype, which saves given weights as a plain
    HF model: transformers refuses to save a GGUF-loaded one (its GGUF quantizer does not serialize)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF file's: these weights are dequantized
    with torch.device("meta"):
        return type(model)(config).to(model.dtype)


def save_hf_folder(model: nn.Module, weights: dict[str, torch.Tensor], tokenizer: Any, folder: Path) -> None:
    """`weights` as model's class saves them, with the tokenizer's files: a folder
    AutoModelForCausalLM and AutoTokenizer load alone."""
    blank_copy(model).save_pretrained(folder, state_dict=weights)
    tokenizer.save_pretrained(folder)


def write_entry(entry: Path, model: nn.Module, tokenizer: Any) -> bool:
    """The just-converted base written to `entry` whole (under a temporary name, then renamed; a
    concurrent run that wrote it first wins). False, with a warning, if it cannot be written."""
    tmp = entry.parent / f".{entry.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        tmp.mkdir(parents=True)
        save_hf_folder(model, model.state_dict(), tokenizer, tmp)
        (tmp / MANIFEST).write_text(json.dumps({f.name: _signature(f) for f in tmp.iterdir()}))
        try:
            tmp.rename(entry)
        except OSError:
            if not entry.is_dir():
                raise
        return True
    except OSError as e:
        warn(f"cannot keep the converted GGUF base in {entry.parent} ({type(e).__name__}: {e}); "
             "it will be converted again next time (ALTO_CACHE=DIR elsewhere, or off)")
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _signature(f: Path) -> list[int]:
    stat = f.stat()
    return [stat.st_size, stat.st_mtime_ns]


def intact(entry: Path) -> bool:
    """Whether a copy's files are all there as written (none changed, cut short or removed since)."""
    try:
        written = json.loads((entry / MANIFEST).read_text())
        return bool(written) and all(_signature(entry / name) == sig for name, sig in written.items())
    except (OSError, ValueError, TypeError):
        return False


def link_entry(entry: Path, folder: Path) -> None:
    """entry's files (an intact copy's) into `folder` (an empty folder): hard links where the file
    system allows (no copy, and the run's files outlive the cache's), else copies."""
    for name in json.loads((entry / MANIFEST).read_text()):
        try:
            os.link(entry / name, folder / name)
        except OSError:
            shutil.copy2(entry / name, folder / name)
