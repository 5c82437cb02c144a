"""Model families: which Linear layers of a decoder layer a LoRA may target, and their widths.

A family names its decoder layers' projections and computes their (in_features, out_features) from
the model's sizes (alto.sched.catalog.ModelShape, made from the transformers config alone: the
cluster driver predicts a sweep's memory before any weight is loaded). alto.model wraps the Linear
layers of the loaded model that carry these names, alto.base quantizes them (nf4), the memory model
and the FLOP estimates size them, and a sweep's target_modules are checked against them once the
base is loaded (check_targets). tests/test_families.py checks every family's widths against the
Linear layers of a tiny model of it; tests/test_engine.py trains each against PEFT.

FAMILIES maps a config's model_type to its family; a model_type it does not name is Llama-like,
whose projection names most decoders share (Llama, Mistral, Qwen2/3, Gemma 1-3, OLMo, SmolLM2).
To add a family: one class below (its model_types, projection names and widths), listed in FAMILIES.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from alto.registry import AdapterConfig


class Sizes(Protocol):
    """The sizes a family's widths come from (alto.sched.catalog.ModelShape has them)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


class ModelFamily:
    """The interface: `names` in a fixed order, `projections` keyed by them."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # transformers config.model_type values it covers
    names: ClassVar[tuple[str, ...]]
    # Projections that one module calls on the same input (alto.projection_stacks runs them stacked).
    input_groups: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def projections(self, shape: Sizes) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of one decoder layer."""
        raise NotImplementedError


class Llama(ModelFamily):
    """Separate q/k/v/o attention projections (grouped-query: k and v have kv_heads heads; the
    heads' width may differ from hidden / heads, as in Gemma and Qwen3) and a gated MLP."""

    name, model_types = "llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    input_groups = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

    def projections(self, shape: Sizes) -> dict[str, tuple[int, int]]:
        h, q, kv, mlp = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, mlp), "up_proj": (h, mlp), "down_proj": (mlp, h)}


class Phi3(ModelFamily):
    """Phi-3: q, k and v in one fused qkv_proj, gate and up in one gate_up_proj (a LoRA on a fused
    projection is one A and one B over its whole output, as PEFT makes it)."""

    name, model_types = "phi3", ("phi3",)
    names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

    def projections(self, shape: Sizes) -> dict[str, tuple[int, int]]:
        h, q, kv, mlp = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
        return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * mlp), "down_proj": (mlp, h)}


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (Llama(), Phi3())}
DEFAULT = "llama"


def family_name(model_type: str | None) -> str:
    """The family of a transformers config's model_type (Llama-like unless FAMILIES names it)."""
    return next((f.name for f in FAMILIES.values() if model_type in f.model_types), DEFAULT)


def family_of(config) -> ModelFamily:
    """The family of a transformers config (or anything with a model_type)."""
    return FAMILIES[family_name(getattr(config, "model_type", None))]


def check_targets(family: ModelFamily, adapters: Mapping[str, AdapterConfig]) -> None:
    """A ValueError naming the first adapter whose target_modules names a projection the family lacks."""
    for aid, config in adapters.items():
        for module in config.target_modules:
            if module not in family.names:
                raise ValueError(f"target_modules: {module!r} (adapter {aid}) is not a projection of this model "
                                 f"({family.name}: {', '.join(family.names)})")
