"""AdamW for many adapters at once.

Every adapter keeps its own learning rate, weight decay, step count, moments and gradient-norm
limit. Its weights and gradients are passed in at each call as tensors (the model's views into
its packed per-layer buffers, which move when adapters come and go). The update is torch's own
fused AdamW kernel, one call per adapter; clipping is clip_grad_norm_'s math, per adapter, with
the norms of all adapters given (computed together from the packs: MultiLoraModel.grad_norms) and
the clip applied inside the fused kernel (as its grad scale). Nothing waits for the GPU: an adapter
whose gradients are not finite is skipped on the device. A step launches a fixed handful of kernels
plus one per adapter.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alto_ext.segments import to_device

# adapter id -> (weights, gradients), aligned lists
Tensors = dict[str, tuple[list[torch.Tensor], list[torch.Tensor | None]]]


@dataclass
class _AdapterState:
    weight_decay: float
    step: torch.Tensor  # 0-d float32 on the weights' device, as torch's fused kernel reads it
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]


class MultiAdamW:
    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.betas, self.eps = betas, eps
        self.adapters: dict[str, _AdapterState] = {}

    def add(self, adapter_id: str, weights: list[torch.Tensor], weight_decay: float) -> None:
        if adapter_id in self.adapters:
            raise ValueError(f"adapter {adapter_id!r} already has optimizer state")
        if not weights:
            raise ValueError(f"adapter {adapter_id!r} has no weights to optimize")
        self.adapters[adapter_id] = _AdapterState(
            weight_decay,
            torch.zeros((), dtype=torch.float32, device=weights[0].device),
            [torch.zeros_like(w, memory_format=torch.contiguous_format) for w in weights],
            [torch.zeros_like(w, memory_format=torch.contiguous_format) for w in weights])

    def states(self, adapter_ids: Sequence[str]) -> dict[str, dict]:
        """Each adapter's step count and moments (the live tensors: copy them before the next step),
        the counts read from the device in one transfer."""
        steps = torch.stack([self.adapters[a].step for a in adapter_ids]).tolist() if adapter_ids else []
        return {a: {"step": int(n), "exp_avg": list(self.adapters[a].exp_avg),
                    "exp_avg_sq": list(self.adapters[a].exp_avg_sq)} for a, n in zip(adapter_ids, steps)}

    def load(self, adapter_id: str, state: dict) -> None:
        """Restores what states() returned (for an adapter add()-ed with the same shapes)."""
        s = self.adapters[adapter_id]
        s.step.fill_(float(state["step"]))
        for dst, src in zip(s.exp_avg + s.exp_avg_sq, list(state["exp_avg"]) + list(state["exp_avg_sq"])):
            dst.copy_(src)

    def remove(self, adapter_ids: Sequence[str]) -> None:
        """Drops adapters (their states() are the caller's to keep first: Trainer.release)."""
        for a in adapter_ids:
            del self.adapters[a]

    @torch.no_grad()
    def step(self, tensors: Tensors, lrs: list[float], max_norms: list[float | None],
             norms: torch.Tensor) -> torch.Tensor:
        """Clips every adapter's gradients to its max norm (clip_grad_norm_'s math; None: no
        limit) and takes its AdamW step at its learning rate. norms: each adapter's gradient norm
        (clip_grad_norm_'s, in tensors' order: alto.model.MultiLoraModel.grad_norms). An adapter whose
        gradient norm is not finite is skipped on the device (weights, moments and step count stay as
        they were), so nothing here waits for the GPU: returns the norms, one tensor for the caller to
        read once."""
        if not tensors:
            return torch.zeros(0)
        entries = list(tensors.values())
        live = [[i for i, g in enumerate(grads) if g is not None] for _, grads in entries]
        device = entries[0][0][0].device
        stepping = [k for k, idx in enumerate(live) if idx]
        if not stepping:  # no tokens reached any adapter's layers
            return torch.zeros(len(tensors), device=device)
        # clip_grad_norm_'s factor min(1, limit / (norm + 1e-6)), as the divisor the fused kernel takes
        limits = to_device([math.inf if m is None else m for m in max_norms], device, norms.dtype)
        grad_scale = (norms + 1e-6).div(limits).clamp(min=1.0)
        skip = (~torch.isfinite(norms)).float()
        # The fused kernel reads its grad scale as float32: exact for float32 masters. Float64
        # masters (the exact-math checks) are clipped by a float64 division first instead.
        divide_first = norms.dtype == torch.float64
        states = [self.adapters[aid] for aid in tensors]
        steps = [states[k].step for k in stepping]
        # found_inf as torch.optim uses it for GradScaler: the kernel skips the adapter, and the
        # count taken before the step is given back after it.
        torch._foreach_add_(steps, 1)
        beta1, beta2 = self.betas
        for k in stepping:
            (weights, grads), s, idx = entries[k], states[k], live[k]
            if len(idx) == len(grads):  # the usual case: every tensor has its gradient (no lists to pick)
                live_grads, live_w, live_m, live_v = grads, weights, s.exp_avg, s.exp_avg_sq
            else:
                live_grads, live_w = [grads[i] for i in idx], [weights[i] for i in idx]
                live_m, live_v = [s.exp_avg[i] for i in idx], [s.exp_avg_sq[i] for i in idx]
            if divide_first:
                torch._foreach_div_(live_grads, grad_scale[k])
            torch._fused_adamw_(live_w, live_grads, live_m, live_v, [], [s.step] * len(idx), lr=lrs[k], beta1=beta1,
                                beta2=beta2, weight_decay=s.weight_decay, eps=self.eps, amsgrad=False,
                                maximize=False, grad_scale=None if divide_first else grad_scale[k], found_inf=skip[k])
        torch._foreach_sub_(steps, [skip[k] for k in stepping])
        return norms
