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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alto.model import LayerTensors, MultiLoraModel, plan_for
from alto.optim import MultiAdamW
from alto.registry import Adapter, Registry, Status
from alto_ext.segments import segment_sums, to_device


class DataStream:
    """An adapter's training sequences (token ids), served in order, cycling over epochs. Held
    as int64 tensors: building a step's batch is then a copy, not a per-token conversion."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        if not sequences:
            raise ValueError("a data stream needs at least one sequence")
        for i, s in enumerate(sequences):
            if len(s) < 2:
                raise ValueError(f"sequence {i} has {len(s)} tokens: a causal LM needs at least 2")
        self.sequences = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
        self.position = 0

    def next_batch(self, n: int) -> list[torch.Tensor]:
        out = []
        for _ in range(n):
            out.append(self.sequences[self.position % len(self.sequences)])
            self.position += 1
        return out


def pad_batch(sequences: Sequence[Sequence[int] | torch.Tensor], pad_id: int, length: int | None = None):
    """Right-padded input_ids, attention_mask and labels (-100 on padding) as [B, L] tensors.
    All tokens in one tensor, scattered by a length mask. Token lists are converted element by
    element (3.4 ms for 32 x 512 tokens on our CPU); DataStream's tensors are just copied."""
    lengths = torch.tensor([len(s) for s in sequences])
    L = length or int(lengths.max())
    mask = torch.arange(L) < lengths[:, None]
    ids = torch.full((len(sequences), L), pad_id, dtype=torch.long)
    ids[mask] = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in sequences])
    labels = ids.masked_fill(~mask, -100)
    return ids, mask.long(), labels


