"""What the scheduler knows of the world: model shapes (a decoder's sizes, and the base models a
trace may name) and GPU types (memory, peak rate)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from alto.registry import KNOWN_TARGET_MODULES

GB = 10**9
T = TypeVar("T")


def lookup(table: dict[str, T], name: str, what: str) -> T:
    """table[name], or a ValueError naming the unknown value and the known ones."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"{what} {name!r} is unknown; known: {', '.join(table)}") from None


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's sizes (Llama/Qwen2/Mistral layout: GQA attention, gated MLP)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False  # lm_head shares the embedding matrix

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model shape: {name}={value!r} must be an int >= 1")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"model shape: heads={self.heads} must divide hidden={self.hidden} and be "
                             f"a multiple of kv_heads={self.kv_heads}")

    @classmethod
    def from_hf_config(cls, config) -> "ModelShape":
        """From a transformers LlamaConfig / Qwen2Config / MistralConfig (or any object with those fields)."""
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, layers=config.num_hidden_layers,
                   intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   vocab=config.vocab_size, tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def projection_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer a LoRA may target, per decoder layer."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, self.intermediate), "up_proj": (h, self.intermediate),
                "down_proj": (self.intermediate, h)}
        assert tuple(dims) == KNOWN_TARGET_MODULES
        return dims

    def matmul_params(self) -> int:
        """Weights every token multiplies through: the decoder projections and the lm_head."""
        per_layer = sum(i * o for i, o in self.projection_dims().values())
        return self.layers * per_layer + self.vocab * self.hidden

    def params(self) -> int:
        """All parameters: projections, RMSNorm weights (2 per layer + final), embeddings, lm_head."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = (2 * self.layers + 1) * self.hidden
        return self.matmul_params() - self.vocab * self.hidden + embeddings + norms


# Base models a trace may name (sizes from their HF configs).
BASE_MODELS: dict[str, ModelShape] = {
    "llama-3-8b": ModelShape(4096, 32, 14336, 32, 8, 128256),
    "mistral-7b": ModelShape(4096, 32, 14336, 32, 8, 32768),
    "qwen2-7b": ModelShape(3584, 28, 18944, 28, 4, 152064),
    "llama-3.2-1b": ModelShape(2048, 16, 8192, 32, 8, 128256, tied_embeddings=True),
    "qwen2-0.5b": ModelShape(896, 24, 4864, 14, 2, 151936, tied_embeddings=True),
}


def base_shape(name: str) -> ModelShape:
    return lookup(BASE_MODELS, name, "base model")


@dataclass(frozen=True)
class GPUType:
    name: str
    memory_bytes: int
    peak_bf16_flops: float  # dense tensor-core peak from the datasheet (SXM parts)


GPU_TYPES: dict[str, GPUType] = {
    "H100": GPUType("H100", 80 * GB, 989e12),
    "H200": GPUType("H200", 141 * GB, 989e12),
    "A100": GPUType("A100", 80 * GB, 312e12),
}
REFERENCE_GPU = "H100"  # where the calibration data was measured


def gpu_type(name: str | GPUType) -> GPUType:
    return name if isinstance(name, GPUType) else lookup(GPU_TYPES, name, "gpu type")
