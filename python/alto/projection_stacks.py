"""Projections that read the same input (q, k, v; gate, up) run stacked in co-located steps.

alto_ext.multi_lora_linear_stack reads x once for all of them (one shrink, one dA) and sums their dX
in one buffer, where separate layers would read x P times and autograd would add P partial dX. The model
calls them one after another on one tensor (transformers' attention: q_proj(h), k_proj(h),
v_proj(h)); the first call computes every member's output and keeps the others' for their own
calls, and a member takes its kept output only if it is called with that very tensor, unchanged
(else it runs alone: the kept output is dropped, and its gradient is zero). A stack runs only
when its members are plain dense Linears and no adapter draws LoRA dropout in them (PEFT draws a
mask per projection), its stacked h is at most MAX_WIDTH columns (or it holds one adapter) and x is
not an inference tensor (it has no version to check); otherwise each member runs alone, as it always may.
Which projections share an input is the family's word (alto.families ModelFamily.input_groups).
ALTO_STACKED_PROJECTIONS=0 turns it off (bench_step's A/B).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

import alto_ext
from alto_ext.one_adapter import OneAdapter

ENABLED = os.environ.get("ALTO_STACKED_PROJECTIONS", "1") != "0"
# Every adapter's block in the stacked h is as wide as the largest rank (alto_ext.StackedSegments):
# the shrink and dA do that many multiply-adds per element of x they read. Up to ~256 they stay
# bandwidth-bound on an H100/H200 (~200 bf16 multiply-adds per byte at the ridge, less in practice);
# beyond, a skewed rank mix (one rank-256 adapter among rank-8 ones) would multiply their work and
# the stacked A's rows. Measured: 192 columns (q, k, v at ranks up to 64) gain (bench/RESULTS.md). A single
# adapter's stack (alto_ext.one_adapter: its rows unpadded, plain GEMMs) has no such cost: no limit.
MAX_WIDTH = 256


class ProjectionStack:
    """The wrapped projections (alto.model.MultiLoraLinear; not imported: that module imports this
    one) of one module that read one input; `kept` (shared by every stack of the model, cleared
    after each forward) holds the outputs computed ahead for the others."""

    def __init__(self, members: list[nn.Module], kept: dict) -> None:
        self.members = members
        self.kept = kept

    def send(self, plan: Any) -> None:
        """Builds (and sends to the device) the plan's stacked segments where its step runs the stack, ahead of
        a step that cannot send host data (a CUDA graph's capture)."""
        running = self.running(plan)
        if running is not None:
            plan.stacked_segments(tuple(ranks for _, ranks in running))

    def running(self, plan: Any) -> list[tuple[nn.Module, tuple]] | None:
        """The members the step of `plan` trains adapters in, with their ranks, where they run as a stack;
        None where each runs alone."""
        if not ENABLED:
            return None
        running = [(m, m.ranks(plan)) for m in self.members]
        running = [(m, ranks) for m, ranks in running if any(ranks)]
        if len(running) < 2 or any(not m.fused or (m.training and plan.has_dropout(ranks)) for m, ranks in running):
            return None
        parts = [plan.segments(ranks) for _, ranks in running]
        if all(OneAdapter.scale_of(p) is not None for p in parts):  # one adapter: plain GEMMs, no padded blocks
            return running
        if len(running) * max(p.h_width for p in parts) > MAX_WIDTH:
            return None
        return running

    def output(self, layer: nn.Module, x: torch.Tensor, plan: Any) -> torch.Tensor | None:
        """The layer's output for x in the step of `plan` (an alto.model.StepPlan), from the stack
        (computed now or kept from the first member's call), or None: the layer runs alone."""
        kept = self.kept.pop(layer, None)
        if kept is not None:
            x_kept, version, y = kept
            return y if x_kept is x and x._version == version else None
        running = None if x.is_inference() else self.running(plan)
        if running is None or layer not in (m for m, _ in running):
            return None
        parts = [plan.segments(ranks) for _, ranks in running]
        packs = [m.packs_for(plan) for m, _ in running]
        ys = alto_ext.multi_lora_linear_stack(
            x.reshape(-1, x.shape[-1]), [m.base.weight for m, _ in running], [m.base.bias for m, _ in running],
            [A for A, _ in packs], [B for _, B in packs], parts, plan.stacked_segments(tuple(r for _, r in running)))
        own = None
        for (m, _), y in zip(running, ys):
            y = y.reshape(*x.shape[:-1], y.shape[-1])
            if m is layer:
                own = y
            else:
                self.kept[m] = (x, x._version, y)
        return own
