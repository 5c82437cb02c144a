"""Fused base layers for CUDA steps: liger-kernel's Triton RMSNorm, SiLU-and-multiply and rotary
embedding in place of the decoder's eager chains of elementwise kernels.

Why: on the H200, a co-located step of Llama-3.2-1B widths (16 adapters x 1024 tokens) spent ~70 of
its 274 ms of GPU time in RMSNorm (~34: a cast, a square, a mean, an rsqrt, two multiplies, each a
kernel reading and writing the activations, forward and backward), rotary embedding (~22) and the
SwiGLU product (~14); liger runs each as one kernel per direction (bench/RESULTS.md).

Why our own dispatch rather than liger's apply_liger_kernel_to_<model>(model=...): that replaces the
forward for every input, and the rotary function for every model of the family in the process (a
PEFT reference trained beside ALTO, a float64 exactness check, a CPU step). Here a fused module
runs liger only inside MultiLoraModel.forward (active()), on CUDA tensors of one dtype below
float64; anything else computes what the model's own forward does, bitwise (inside active(), the
MLP runs its own modules and ops, its product recomputed in backward). ALTO_FUSED_LAYERS=0 turns it off.

What is fused, by transformers class name (tests/test_fused_layers.py checks, per family, that the
kind chosen here computes what the class's own forward does, on the CPU bitwise through an emulation
of liger's casting modes, and on the GPU through liger against the eager model):
- NORM_KINDS: RMSNorm classes and how they cast (Llama: the normalized input back to its dtype
  before the weight; Gemma: all in fp32 with the weight offset by 1, and not in place, since Gemma 2
  and 3 read a norm's output gradient twice);
- SwiGLU MLPs (gate_proj, up_proj, down_proj and a SiLU act_fn): the product in one kernel, and
  computed again in the backward rather than kept (on the CPU too: the same bits, less memory);
- ROPE_MODULES: the modeling modules whose apply_rotary_pos_emb is the half-rotation of Llama over
  the whole head, replaced by a wrapper that dispatches (its .alto_original is the one it wraps).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

ENABLED = os.environ.get("ALTO_FUSED_LAYERS", "1") != "0"


@dataclass(frozen=True)
class NormKind:
    """How liger's RMSNorm reproduces a class: its weight offset, casting mode and whether its
    backward may overwrite the incoming gradient."""

    offset: float
    casting_mode: str
    in_place: bool


_LLAMA_NORM, _GEMMA_NORM = NormKind(0.0, "llama", True), NormKind(1.0, "gemma", False)
NORM_KINDS: dict[str, NormKind] = {
    **{name: _LLAMA_NORM for name in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")},
    **{name: _GEMMA_NORM for name in ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")},
}
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
ROPE_MODULES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")

_active = contextvars.ContextVar("alto_fused_layers", default=False)


@contextlib.contextmanager
def active():
    """Fused modules run liger's kernels inside this context (MultiLoraModel.forward enters it)."""
    token = _active.set(True)
    try:
        yield
    finally:
        _active.reset(token)


