"""Every adapter's LoRA terms by the grouped ops, for multi_lora_linear and multi_lora_linear_stack.

The same methods as alto_ext.one_adapter.OneAdapter (which serves a single adapter with plain GEMMs), so the
autograd Functions in alto_ext.linear name each term once, whichever computes it.
"""
from __future__ import annotations

import os

import torch

from alto_ext._ops import ops

# ALTO_FUSED_MATMUL=0: the base GEMM and the adapters' expand as two kernels (an A/B switch for the benches).
FUSED_MATMUL = os.environ.get("ALTO_FUSED_MATMUL", "1") != "0"


class GroupedTerms:
    """The terms of the adapters of one set of segments (their index arrays and scalings); h is [T, width],
    zeros beyond each adapter's rank. covers_all_tokens: every row belongs to an adapter with a rank."""

    def __init__(self, seg_indptr: torch.Tensor, rank_indptr: torch.Tensor, scaling: torch.Tensor | None,
                 width: int, covers_all_tokens: bool):
        self.seg_indptr, self.rank_indptr, self.scaling = seg_indptr, rank_indptr, scaling
        self.width, self.covers_all_tokens = width, covers_all_tokens

    def shrink(self, x: torch.Tensor, W: torch.Tensor, scaled: bool = False) -> torch.Tensor:
        """``(s_g) x_g W_gᵀ`` on each adapter's rows: [T, width]."""
        return ops.lora_shrink(x, W, self.seg_indptr, self.rank_indptr, self.width, self._scaling(scaled))

    def plus(self, a: torch.Tensor, b: torch.Tensor | None, bias: torch.Tensor | None, h: torch.Tensor,
             lora_w: torch.Tensor, scaled: bool) -> torch.Tensor:
        """``a @ b (+ bias)`` (b None: 0) plus every adapter's ``(s_g) h_g W_g`` on its rows. On a GPU,
        alto::lora_matmul: on Hopper one GEMM whose K runs over the base's columns, then the adapter's
        (the output written once, the adapters' product never leaving the registers). Otherwise, when
        every row belongs to an adapter with a rank, the adapters write the output first and the base
        GEMM adds its product in its epilogue (beta = 1): the output is not read and written again by a
        separate LoRA pass. Eager only: torch 2.11's dynamo traces the in-place-built output's gradient
        as zeros."""
        idx, scaling = (self.seg_indptr, self.rank_indptr), self._scaling(scaled)
        if b is None:
            out = a.new_zeros(a.shape[0], lora_w.shape[1])
            ops.lora_expand_(out, h, lora_w, *idx, scaling)
            return out
        eager = not torch.compiler.is_compiling()
        if FUSED_MATMUL and a.is_cuda and bias is None and eager:
            return ops.lora_matmul(a, b, h, lora_w, *idx, scaling)
        if self.covers_all_tokens and bias is None and eager:
            out = a.new_empty(a.shape[0], b.shape[1])
            ops.lora_expand_(out, h, lora_w, *idx, scaling, False)
            return out.addmm_(a, b)
        out = a @ b if bias is None else torch.addmm(bias, a, b)
        ops.lora_expand_(out, h, lora_w, *idx, scaling)
        return out

    def weight_grad(self, h: torch.Tensor, x: torch.Tensor, rows: int, scaled: bool,
                    dtype: torch.dtype) -> torch.Tensor:
        """``(s_g) h_gᵀ x_g`` of every adapter, stacked: [rows, x's columns] in dtype."""
        return ops.lora_weight_grad(h, x, self.seg_indptr, self.rank_indptr, rows, self._scaling(scaled), dtype)

    def _scaling(self, scaled: bool) -> torch.Tensor | None:
        return self.scaling if scaled else None
