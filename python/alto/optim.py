"""AdamW for many adapters at once.

Every adapter keeps its own learning rate, weight decay, step count, moments and gradient-norm
limit. The update is torch's own AdamW math (``torch.optim.adamw.adamw``: the fused kernel on the
GPU, one launch per adapter; the single-tensor loop on the CPU, as torch.optim.AdamW does there),
and clipping is clip_grad_norm_'s, per adapter, with one host sync for all adapters' norms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.optim.adamw import adamw


@dataclass
class _AdapterState:
    params: list[torch.nn.Parameter]
    weight_decay: float
    steps: list[torch.Tensor] = field(default_factory=list)  # per parameter, as torch keeps them
    exp_avg: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sq: list[torch.Tensor] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.steps[0].item()) if self.steps else 0


class MultiAdamW:
    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.betas, self.eps = betas, eps
        self.adapters: dict[str, _AdapterState] = {}

    def add(self, adapter_id: str, params: list[torch.nn.Parameter], weight_decay: float) -> None:
        if adapter_id in self.adapters:
            raise ValueError(f"adapter {adapter_id!r} already has optimizer state")
        self.adapters[adapter_id] = _AdapterState(
            list(params), weight_decay,
            [torch.zeros((), dtype=torch.float32, device=p.device) for p in params],
            [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params],
            [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params])

    def state(self, adapter_id: str) -> dict:
        s = self.adapters[adapter_id]
        return {"step": s.step, "weight_decay": s.weight_decay,
                "exp_avg": [t.detach().cpu().clone() for t in s.exp_avg],
                "exp_avg_sq": [t.detach().cpu().clone() for t in s.exp_avg_sq]}

    def load(self, adapter_id: str, state: dict) -> None:
        """Restores what state() returned (for an adapter add()-ed with the same params)."""
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

    def zero_grad(self, adapter_id: str) -> None:
        for p in self.adapters[adapter_id].params:
            p.grad = None

    def clip_grad_norms(self, adapter_ids: list[str], max_norms: list[float | None]) -> list[float]:
        """Scales each adapter's gradients to at most its max norm (None: no limit) and returns
        each adapter's gradient norm before clipping. One host sync for all adapters."""
        norms = []
        for aid, limit in zip(adapter_ids, max_norms):
            params = self.adapters[aid].params
            norm = torch.nn.utils.clip_grad_norm_(params, math.inf if limit is None else limit)
            norms.append(norm.to(params[0].device))
        return torch.stack(norms).tolist() if norms else []

    @torch.no_grad()
    def step(self, adapter_ids: list[str], lrs: list[float]) -> None:
        """One AdamW step of every listed adapter, each at its own learning rate."""
        beta1, beta2 = self.betas
        for aid, lr in zip(adapter_ids, lrs):
            s = self.adapters[aid]
            live = [i for i, p in enumerate(s.params) if p.grad is not None]
            if not live:
                continue
            params = [s.params[i] for i in live]
            on_gpu = params[0].is_cuda
            adamw(params, [p.grad for p in params], [s.exp_avg[i] for i in live],
                  [s.exp_avg_sq[i] for i in live], [], [s.steps[i] for i in live],
                  foreach=False, fused=on_gpu, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                  weight_decay=s.weight_decay, eps=self.eps, maximize=False)
