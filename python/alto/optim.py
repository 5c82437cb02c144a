"""AdamW for many adapters at once.

Every adapter keeps its own learning rate, weight decay, step count, moments and gradient-norm
limit. Its weights and gradients are passed in at each call as tensors (the model's views into
its packed per-layer buffers, which move when adapters come and go). The update is torch's own
fused AdamW kernel, one call per adapter; clipping is clip_grad_norm_'s, per adapter. Nothing
waits for the GPU: an adapter whose gradients are not finite is skipped on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
    def step(self, tensors: Tensors, lrs: list[float], max_norms: list[float | None]) -> torch.Tensor:
        """Clips every adapter's gradients to its max norm (clip_grad_norm_'s math; None: no
        limit) and takes its AdamW step at its learning rate. An adapter whose gradient norm is
        not finite is skipped on the device (weights, moments and step count stay as they were),
        so nothing here waits for the GPU: returns the norms before clipping, one per adapter
        (0 for an adapter without gradients), as one tensor for the caller to read once."""
        beta1, beta2 = self.betas
        norms = []
        for (aid, (weights, grads)), lr, limit in zip(tensors.items(), lrs, max_norms):
            s = self.adapters[aid]
            live = [i for i, g in enumerate(grads) if g is not None]
            if not live:  # no tokens reached its layers
                norms.append(torch.zeros((), device=weights[0].device))
                continue
            g = [grads[i] for i in live]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
            if limit is not None:
                torch._foreach_mul_(g, (limit / (norm + 1e-6)).clamp(max=1.0))
            skip = (~torch.isfinite(norm)).float()
            steps = [s.steps[i] for i in live]
            # torch's fused AdamW (its CPU kernel matches the single-tensor loop bit for bit),
            # with found_inf as torch.optim uses it for GradScaler: a skipped step undoes the count.
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_([weights[i] for i in live], g, [s.exp_avg[i] for i in live],
                                [s.exp_avg_sq[i] for i in live], [], steps, lr=lr, beta1=beta1, beta2=beta2,
                                weight_decay=s.weight_decay, eps=self.eps, amsgrad=False, maximize=False,
                                grad_scale=None, found_inf=skip)
            torch._foreach_sub_(steps, [skip] * len(steps))
            norms.append(norm)
        return torch.stack(norms) if norms else torch.zeros(0)
