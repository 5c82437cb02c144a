"""GPU memory estimate of co-located LoRA training (no activation checkpointing).

- frozen weights: every parameter once per GPU, in bf16 (2 bytes) unless told otherwise;
- per adapter: weights, gradients and two AdamW moments in fp32 (16 bytes per LoRA parameter);
- activations per token, kept for the input-gradient backward (bf16): per decoder layer the two
  norm inputs and outputs, q/k/v, the attention output, the gate/up outputs, the activation and
  the down-projection input (6·hidden + 2·kv_dim + 4·intermediate values), plus the LoRA
  intermediate x·Aᵀ (rank values per targeted module); and the logits (bf16 + fp32 for the loss);
- a safety margin: a fraction of the GPU never planned (CUDA context, allocator fragmentation,
  workspaces, the transient peaks this estimate does not model).
"""
from __future__ import annotations

from alto.registry import AdapterConfig
from alto.sched.catalog import GPUType, ModelShape, gpu_type

DEFAULT_MARGIN = 0.15
ACT_BYTES = 2  # bf16 activations
OPTIMIZER_BYTES_PER_PARAM = 16  # fp32 weight + grad + exp_avg + exp_avg_sq


def base_bytes(shape: ModelShape, weight_bytes: int = 2) -> int:
    """The frozen backbone's weights (2 = bf16, 4 = fp32)."""
    if weight_bytes not in (2, 4):
        raise ValueError(f"weight_bytes={weight_bytes!r} must be 2 (bf16) or 4 (fp32)")
    return shape.params() * weight_bytes


def adapter_params(config: AdapterConfig, shape: ModelShape) -> int:
    dims = shape.projection_dims()
    return config.rank * shape.layers * sum(sum(dims[m]) for m in config.target_modules)


def activation_bytes_per_token(config: AdapterConfig, shape: ModelShape) -> int:
    kv = shape.kv_heads * shape.head_dim
    per_layer = 6 * shape.hidden + 2 * kv + 4 * shape.intermediate + config.rank * len(config.target_modules)
    logits = shape.vocab * (ACT_BYTES + 4)
    return shape.layers * per_layer * ACT_BYTES + logits


def adapter_bytes(config: AdapterConfig, seq_len: int, shape: ModelShape, micro_batch_size: int | None = None) -> int:
    """What one adapter adds to a GPU: its optimizer state and its micro-batch's activations."""
    mbs = config.micro_batch_size if micro_batch_size is None else micro_batch_size
    if mbs < 1 or seq_len < 1:
        raise ValueError(f"micro_batch_size={mbs!r} and seq_len={seq_len!r} must be >= 1")
    return (adapter_params(config, shape) * OPTIMIZER_BYTES_PER_PARAM
            + mbs * seq_len * activation_bytes_per_token(config, shape))


def capacity_bytes(gpu: str | GPUType, margin: float = DEFAULT_MARGIN) -> int:
    """The bytes a plan may use on one GPU: its memory less the safety margin."""
    if not 0 <= margin < 1:
        raise ValueError(f"margin={margin!r} must be in [0, 1)")
    return int(gpu_type(gpu).memory_bytes * (1 - margin))
