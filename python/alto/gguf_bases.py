"""GGUF files as bases: read faster than transformers alone reads them, and kept converted to Hugging
Face format between runs. transformers reads a GGUF file's metadata and dequantizes its weights in
Python at every load: SmolLM2-135M's (a 49k-token vocabulary) took ~10 s on a 2-core CPU (5 s with
read_once's fixes), where its converted folder (safetensors, tokenizer.json) loads in ~0.5 s.
The first load of a file writes its copy, in the dtype it was loaded in, under $ALTO_CACHE (default
$XDG_CACHE_HOME/alto or ~/.cache/alto; `ALTO_CACHE=off`: none kept); later loads of the same file
(path, inode, size and modification time), dtype and transformers/gguf versions read the copy, if its
files are as written (MANIFEST: their sizes and modification times). One process writes a copy (a
lock; the ranks of a run that find it taken go on without writing). Safe to delete at any time.
Nothing here ever fails a run: an unwritable cache or an unreadable or changed copy is one warning
line, and the GGUF file is read as before."""
from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alto.inputs import first_line

OFF = ("off", "0", "none", "")
MANIFEST = "alto_cache.json"  # each file of a copy -> [size, mtime_ns] as written
FORMAT = 1  # of a copy's files (blank_copy, save_hf_folder): a new one is never served an old copy
_PATCHING = threading.Lock()  # read_once patches module globals: one load at a time in a process


def load(from_folder: Callable[..., tuple[Any, nn.Module]], gguf_path: Path, dtype: torch.dtype
         ) -> tuple[Any, nn.Module]:
    """The tokenizer and causal LM of a GGUF file (from_folder(folder, **kw): a folder's, kw its
    gguf_file), from its converted copy if one is kept (made now if not)."""
    entry = entry_for(gguf_path, dtype)
    if entry is not None and entry.is_dir():
        try:
            if not intact(entry):
                raise ValueError("its files changed since it was written")
            return from_folder(entry)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 (what a damaged copy raises is the reader's: safetensors' own errors too)
            warn(f"the converted copy of {gguf_path.name} in {entry} is unusable ({type(e).__name__}: "
                 f"{first_line(e)}); converting the GGUF file again")
            shutil.rmtree(entry, ignore_errors=True)
    with read_once():
        tok, model = from_folder(gguf_path.parent, gguf_file=gguf_path.name)
    if entry is not None:
        write_entry(entry, model, tok)
    return tok, model


@contextlib.contextmanager
def read_once() -> Iterator[None]:
    """transformers parses a GGUF file's header anew for the config, tokenizer and weights, and builds
    gguf's tensor-name map once per module (SmolLM2: 397): each made once per load here (only read),
    the header by _ArrayReader. transformers' bar over the tensors, drawn whatever its logging says,
    is left out (alto.base.no_progress_bars' reason)."""
    import gguf
    import numpy as np
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    class _ArrayReader(gguf.GGUFReader):
        """gguf's reader over a plain array of the file's mapping: it slices a view per value read
        (~250k for SmolLM2's 49k-token vocabulary and merges), and np.memmap's slicing is Python code
        (4.1 s of a 10 s load on a 2-core CPU; 1.5 s over the plain array, the same values)."""

        def _get(self, *args, **kwargs):
            if type(self.data) is np.memmap:
                self.data = self.data.view(np.ndarray)  # the same mapping (kept alive as its base)
            return super()._get(*args, **kwargs)

    with _PATCHING:
        reader, name_map, bar = gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.tqdm
        gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(_ArrayReader), functools.cache(name_map)
        gguf_utils.tqdm = lambda items, **_: items
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.tqdm = reader, name_map, bar


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
    key = "\0".join(map(str, (path, stat.st_ino, stat.st_size, stat.st_mtime_ns, dtype, FORMAT, *versions)))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return root.absolute() / "gguf" / f"{path.stem[:100]}-{str(dtype).removeprefix('torch.')}-{digest}"


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


def write_entry(entry: Path, model: nn.Module, tokenizer: Any) -> None:
    """The just-converted base written to `entry` whole, by one process at a time (a lock beside it:
    another process converting the same file goes on without writing), under a temporary name, then
    renamed. A warning line if it cannot be written; never an error."""
    tmp = entry.parent / f".{entry.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with open(entry.parent / f".{entry.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process is writing it
            for left in entry.parent.glob(f".{entry.name}.*.tmp"):  # by a writer killed mid-write (lock released)
                shutil.rmtree(left, ignore_errors=True)
            if entry.is_dir():
                return  # written while this process converted
            tmp.mkdir()
            save_hf_folder(model, model.state_dict(), tokenizer, tmp)
            (tmp / MANIFEST).write_text(json.dumps({f.name: _signature(f) for f in tmp.iterdir()}))
            tmp.rename(entry)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (a full disk raises safetensors' own error, not an OSError)
        warn(f"cannot keep the converted GGUF base in {entry.parent} ({type(e).__name__}: {first_line(e)}); "
             "it will be converted again next time (ALTO_CACHE=DIR elsewhere, or off)")
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
