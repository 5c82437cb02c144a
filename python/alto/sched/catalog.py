"""What the scheduler knows of the world: model shapes (a decoder's sizes, and the base models a
trace may name) and GPU types (memory, peak rate)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from alto.families import FAMILIES, ModelFamily, family_name

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
    """A decoder-only transformer's sizes (GQA attention, gated MLP) and its family (alto.families:
    the names and widths of the projections a LoRA may target). head_dim 0: hidden // heads."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False  # lm_head shares the embedding matrix
    head_dim: int = 0
    family: str = "llama"

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model shape: {name}={value!r} must be an int >= 1")
        if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim < 0:
            raise ValueError(f"model shape: head_dim={self.head_dim!r} must be an int >= 1 (0: hidden // heads)")
        if self.heads % self.kv_heads or (not self.head_dim and self.hidden % self.heads):
            raise ValueError(f"model shape: heads={self.heads} must divide hidden={self.hidden} (unless head_dim "
                             f"is given) and be a multiple of kv_heads={self.kv_heads}")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        lookup(FAMILIES, self.family, "model family")

    @classmethod
    def from_hf_config(cls, config) -> "ModelShape":
        """From a transformers config (Llama, Qwen2/3, Mistral, Gemma, Phi-3, ...: any object with those fields)."""
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, layers=config.num_hidden_layers,
                   intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   vocab=config.vocab_size, tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   head_dim=getattr(config, "head_dim", None) or 0,
                   family=family_name(getattr(config, "model_type", None)))

    @property
    def model_family(self) -> ModelFamily:
        return FAMILIES[self.family]

    def projection_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer a LoRA may target, per decoder layer."""
        return self.model_family.projections(self)

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
