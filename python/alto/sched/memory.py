"""GPU memory estimate of co-located LoRA training (no activation checkpointing).

- frozen weights: every parameter once per GPU, in bf16 (2 bytes) unless told otherwise (NF4
  projections, or decoder layers sharded over GPUs: base_bytes);
- per adapter: weights, gradients and two AdamW moments in fp32 (16 bytes per LoRA parameter);
- activations per token, kept for the input-gradient backward (bf16): per decoder layer the two
  norm inputs and outputs, q/k/v, the attention output, the gate/up outputs, the activation and
  the down-projection input (6·hidden + 2·kv_dim + 4·intermediate values), plus the LoRA
  intermediate x·Aᵀ (rank values per targeted module); and the logits (bf16 + fp32 for the loss);
- a safety margin: a fraction of the GPU never planned (CUDA context, allocator fragmentation,
  workspaces, the transient peaks this estimate does not model).

PeakModel is the measured counterpart `alto tune` admits adapters by (alto.admission).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from alto.registry import AdapterConfig
from alto.sched.catalog import GPUType, ModelShape, gpu_type

DEFAULT_MARGIN = 0.15
ACT_BYTES = 2  # bf16 activations
OPTIMIZER_BYTES_PER_PARAM = 16  # fp32 weight + grad + exp_avg + exp_avg_sq


# QLoRA's NF4 (alto.base.quantize_nf4): 4 bits per weight, an 8-bit absmax per 64 weights and a float32
# scale per 256 absmaxes.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)


def base_bytes(shape: ModelShape, weight_bytes: int = 2, quantize: str = "none", shards: int = 1) -> int:
    """The frozen backbone's weights on one GPU (2 = bf16, 4 = fp32). quantize nf4: the decoder
    projections in NF4, the rest as given. shards > 1 (shard_base): each GPU holds its share of
    the decoder layers plus two of them whole (FSDP's gathered layer and the prefetched next one);
    embeddings, norms and LM head are replicated."""
    if weight_bytes not in (2, 4):
        raise ValueError(f"weight_bytes={weight_bytes!r} must be 2 (bf16) or 4 (fp32)")
    if quantize not in ("none", "nf4") or shards < 1:
        raise ValueError(f"quantize={quantize!r} must be none or nf4 and shards={shards!r} >= 1")
    projections = shape.matmul_params() - shape.vocab * shape.hidden
    per_layer = (projections * (NF4_BYTES_PER_WEIGHT if quantize == "nf4" else weight_bytes) / shape.layers
                 + 2 * shape.hidden * weight_bytes)  # its projections and its two norms
    rest = (shape.params() - projections - 2 * shape.layers * shape.hidden) * weight_bytes
    gathered = 0 if shards == 1 else min(2, shape.layers)  # whole layers on top of the shard
    layers = min(shape.layers, shape.layers / shards + gathered) * per_layer
    return int(rest + layers)


def adapter_params(config: AdapterConfig, shape: ModelShape) -> int:
    dims = shape.projection_dims()
    return config.rank * shape.layers * sum(sum(dims[m]) for m in config.target_modules)


def activation_bytes_per_token(config: AdapterConfig, shape: ModelShape, act_bytes: int = ACT_BYTES) -> int:
    """act_bytes: 2 for bf16 activations, 4 for a float32 step (the CPU), 8 for float64."""
    kv = shape.kv_heads * shape.head_dim
    per_layer = 6 * shape.hidden + 2 * kv + 4 * shape.intermediate + config.rank * len(config.target_modules)
    logits = shape.vocab * (act_bytes + 4)
    return shape.layers * per_layer * act_bytes + logits


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


@dataclass
class PeakModel:
    """Peak bytes of a co-located step, linear in its token positions and its adapters' parameters
    (the ALTO intra-task scheduler's model): fitted on measured steps of this device, corrected up
    whenever a step peaks higher or runs out of memory."""

    fixed: float  # bytes held whatever the step: the frozen base, the CUDA context's allocations
    per_token: float  # activations, logits and loss temporaries per token position
    per_param: float  # adapter weights, gradients and AdamW moments per LoRA parameter
    # bytes of a step over so many token positions that are not linear in them: the fused LM head's
    # chunks of logits (alto.admission.fused_head_bytes), which a fit over two token counts would
    # otherwise read as a slope; None: none
    head: Callable[[int], float] | None = None

    def predict(self, positions: int, params: int) -> float:
        head = 0.0 if self.head is None else self.head(positions)
        return self.fixed + self.per_token * positions + self.per_param * params + head

    @classmethod
    def fit(cls, points: Sequence[tuple[int, int, float]], optimizer_bytes: float) -> "PeakModel":
        """Least squares over measured (positions, params, peak bytes); optimizer_bytes per parameter
        are added (state a probe step does not allocate). Slopes are kept non-negative."""
        import torch

        a = torch.tensor([[1.0, t, p] for t, p, _ in points], dtype=torch.float64)
        b = torch.tensor([[peak] for _, _, peak in points], dtype=torch.float64)
        fixed, per_token, per_param = torch.linalg.lstsq(a, b).solution.flatten().tolist()
        return cls(fixed, max(per_token, 0.0), max(per_param, 0.0) + optimizer_bytes)

    def raised_to(self, positions: int, params: int, peak: float) -> "PeakModel":
        """The model with its per-token slope raised so that this step predicts at least `peak`."""
        missing = peak - self.predict(positions, params)
        if missing <= 0 or positions <= 0:
            return self
        return dataclasses.replace(self, per_token=self.per_token + missing / positions)