LOSS_BLOCK_ELEMENTS = 2**28  # fp32 temporaries of one block of logit rows: 1 GiB


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy in fp32 (float64 for float64 logits), a block of rows at a time. A
    co-located step holds every adapter's tokens (32k tokens x 128k vocab: 8 GiB of bf16 logits); the usual
    `F.cross_entropy(logits.float())` adds a whole fp32 copy and a whole fp32 log-softmax (16 GiB
    each). Here no fp32 tensor is larger than one block: forward keeps only the logits it was given,
    backward recomputes each block's softmax from them."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # [T, V], [T] (-100: none)
        ctx.save_for_backward(logits, targets)
        picked = targets.clamp_min(0)[:, None]
        loss = torch.empty(targets.shape, dtype=_loss_dtype(logits), device=logits.device)
        for rows in _row_blocks(logits):
            log_probs = torch.log_softmax(logits[rows], -1, dtype=loss.dtype)
            loss[rows] = log_probs.gather(1, picked[rows]).squeeze(1).neg_()
        return loss.masked_fill_(targets == -100, 0.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, targets = ctx.saved_tensors
        grad = grad.masked_fill(targets == -100, 0.0)[:, None]
        picked = targets.clamp_min(0)[:, None]
        dtype = _loss_dtype(logits)
        minus_one = torch.full(picked.shape, -1.0, dtype=dtype, device=logits.device)
        out = torch.empty_like(logits)
        for rows in _row_blocks(logits):  # d loss / d logits = (softmax - onehot(target)) * grad
            p = torch.softmax(logits[rows], -1, dtype=dtype).scatter_add_(1, picked[rows], minus_one[rows])
            torch.mul(p, grad[rows], out=out[rows])  # computed in fp32 (or fp64), stored in the logits' dtype
        return out, None


def _loss_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _row_blocks(logits: torch.Tensor) -> list[slice]:
    rows = max(1, LOSS_BLOCK_ELEMENTS // max(1, logits.shape[1]))
    return [slice(i, i + rows) for i in range(0, logits.shape[0], rows)]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss at every position of [B, L] labels (-100: no target), as [B, L] fp32
    (float64 for float64 logits); the last position and those whose next label is -100 are 0.
    Memory: see _TokenCrossEntropy."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # shift the labels, not the (large) logits
    return _TokenCrossEntropy.apply(logits.flatten(0, 1), targets.flatten()).view(labels.shape)


def adapter_loss_sums(logits: torch.Tensor, labels: torch.Tensor, samples: Sequence[int]) -> torch.Tensor:
    """[2, G]: each adapter's summed next-token loss over its own target tokens, and the number of
    those tokens; samples = rows per adapter (row sums summed per adapter in a fixed number of
    kernels, see segment_sums)."""
    token_loss = token_losses(logits, labels)
    per_row = torch.stack([token_loss.sum(1), (labels[:, 1:] != -100).sum(1).to(token_loss.dtype)])
    return segment_sums(per_row, samples)


def mean_losses(loss_sums: torch.Tensor) -> torch.Tensor:
    """[G] mean next-token loss of each adapter over its own target tokens, from adapter_loss_sums
    (0 for an adapter without any)."""
    loss_sum, count = loss_sums
    return loss_sum / count.clamp_min(1)


def colocated_losses(model: MultiLoraModel, batches: dict[str, Sequence[Sequence[int] | torch.Tensor]],
                     pad_id: int, device: torch.device, training: bool) -> torch.Tensor:
    """The one place a co-located batch is built and run (training steps, held-out losses and
    evaluation alike): every adapter's sequences as a block of rows, right-padded to the step's
    longest, one forward of the shared model, and adapter_loss_sums ([2, G] in batches' order).
    Autocast is chosen here: training on CUDA runs in bf16 (adapter masters stay fp32); held-out
    losses run in the base's own dtype (as PEFT evaluates it), and nothing autocasts on the CPU
    (float32, or float64 for exact checks)."""
    samples = [len(b) for b in batches.values()]
    flat = [s for b in batches.values() for s in b]
    ids, mask, labels = (to_device(t, device) for t in pad_batch(flat, pad_id))
    plan = plan_for(model, list(batches), samples, ids.shape[1], device, [max(len(s) for s in b) for b in batches.values()])
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=training and device.type == "cuda"):
        logits = model(ids, mask, plan)
    return adapter_loss_sums(logits, labels, samples)


@dataclass
class AdapterState:
    """Everything an adapter's future trajectory depends on: what a checkpoint stores and what
    moves when the adapter migrates to another rank (as one flat buffer of :meth:`tensors`)."""

    weights: dict[str, LayerTensors]  # layer path -> {tensor name: tensor}
    grads: list[torch.Tensor]  # pending accumulated gradients, in adapter_tensors' order
    optimizer: dict  # MultiAdamW.state(): step, exp_avg, exp_avg_sq
    data_position: int
    rng: torch.Tensor  # the adapter's dropout generator state (uint8)

    def tensors(self) -> list[torch.Tensor]:
        """All of it as tensors, in a fixed order (the scalars as 1-element int64 tensors)."""
        weights = [t for layer in self.weights.values() for t in layer.values()]
        scalars = torch.tensor([self.optimizer["step"], self.data_position], dtype=torch.int64)
        return weights + self.grads + self.optimizer["exp_avg"] + self.optimizer["exp_avg_sq"] + [scalars, self.rng]

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> "AdapterState":
        """The same structure holding `tensors` (laid out as :meth:`tensors` returns them)."""
        it = iter(tensors)
        weights = {p: {name: next(it) for name in layer} for p, layer in self.weights.items()}
        grads = [next(it) for _ in self.grads]
        exp_avg = [next(it) for _ in self.optimizer["exp_avg"]]
        exp_avg_sq = [next(it) for _ in self.optimizer["exp_avg_sq"]]
        step, position = next(it).tolist()
        return AdapterState(weights, grads, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
                            position, next(it))

    def to(self, device: torch.device | str) -> "AdapterState":
        moved = [t.to(device) for t in self.tensors()]
        moved[-1] = moved[-1].cpu()  # generator states live on the CPU
        return self.with_tensors(moved)


class Trainer:
    """Steps the running adapters held in its model (with rank-local adapter parallelism: the
    adapters placed on this rank; the registry lists every adapter of the run)."""

    def __init__(self, model: MultiLoraModel, registry: Registry, data: dict[str, DataStream],
                 pad_id: int, device: torch.device | str = "cpu"):
        self.model = model
        self.registry = registry
        self.data = data
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.optimizer = MultiAdamW()
        self.retired: dict[str, AdapterState] = {}  # adapters taken out of the model (on the CPU)

    def running(self) -> list[Adapter]:
        """The running adapters this trainer holds, in registry order."""
        return [a for a in self.registry.with_status(Status.RUNNING) if a.id in self.model.configs]

    def admit(self, adapter: Adapter, state: AdapterState | None = None) -> None:
        """Puts an adapter into the model: fresh weights and optimizer, or a saved/migrated state."""
        if adapter.id not in self.data:
            raise ValueError(f"adapter {adapter.id!r} has no data stream")
        self.model.add_adapter(adapter.id, adapter.config)
        self.optimizer.add(adapter.id, self.model.adapter_tensors(adapter.id)[0], adapter.config.weight_decay)
        if state is not None:
            self.model.load_adapter_weights(adapter.id, state.weights)
            self.model.load_adapter_grads(adapter.id, state.grads)
            self.optimizer.load(adapter.id, state.optimizer)
            self.data[adapter.id].position = state.data_position
            self.model.generators[adapter.id].set_state(state.rng)
        adapter.status = Status.RUNNING

    def export_state(self, adapter_id: str) -> AdapterState:
        """Copies of the adapter's state, on the model's device."""
        values, grads = self.model.adapter_tensors(adapter_id)
        return AdapterState(self.model.adapter_weights(adapter_id),
                            [torch.zeros_like(v) if g is None else g.clone() for v, g in zip(values, grads)],
                            self.optimizer.state(adapter_id), self.data[adapter_id].position,
                            self.model.generators[adapter_id].get_state())

    def release(self, adapter_id: str) -> AdapterState:
        """Takes an adapter out of the model and optimizer, returning its whole state."""
        state = self.export_state(adapter_id)
        self.model.remove_adapter(adapter_id)
        self.optimizer.remove(adapter_id)
        return state

    def retire(self, adapter: Adapter, status: Status, reason: str | None = None) -> None:
        """Takes an adapter out of the model for good, keeping its state (nothing is lost)."""
        self.retired[adapter.id] = self.release(adapter.id).to("cpu")
        adapter.status = status
        adapter.failure = reason

    def step(self) -> dict[str, float]:
        """One micro-step of every running adapter; returns each one's loss. The host waits for
        the GPU once, at the end: an adapter whose loss is not finite is masked out of the
        backward (its NaN stays in its own rows), one whose gradient norm is not finite is
        skipped by the optimizer on the device, and both then fail (weights as before the step)."""
        running = self.running()
        if not running:
            return {}
        batches = {a.id: self.data[a.id].next_batch(a.micro_batch_size) for a in running}
        per_adapter = mean_losses(colocated_losses(self.model, batches, self.pad_id, self.device, training=True))
        inv_accum = to_device([1.0 / a.config.grad_accum for a in running], self.device, per_adapter.dtype)
        (torch.where(torch.isfinite(per_adapter), per_adapter, 0.0) * inv_accum).sum().backward()
        for adapter in running:
            adapter.micro_step += 1
        stepping = [a for a in running if a.micro_step % a.config.grad_accum == 0]
        norms = self.optimizer.step(self.model.adapters_tensors([a.id for a in stepping]),
                                    [a.config.lr_at(a.step) for a in stepping],
                                    [a.config.max_grad_norm for a in stepping])
        self.model.clear_grads([a.id for a in stepping])
        values = torch.cat([per_adapter.detach(), norms.to(per_adapter.device)]).tolist()  # the one sync
        losses, norm_of = values[: len(running)], dict(zip((a.id for a in stepping), values[len(running):]))
        # Retire only now: a retirement re-packs the layers and moves the views stepped above.
        for adapter, loss in zip(running, losses):
            adapter.losses.append(loss)
            norm = norm_of.get(adapter.id)
            if not math.isfinite(loss):
                self.retire(adapter, Status.FAILED, f"loss is {loss} at micro-step {adapter.micro_step}")
            elif norm is not None and not math.isfinite(norm):
                self.retire(adapter, Status.FAILED, f"gradient norm is {norm} at step {adapter.step}")
            elif norm is not None:
                adapter.step += 1
                if adapter.step >= adapter.config.max_steps:
                    self.retire(adapter, Status.FINISHED)
        return {a.id: v for a, v in zip(running, losses)}