@functools.cache
def _liger():
    """liger's autograd functions (RMSNorm, SiLU-multiply, RoPE), or None where triton cannot load."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return LigerRMSNormFunction, LigerSiLUMulFunction, LigerRopeFunction


def _fusable(*tensors: torch.Tensor) -> bool:
    """Inside active(), every tensor on CUDA in one floating dtype below float64, liger present."""
    if not (ENABLED and _active.get()):
        return False
    first = tensors[0]
    return (first.is_cuda and first.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and all(t.is_cuda and t.dtype == first.dtype for t in tensors) and _liger() is not None)


class _FusedNorm:
    """Mixed in before an RMSNorm class (NORM_KINDS names it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fusable(x, self.weight):
            return super().forward(x)
        eps = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.eps
        kind = NORM_KINDS[self.alto_plain.__name__]
        return _liger()[0].apply(x, self.weight, eps, kind.offset, kind.casting_mode, kind.in_place)


class _FusedMLP:
    """Mixed in before a SwiGLU MLP class: down(silu(gate(x)) * up(x)), the product in one kernel (liger,
    where fusable). With gradients the product is not kept for down_proj's backward: that backward
    computes it again from gate and up (kept anyway for the product's own backward; recomputed()).
    Its [tokens, intermediate] is the largest activation a step keeps per layer: at Llama-3.2-1B
    widths 16 of ~58 KB a token, ~28% of the activations (bench/RESULTS.md, 2026-12-06), for one
    more elementwise pass in the backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (ENABLED and _active.get()):
            return super().forward(x)
        gate, up = self.gate_proj(x), self.up_proj(x)  # in the class's own order (LoRA dropout draws)
        if _fusable(gate, up):
            product = functools.partial(_liger()[1].apply, gate, up)
        else:
            def product() -> torch.Tensor:
                return self.act_fn(gate) * up
        act = product()
        if not torch.is_grad_enabled():
            return self.down_proj(act)
        with recomputed(act, product):
            return self.down_proj(act)


@contextlib.contextmanager
def recomputed(tensor: torch.Tensor, compute: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Inside, autograd keeps neither `tensor` nor a view of it for a backward, but how to compute it
    again: compute() (run without gradients; it must give the same bits, from tensors kept anyway),
    run once by the first backward that reads it, for all its views. Where nothing else holds
    `tensor`, its memory is free from the forward's end to that backward. Why not
    torch.utils.checkpoint: it would run the whole region again (the down projection's GEMMs too)
    and keep its input; here only the elementwise product is recomputed."""
    if tensor.numel() == 0 or not tensor.is_contiguous() or tensor.storage_offset() != 0:
        yield
        return
    # what pack compares, not the tensor: autograd keeps the hooks with what they saved
    address, dtype, device, again = tensor.untyped_storage().data_ptr(), tensor.dtype, tensor.device, []

    def value() -> torch.Tensor:
        if not again:
            with torch.no_grad():
                again.append(compute())
        return again[0]

    def pack(t: torch.Tensor):
        try:
            same = t.dtype == dtype and t.device == device and t.untyped_storage().data_ptr() == address
        except (RuntimeError, NotImplementedError):  # a tensor subclass without plain storage (NF4)
            same = False
        return (value, t.shape, t.stride(), t.storage_offset()) if same else t

    def unpack(packed):
        if isinstance(packed, tuple):
            value_of, shape, stride, offset = packed
            return value_of().as_strided(shape, stride, offset)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


@functools.cache
def fused_class(cls: type, mixin: type) -> type:
    """The subclass a module's class becomes: the mixin's forward first, the class's own as fallback
    (alto_plain). A pickle or a deep copy of a fused module holds the plain class (__reduce_ex__):
    the subclass exists only in a process that fused one, and a copy is fused by install again."""
    def __reduce_ex__(self, protocol):
        _, _, *rest = object.__reduce_ex__(self, max(protocol, 2))  # (copyreg.__newobj__, (this class,), state, ...)
        return (object.__new__, (cls,), *rest)

    name = f"Fused{cls.__name__}"
    return type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name, "alto_plain": cls,
                                     "__reduce_ex__": __reduce_ex__})


SILU_CLASSES = ("SiLU", "SiLUActivation")  # torch's; transformers' own (5.2x: ACT2FN["silu"], F.silu)


def _is_swiglu_mlp(module: nn.Module) -> bool:
    return (type(module).__name__ in MLP_CLASSES and type(getattr(module, "act_fn", None)).__name__ in SILU_CLASSES
            and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")))


def _rope_wrapper(original):
    """apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) dispatching to liger's RoPE inside
    active() when q, k [batch, heads, seq, head_dim] and cos, sin [batch, seq, head_dim] rotate the
    whole head; else the original."""
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        plain = not args and kwargs.get("unsqueeze_dim", 1) == 1 and set(kwargs) <= {"unsqueeze_dim"}
        if (plain and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and cos.shape[-1] == q.shape[-1] == k.shape[-1]
                and _fusable(q, k, cos, sin)):
            return _liger()[2].apply(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)
    apply_rotary_pos_emb.alto_original = original
    return apply_rotary_pos_emb


def install(model: nn.Module) -> None:
    """Makes the model's RMSNorm and SwiGLU MLP modules fused ones and wraps its modeling module's
    rotary function (once per process). Their forward changes only inside active() on CUDA, so
    installing is harmless anywhere (the CPU, float64)."""
    for module in model.modules():
        cls = type(module)
        if issubclass(cls, (_FusedNorm, _FusedMLP)):
            continue
        if cls.__name__ in NORM_KINDS and isinstance(getattr(module, "weight", None), torch.Tensor):
            module.__class__ = fused_class(cls, _FusedNorm)
        elif _is_swiglu_mlp(module):
            module.__class__ = fused_class(cls, _FusedMLP)
    modeling = sys.modules.get(type(model).__module__)
    family = type(model).__module__.rsplit(".", 1)[-1].removeprefix("modeling_")
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if family in ROPE_MODULES and rope is not None and not hasattr(rope, "alto_original"):
        modeling.apply_rotary_pos_emb = _rope_wrapper(rope)
