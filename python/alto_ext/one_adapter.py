"""One adapter's LoRA terms as plain GEMMs, for multi_lora_linear and multi_lora_linear_stack (the methods of
alto_ext.grouped_terms.GroupedTerms, which serves any adapters by the grouped ops).

A single adapter's segment is every row (the op contract: seg_indptr runs from 0 to the step's tokens), so its
shrink, expand, dh, dX and weight gradients are dense matrix products. The grouped ops would launch a setup
kernel, a K split and its sum for each, for problems of one adapter's few tokens: a one-adapter step is
latency-bound, its time the count of its kernels (bench/RESULTS.md, 2026-12-07, twenty-fourth session).
"""
from __future__ import annotations

import os

import torch

from alto_ext.segments import Segments

# ALTO_ONE_ADAPTER_GEMMS=0: one adapter's terms by the grouped ops too (an A/B switch for the benches).
ENABLED = os.environ.get("ALTO_ONE_ADAPTER_GEMMS", "1") != "0"


class OneAdapter:
    """A single adapter's terms (its scale s); its h is [T, r], not the grouped ops' [T, h_width]."""

    def __init__(self, scale: float):
        self.scale = scale

    @staticmethod
    def scale_of(segments: Segments) -> float | None:
        """The scale to build one from (what a Function can carry), or None: the grouped ops serve these segments
        (more than one slot, no rank, or a scale only the device holds)."""
        if not ENABLED or len(segments.ranks) != 1 or segments.ranks[0] == 0 or segments.scale_values is None:
            return None
        return segments.scale_values[0] if segments.scale_values else 1.0

    def shrink(self, x: torch.Tensor, W: torch.Tensor, scaled: bool = False) -> torch.Tensor:
        """``(s) x Wᵀ``, the scale in the GEMM (alpha; beta = 0: the 0-d input is never read)."""
        if scaled and self.scale != 1.0:
            return torch.addmm(x.new_empty(()), x, W.t(), beta=0, alpha=self.scale)
        return x @ W.t()

    def plus(self, a: torch.Tensor, b: torch.Tensor | None, bias: torch.Tensor | None, h: torch.Tensor,
             lora_w: torch.Tensor, scaled: bool) -> torch.Tensor:
        """``a @ b (+ bias) + s h lora_w``; the base's GEMM adds into the adapter's product (its epilogue's beta)."""
        if b is None:
            return self.shrink(h, lora_w.t(), scaled)
        s = self.scale if scaled else 1.0
        delta = h @ lora_w if bias is None else torch.addmm(bias, h, lora_w, alpha=s)
        beta = s if bias is None else 1.0
        if torch.compiler.is_compiling():  # dynamo traces an output built in place as a zero gradient (grouped_terms.py)
            return torch.addmm(delta, a, b, beta=beta)
        return delta.addmm_(a, b, beta=beta)  # in place: an out-of-place addmm would copy delta first

    def weight_grad(self, h: torch.Tensor, x: torch.Tensor, rows: int, scaled: bool,
                    dtype: torch.dtype) -> torch.Tensor:
        """``(s) hᵀ x`` in dtype (float32 masters: accumulated in float32, never rounded to x's dtype first); its
        rows are h's columns."""
        if dtype == x.dtype:
            return self.shrink(h.t(), x.t(), scaled)
        if x.is_cuda:
            out = torch.mm(h.t(), x, out_dtype=dtype)
        else:
            out = h.t().to(dtype) @ x.to(dtype)
        return out.mul_(self.scale) if scaled and self.scale != 1.0 else out
