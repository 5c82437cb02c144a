"""ALTO's op library: segmented multi-adapter LoRA ops (CPU reference + CUTLASS on Hopper).

Usable on its own by any training stack. A step's token batch ``x[T, d]`` is a concatenation of
segments, one per adapter slot ``g``; adapter weights are packed rank-major (``A[R, d_in]``,
``B[R, d_out]``). See :mod:`alto_ext._ops` for the op contracts.
"""
import torch  # noqa: F401  (first: _C links against the libraries torch loads)

from alto_ext import _C  # noqa: F401  (loads the library: registers torch.ops.alto.*)
from alto_ext._ops import (
    check_errors,
    lora_expand,
    lora_expand_,
    lora_matmul,
    lora_shrink,
    lora_weight_grad,
    set_sync_checks,
    sync_checks,
)
from alto_ext.linear import lora_delta, multi_lora_linear, multi_lora_linear_stack
from alto_ext.segments import Segments, StackedSegments
from alto_ext.transfer import pack_tensors, recv_tensors, send_tensors, unpack_tensors

WITH_CUDA: bool = bool(_C.with_cuda)

__all__ = [
    "WITH_CUDA",
    "Segments",
    "StackedSegments",
    "check_errors",
    "lora_expand",
    "lora_expand_",
    "lora_shrink",
    "lora_delta",
    "lora_matmul",
    "lora_weight_grad",
    "multi_lora_linear",
    "multi_lora_linear_stack",
    "pack_tensors",
    "recv_tensors",
    "send_tensors",
    "unpack_tensors",
    "set_sync_checks",
    "sync_checks",
]
