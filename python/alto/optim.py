"""AdamW for many adapters at once.

Every adapter keeps its own learning rate, weight decay, step count, moments and gradient-norm
limit; one step updates all of them with a handful of multi-tensor (``torch._foreach_*``) launches
instead of one optimizer per adapter. The math is torch.optim.AdamW's (no amsgrad), and the
clipping is clip_grad_norm_'s, per adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class _AdapterState:
    params: list[torch.nn.Parameter]
    weight_decay: float
    step: int = 0
    exp_avg: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sq: list[torch.Tensor] = field(default_factory=list)


class MultiAdamW:
    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.betas, self.eps = betas, eps
        self.adapters: dict[str, _AdapterState] = {}

    def add(self, adapter_id: str, params: list[torch.nn.Parameter], weight_decay: float) -> None:
        if adapter_id in self.adapters:
            raise ValueError(f"adapter {adapter_id!r} already has optimizer state")
        self.adapters[adapter_id] = _AdapterState(
            list(params), weight_decay, 0,
            [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params],
            [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params])

    def remove(self, adapter_id: str) -> dict:
        """Drops an adapter and returns its state (step and moments), so nothing is lost."""
        state = self.state(adapter_id)
        del self.adapters[adapter_id]
        return state

    def load(self, adapter_id: str, state: dict) -> None:
        """Restores what remove() returned (for an adapter already add()-ed with the same params)."""
        s = self.adapters[adapter_id]
        s.step = int(state["step"])
        for dst, src in zip(s.exp_avg + s.exp_avg_sq, list(state["exp_avg"]) + list(state["exp_avg_sq"])):
            dst.copy_(src)

    def state(self, adapter_id: str) -> dict:
        s = self.adapters[adapter_id]
        return {"step": s.step, "weight_decay": s.weight_decay, "exp_avg": [t.detach().cpu().clone() for t in s.exp_avg],
                "exp_avg_sq": [t.detach().cpu().clone() for t in s.exp_avg_sq]}

    def zero_grad(self, adapter_id: str) -> None:
        for p in self.adapters[adapter_id].params:
            p.grad = None

    def clip_grad_norms(self, adapter_ids: list[str], max_norms: list[float | None]) -> list[float]:
        """Scales each adapter's gradients to at most its max norm (None: no limit) and returns
        each adapter's gradient norm before clipping. One host sync for all adapters."""
        grads, owner = [], []
        for i, aid in enumerate(adapter_ids):
            for p in self.adapters[aid].params:
                if p.grad is not None:
                    grads.append(p.grad)
                    owner.append(i)
        if not grads:
            return [0.0] * len(adapter_ids)
        device = grads[0].device
        owner_t = torch.tensor(owner, device=device)
        sq = torch.stack(torch._foreach_norm(grads)).float().square()
        norms = torch.zeros(len(adapter_ids), device=device).index_add_(0, owner_t, sq).sqrt()
        limits = torch.tensor([math.inf if m is None else m for m in max_norms], device=device)
        coef = (limits / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, list(coef[owner_t].unbind()))
        return norms.tolist()

    def step(self, adapter_ids: list[str], lrs: list[float]) -> None:
        """One AdamW step of every listed adapter, each at its own learning rate."""
        beta1, beta2 = self.betas
        params, grads, m, v, decay, step_size, bc2_sqrt = [], [], [], [], [], [], []
        for aid, lr in zip(adapter_ids, lrs):
            s = self.adapters[aid]
            s.step += 1
            bc1, bc2 = 1 - beta1**s.step, 1 - beta2**s.step
            for p, ea, eas in zip(s.params, s.exp_avg, s.exp_avg_sq):
                if p.grad is None:
                    continue
                params.append(p.data)
                grads.append(p.grad)
                m.append(ea)
                v.append(eas)
                decay.append(1 - lr * s.weight_decay)
                step_size.append(-lr / bc1)
                bc2_sqrt.append(math.sqrt(bc2))
        if not params:
            return
        torch._foreach_mul_(params, decay)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, m, denom, step_size)
