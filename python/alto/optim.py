"""AdamW for many adapters at once.

Every adapter keeps its own learning rate, weight decay, step count, moments and gradient-norm
limit. Its weights and gradients are passed in at each call as tensors (the model's views into
its packed per-layer buffers, which move when adapters come and go). The update is torch's own
AdamW math: on the GPU its fused kernel, one call per group of adapters sharing lr and weight
decay; on the CPU ``torch.optim.adamw.adamw``'s single-tensor loop, as torch.optim.AdamW does
there. Clipping is clip_grad_norm_'s, per adapter, with one host sync for all adapters' norms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.adamw import adamw

# adapter id -> (weights, gradients), aligned lists
Tensors = dict[str, tuple[list[torch.Tensor], list[torch.Tensor | None]]]


@dataclass
class _AdapterState:
    weight_decay: float
    steps: list[torch.Tensor]  # per tensor, as torch keeps them
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]


class MultiAdamW:
    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.betas, self.eps = betas, eps
        self.adapters: dict[str, _AdapterState] = {}

    def add(self, adapter_id: str, weights: list[torch.Tensor], weight_decay: float) -> None:
        if adapter_id in self.adapters:
            raise ValueError(f"adapter {adapter_id!r} already has optimizer state")
        self.adapters[adapter_id] = _AdapterState(
            weight_decay,
            [torch.zeros((), dtype=torch.float32, device=w.device) for w in weights],
            [torch.zeros_like(w, memory_format=torch.contiguous_format) for w in weights],
            [torch.zeros_like(w, memory_format=torch.contiguous_format) for w in weights])

    def state(self, adapter_id: str) -> dict:
        """Copies of the adapter's step count and moments (on their device)."""
        s = self.adapters[adapter_id]
        return {"step": int(s.steps[0].item()) if s.steps else 0,
                "exp_avg": [t.detach().clone() for t in s.exp_avg],
                "exp_avg_sq": [t.detach().clone() for t in s.exp_avg_sq]}

    def load(self, adapter_id: str, state: dict) -> None:
        """Restores what state() returned (for an adapter add()-ed with the same shapes)."""
        s = self.adapters[adapter_id]
        for t in s.steps:
            t.fill_(float(state["step"]))
        for dst, src in zip(s.exp_avg + s.exp_avg_sq, list(state["exp_avg"]) + list(state["exp_avg_sq"])):
            dst.copy_(src)

    def remove(self, adapter_id: str) -> dict:
        """Drops an adapter and returns its state (step and moments), so nothing is lost."""
        state = self.state(adapter_id)
        del self.adapters[adapter_id]
        return state

    @torch.no_grad()
    def clip_grad_norms(self, tensors: Tensors, max_norms: list[float | None]) -> list[float]:
        """Scales each adapter's gradients to at most its max norm (None: no limit), as
        clip_grad_norm_ does, and returns each adapter's norm before clipping. One host sync."""
        norms = []
        for (_, grads), limit in zip(tensors.values(), max_norms):
            grads = [g for g in grads if g is not None]
            if not grads:
                norms.append(None)
                continue
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            coef = ((math.inf if limit is None else limit) / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef)
            norms.append(norm)
        present = [n for n in norms if n is not None]
        values = iter(torch.stack(present).tolist() if present else [])
        return [0.0 if n is None else next(values) for n in norms]

    @torch.no_grad()
    def step(self, tensors: Tensors, lrs: list[float]) -> None:
        """One AdamW step of every adapter in `tensors`, each at its own learning rate. Adapters
        with the same learning rate and weight decay share one call: on the GPU one fused
        multi-tensor kernel, called directly (torch's functional wrapper regroups every tensor in
        Python: ~9 ms of host time per step at 32 adapters x 56 tensors). Every tensor keeps its
        own step count, so the math is that of one torch AdamW per adapter."""
        groups: dict[tuple[float, float], list[list[torch.Tensor]]] = {}
        for (aid, (weights, grads)), lr in zip(tensors.items(), lrs):
            s = self.adapters[aid]
            group = groups.setdefault((lr, s.weight_decay), [[], [], [], [], []])
            if any(g is None for g in grads):  # layers that saw none of its tokens
                live = [i for i, g in enumerate(grads) if g is not None]
                parts = ([weights[i] for i in live], [grads[i] for i in live], [s.exp_avg[i] for i in live],
                         [s.exp_avg_sq[i] for i in live], [s.steps[i] for i in live])
            else:
                parts = (weights, grads, s.exp_avg, s.exp_avg_sq, s.steps)
            for dst, src in zip(group, parts):
                dst.extend(src)
        beta1, beta2 = self.betas
        for (lr, weight_decay), (weights, grads, exp_avg, exp_avg_sq, steps) in groups.items():
            if not weights:
                continue
            if weights[0].is_cuda:
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(weights, grads, exp_avg, exp_avg_sq, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                                    weight_decay=weight_decay, eps=self.eps, amsgrad=False, maximize=False,
                                    grad_scale=None, found_inf=None)
            else:  # torch.optim.AdamW's CPU default: the single-tensor loop
                adamw(weights, grads, exp_avg, exp_avg_sq, [], steps, foreach=False, fused=False, amsgrad=False,
                      beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=self.eps, maximize=False)
