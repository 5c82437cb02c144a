"""Co-located training: one base forward/backward per step for every running adapter.

Each step takes the next micro-batch of every running adapter's own data stream, stacks them
(adapter blocks of rows), runs the frozen model once, and computes each adapter's loss as the mean
over its own target tokens. The summed loss gives every adapter exactly the gradient it would get
alone; each adapter then steps its own AdamW with its own learning rate, schedule, clipping and
gradient accumulation. A non-finite loss or gradient fails that adapter only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from alto.model import MultiLoraModel, plan_for
from alto.registry import Adapter, Registry, Status


class DataStream:
    """An adapter's training sequences (token ids), served in order, cycling over epochs."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        if not sequences:
            raise ValueError("a data stream needs at least one sequence")
        for i, s in enumerate(sequences):
            if len(s) < 2:
                raise ValueError(f"sequence {i} has {len(s)} tokens: a causal LM needs at least 2")
        self.sequences = [list(s) for s in sequences]
        self.position = 0

    def next_batch(self, n: int) -> list[list[int]]:
        out = []
        for _ in range(n):
            out.append(self.sequences[self.position % len(self.sequences)])
            self.position += 1
        return out


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Right-padded input_ids, attention_mask and labels (-100 on padding) as [B, L] tensors."""
    L = length or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), L), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


class Trainer:
    def __init__(self, model: MultiLoraModel, registry: Registry, data: dict[str, DataStream],
                 pad_id: int, device: torch.device | str = "cpu"):
        self.model = model
        self.registry = registry
        self.data = data
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.retired: dict[str, dict] = {}  # weights of adapters taken out of the model

    def admit(self, adapter: Adapter) -> None:
        """Puts a queued adapter into the model with fresh weights and its own optimizer."""
        if adapter.id not in self.data:
            raise ValueError(f"adapter {adapter.id!r} has no data stream")
        params = self.model.add_adapter(adapter.id, adapter.config)
        cfg = adapter.config
        # fused: one kernel per step on the GPU (the foreach version dominated a 32-adapter step)
        self.optimizers[adapter.id] = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                        fused=self.device.type == "cuda")
        adapter.status = Status.RUNNING

    def retire(self, adapter: Adapter, status: Status, reason: str | None = None) -> None:
        """Takes an adapter out of the model, keeping its weights and optimizer state."""
        self.retired[adapter.id] = {
            "weights": self.model.remove_adapter(adapter.id),
            "optimizer": self.optimizers.pop(adapter.id).state_dict(),
        }
        adapter.status = status
        adapter.failure = reason

    def step(self) -> dict[str, float]:
        """One micro-step of every running adapter; returns each one's loss."""
        running = self.registry.with_status(Status.RUNNING)
        if not running:
            return {}
        batches = [self.data[a.id].next_batch(a.config.micro_batch_size) for a in running]
        flat = [s for b in batches for s in b]
        ids, mask, labels = (t.to(self.device) for t in pad_batch(flat, self.pad_id))
        plan = plan_for(self.model, [a.id for a in running], [len(b) for b in batches], ids.shape[1],
                        self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            logits = self.model(ids, mask, plan)
        token_loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                     ignore_index=-100, reduction="none").view(len(flat), -1)
        valid = (labels[:, 1:] != -100).float()
        per_adapter = []
        row = 0
        for b in batches:
            rows = slice(row, row + len(b))
            per_adapter.append(token_loss[rows].sum() / valid[rows].sum().clamp_min(1))
            row += len(b)
        losses = torch.stack(per_adapter)
        values = losses.tolist()  # the step's one host sync
        finite = [math.isfinite(v) for v in values]
        total = sum(l / a.config.grad_accum for l, a, ok in zip(per_adapter, running, finite) if ok)
        if any(finite):
            total.backward()
        stepping = []
        for adapter, value, ok in zip(running, values, finite):
            adapter.losses.append(value)
            adapter.micro_step += 1
            if not ok:
                self.retire(adapter, Status.FAILED, f"loss is {value} at micro-step {adapter.micro_step}")
            elif adapter.micro_step % adapter.config.grad_accum == 0:
                stepping.append(adapter)
        self._optimizer_steps(stepping)
        return {a.id: v for a, v in zip(running, values)}

    def _optimizer_steps(self, adapters: list[Adapter]) -> None:
        """Clips each adapter's gradients to its max_grad_norm and steps its optimizer; an adapter
        whose gradient norm is not finite fails instead. One host sync for all adapters."""
        if not adapters:
            return
        norms = [torch.nn.utils.clip_grad_norm_(self.model.adapter_parameters(a.id),
                                                a.config.max_grad_norm or math.inf) for a in adapters]
        for adapter, norm in zip(adapters, torch.stack(norms).tolist()):
            opt = self.optimizers[adapter.id]
            if not math.isfinite(norm):
                opt.zero_grad(set_to_none=True)
                self.retire(adapter, Status.FAILED, f"gradient norm is {norm} at step {adapter.step}")
                continue
            for group in opt.param_groups:
                group["lr"] = adapter.config.lr_at(adapter.step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            adapter.step += 1
            if adapter.step >= adapter.config.max_steps:
                self.retire(adapter, Status.FINISHED)
