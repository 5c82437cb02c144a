"""Co-located training: one base forward/backward per step for every running adapter.

Each step takes the next micro-batch of every running adapter's own data stream, packs them into
one token stream (or pads them into rows), runs the frozen model once, and computes each adapter's
loss as its objective says (alto.objectives; SFT: the mean over its own target tokens). The summed loss gives every adapter exactly the gradient it would get
alone; each adapter then steps its own AdamW with its own learning rate, schedule, clipping and
gradient accumulation. A non-finite loss or gradient fails that adapter only.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence

import torch

from alto.loss import mean_losses
from alto.model import TENSOR_NAMES, MultiLoraModel
from alto.objectives import SFT, Objective
from alto.optim import MultiAdamW
from alto.registry import Adapter, Registry, Status
from alto.state import AdapterState, move_states
from alto.step import Pass, prepare_pass, reference_scores, run_pass, step_positions
from alto.step_graphs import StepGraphs
from alto_ext.segments import to_device


class DataStream:
    """An adapter's training samples, served in order, cycling over epochs. A sample is per_sample
    consecutive sequences (token ids; its objective's, alto.objectives), served whole. Held as int64
    tensors: building a step's batch is then a copy, not a per-token conversion."""

    def __init__(self, sequences: Sequence[Sequence[int]], per_sample: int = 1):
        if not sequences or len(sequences) % per_sample:
            raise ValueError(f"a data stream needs whole samples of {per_sample} sequences, not {len(sequences)}")
        for i, s in enumerate(sequences):
            if len(s) < 2:
                raise ValueError(f"sequence {i} has {len(s)} tokens: a causal LM needs at least 2")
        self.sequences = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
        self.per_sample, self.position = per_sample, 0  # position: samples served

    @classmethod
    def shuffled(cls, sequences: Sequence[Sequence[int]], seed: int, per_sample: int = 1) -> "DataStream":
        """The samples in an adapter's own order (its config's seed): what a sweep trains it on."""
        order = [sequences[i:i + per_sample] for i in range(0, len(sequences), per_sample)]
        random.Random(seed).shuffle(order)
        return cls([s for sample in order for s in sample], per_sample)

    def next_batch(self, n: int) -> list[torch.Tensor]:
        """The sequences of the next n samples."""
        k, samples = self.per_sample, len(self.sequences) // self.per_sample
        starts = [(self.position + i) % samples * k for i in range(n)]
        self.position += n
        return [s for start in starts for s in self.sequences[start:start + k]]


class StepOutOfMemory(Exception):
    """A step ran out of memory and was undone: no adapter's weights, pending gradients, optimizer
    state, data position or dropout RNG changed."""

    def __init__(self, positions: int):
        super().__init__(f"out of memory in a step of {positions} token positions")
        self.positions = positions


class Trainer:
    """Steps the running adapters held in its model (with rank-local adapter parallelism: the
    adapters placed on this rank; the registry lists every adapter of the run)."""

    def __init__(self, model: MultiLoraModel, registry: Registry, data: dict[str, DataStream],
                 pad_id: int, device: torch.device | str = "cpu", packed: bool = True, objective: Objective = SFT()):
        self.model, self.registry, self.data, self.pad_id = model, registry, data, pad_id
        self.device, self.packed, self.objective = torch.device(device), packed, objective
        self.optimizer = MultiAdamW(model)
        # Adapters out of the model (on the CPU): ended, or queued again after an out-of-memory step (admit() takes those)
        self.retired: dict[str, AdapterState] = {}
        self.last_positions = self.last_tokens = 0  # of the last step: token positions (padding included), tokens
        self.ending: list[tuple[Adapter, Status, str | None]] = []  # the last step's (adapter, status, reason)
        # Fault injection for tests: called inside the step's guarded region, before the forward.
        self.inject_fault: Callable[[list[Adapter]], None] | None = None
        self.graphs = StepGraphs() if self.device.type == "cuda" else None

    def running(self) -> list[Adapter]:
        """The running adapters this trainer holds, in the model's order: the order of every
        layer's packs, so a step uses them as they are (another order gathers every adapter's rows
        in every layer: measured 0.2 s of host time per step with 32 adapters on 1B widths)."""
        return [a for a in map(self.registry.__getitem__, self.model.configs) if a.status == Status.RUNNING]

    def admit(self, adapters: Sequence[Adapter], states: Mapping[str, AdapterState] | None = None) -> None:
        """Puts adapters into the model (each layer re-packed once): fresh weights and optimizer, or
        a saved/migrated state (states: by adapter id, on the model's device)."""
        states = states or {}
        if len({a.id for a in adapters}) != len(adapters):
            raise ValueError(f"adapters admitted twice: {[a.id for a in adapters]}")
        for a in adapters:
            if a.id not in self.data:
                raise ValueError(f"adapter {a.id!r} has no data stream")
        self._forget_graphs()
        self.model.add_adapters({a.id: a.config for a in adapters}, {aid: s.weights for aid, s in states.items()})
        for a in adapters:
            self.optimizer.add(a.id, a.config.weight_decay)
            state = states.get(a.id)
            if state is not None:
                self.model.load_adapter_grads(a.id, state.grads)
                self.optimizer.load(a.id, state.optimizer)
                self.data[a.id].position = state.data_position
                self.model.generators[a.id].set_state(state.rng)
            a.status, a.failure = Status.RUNNING, None

    def export_states(self, adapter_ids: Sequence[str], device: torch.device | str | None = None,
                      weights_only: bool = False, weight_copies: Mapping[str, dict] | None = None) -> dict[str, AdapterState]:
        """Copies of these adapters' states, on `device` (default: the model's), moved together;
        weights_only: without pending gradients and optimizer moments (an adapter that has ended),
        and weight_copies: host copies of some of their weights as they are now, taken as they are
        (weights_only, to the CPU: see copy_out)."""
        copied = {aid: weight_copies[aid] for aid in adapter_ids if aid in weight_copies} \
            if weight_copies and weights_only else {}  # (whole states are copied whole: an adapter queued again)
        if copied and torch.device(device or self.device).type != "cpu":
            raise ValueError(f"host copies of {sorted(copied)} given for states on {device}")
        todo = [aid for aid in adapter_ids if aid not in copied]
        tensors = self.model.adapters_tensors(todo)
        if weights_only:
            optimizer = {aid: {"step": step, "exp_avg": [], "exp_avg_sq": []}
                         for aid, step in self.optimizer.steps(adapter_ids).items()}
        else:
            optimizer = self.optimizer.states(adapter_ids)
        n, live = len(TENSOR_NAMES), {}
        for aid in todo:
            values, grads = tensors[aid]
            paths = self.model.target_layers(self.model.configs[aid])
            weights = {p: dict(zip(TENSOR_NAMES, values[n * i : n * (i + 1)])) for i, p in enumerate(paths)}
            grads = [] if weights_only else [torch.zeros_like(v) if g is None else g for v, g in zip(values, grads)]
            live[aid] = AdapterState(weights, grads, optimizer[aid], self.data[aid].position,
                                     self.model.generators[aid].get_state())
        moved = move_states(live, self.device if device is None else device)
        for aid, weights in copied.items():
            moved[aid] = AdapterState(weights, [], optimizer[aid], self.data[aid].position,
                                      self.model.generators[aid].get_state())
        return {aid: moved[aid] for aid in adapter_ids}

    def release(self, adapter_ids: Sequence[str], device: torch.device | str | None = None,
                weights_only: bool = False) -> dict[str, AdapterState]:
        """Takes adapters out of the model and optimizer, returning their states (on `device`)."""
        self._check_in_model("release", adapter_ids)
        states = self.export_states(adapter_ids, device, weights_only)
        self._remove(adapter_ids)
        return states

    def _remove(self, adapter_ids: Sequence[str]) -> None:
        self.model.remove_adapters(adapter_ids)
        self.optimizer.remove(adapter_ids)
        self._forget_graphs()

    def _forget_graphs(self) -> None:
        """Drops the step graphs: the packs change (the graphs read the old ones), or memory ran out
        (their pools are freed now, before admission measures what is free)."""
        if self.graphs is not None:
            self.graphs.clear()

    def _check_in_model(self, verb: str, adapter_ids: Sequence[str]) -> None:
        if len(set(adapter_ids)) != len(adapter_ids) or not set(adapter_ids) <= self.model.configs.keys():
            raise ValueError(f"cannot {verb} {list(adapter_ids)}: ids must be distinct adapters of the model")

    def copy_out(self, outcomes: Sequence[tuple[Adapter, Status, str | None]],
                 weight_copies: Mapping[str, dict] | None = None) -> dict[str, AdapterState]:
        """Host copies of these adapters' states, (adapter, status, reason) each, taken while they are
        in the model: whole for those sent back to the queue (nothing is lost), the weights of those
        that ended (their optimizer moments would never be read again; on the H100, 16 early-exit
        configurations on 1B widths: the final checkpoint fell from 13.0 to 3.9 s, the retirement
        copies and other time outside the steps from 13.6 to 8.9 s). weight_copies: host copies of ended
        adapters' weights as they are now, not copied again (an adapter stopped at the evaluation that
        copied its best: alto.evaluation.Evaluation.copies_now)."""
        states = {}
        for weights_only in (False, True):
            ids = [a.id for a, status, _ in outcomes if (status != Status.QUEUED) == weights_only]
            if ids:
                states.update(self.export_states(ids, "cpu", weights_only, weight_copies))
        return states

    def retire(self, outcomes: Sequence[tuple[Adapter, Status, str | None]],
               copies: dict[str, AdapterState] | None = None, weight_copies: Mapping[str, dict] | None = None) -> None:
        """Takes adapters out of the model, (adapter, status, reason) each, keeping their host copies
        (copy_out's: taken now, from weight_copies where given, or given whole, taken since the step that
        ended them)."""
        ids = [a.id for a, _, _ in outcomes]
        self._check_in_model("retire", ids)
        self.retired.update(self.copy_out(outcomes, weight_copies) if copies is None else {aid: copies[aid] for aid in ids})
        self._remove(ids)
        for adapter, status, reason in outcomes:
            adapter.status, adapter.failure = status, reason

    def _forward_backward(self, running: list[Adapter], retry: bool = True) -> torch.Tensor:
        """The step's losses ([G]) and gradients, added to the pending ones. Out of memory, the step is undone (data
        positions, dropout RNGs, pending gradients) and StepOutOfMemory raised once its tensors are freed; where graphs
        held memory or it was padded (retry), none is captured or padded until the adapters change; it runs again."""
        positions = {a.id: self.data[a.id].position for a in running}
        rngs = {a.id: self.model.generators[a.id].get_state() for a in running if a.config.dropout > 0}
        packs = [p for layer in self.model.layers.values() if layer.order for p in layer.packs()]
        pending = [p.grad for p in packs]  # accumulated gradients: the backward writes fresh ones

        def restore_pending() -> None:
            for p, g in zip(packs, pending):
                p.grad = g

        for p in packs:
            p.grad = None
        batches = {a.id: self.data[a.id].next_batch(a.micro_batch_size) for a in running}
        lengths = [len(s) for b in batches.values() for s in b]
        self.last_positions, self.last_tokens = step_positions(lengths, self.packed), sum(lengths)
        failed = False
        try:
            per_adapter = self._losses_and_gradients(running, batches, packs)
        except torch.OutOfMemoryError:
            failed = True
        except BaseException:  # any other error ends the run: the pending gradients are not lost to it
            restore_pending()
            raise
        if failed:  # outside the except block: the failed step's frames and tensors are gone
            restore_pending()
            graphs_held = retry and self.graphs is not None and (bool(self.graphs.graphs) or self.graphs.padded)
            self._forget_graphs()
            for aid, position in positions.items():
                self.data[aid].position = position
            for aid, state in rngs.items():
                self.model.generators[aid].set_state(state)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if graphs_held:  # their pool or the padding (outside admission's memory model) may be what was short
                self.graphs.hold_off()
                torch.cuda.reset_peak_memory_stats(self.device)  # the peak admission reads is the retry's
                return self._forward_backward(running, retry=False)
            raise StepOutOfMemory(self.last_positions)
        for p, g in zip(packs, pending):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        return per_adapter

    def _losses_and_gradients(self, running: list[Adapter], batches: dict[str, list[torch.Tensor]],
                              packs: list[torch.Tensor]) -> torch.Tensor:
        """The step's per-adapter losses ([G]); their gradients, each weighted by 1 / its gradient accumulation,
        into the packs' .grad (none before). A step the host holds up may run as a CUDA graph (alto.step_graphs)."""
        flat = [s for b in batches.values() for s in b]
        reference = reference_scores(self.model, self.objective, flat, self.pad_id, self.device, True, self.packed)
        bucketed = self.graphs is not None and self.graphs.buckets(self.model, reference, batches, packs)
        step = prepare_pass(self.model, batches, flat, self.pad_id, self.device, True, self.packed, bucketed)
        weights = to_device([1.0 / a.config.grad_accum for a in running], self.device, torch.float64)

        def compute(step: Pass, weights: torch.Tensor) -> torch.Tensor:  # device work only: what a graph records
            loss_sums = self.objective.loss_sums(run_pass(self.model, step), step.labels, step.plan, reference)
            per_adapter = mean_losses(loss_sums)
            weighted = torch.where(torch.isfinite(per_adapter), per_adapter, 0.0) * weights.to(per_adapter.dtype)
            weighted.sum().backward()
            return per_adapter

        if step.plan.bucketed:  # the positions it runs are its bucket's (what admission's memory model reads)
            self.last_positions = step.labels.numel()
        if self.inject_fault is not None:
            self.inject_fault(running)
        graphed = self.graphs is not None and self.graphs.takes(self.model, step, reference)
        return self.graphs.run(self.model, step, compute, weights, packs) if graphed else compute(step, weights)

    def step(self, retire: bool = True) -> dict[str, float]:
        """One micro-step of every running adapter; returns each one's loss. The adapters it ends
        are retired (retire=False: left in the model, in self.ending, for the caller to evaluate and
        retire). The host waits for the GPU at the end, reading every loss at once: an adapter
        whose loss is not finite is masked out of the backward (its NaN stays in its own rows), one
        whose gradient norm is not finite is skipped by the optimizer on the device, and both then
        fail (weights as before the step).
        Out of memory, the step is undone and StepOutOfMemory raised (see _forward_backward)."""
        running = self.running()
        self.last_positions = self.last_tokens = 0
        self.ending = []
        if not running:
            return {}
        per_adapter = self._forward_backward(running)
        for adapter in running:
            adapter.micro_step += 1
        stepping = [a for a in running if a.micro_step % a.config.grad_accum == 0]
        ids = [a.id for a in stepping]
        norms = self.optimizer.step(ids, [a.config.lr_at(a.step) for a in stepping],
                                    [a.config.max_grad_norm for a in stepping], self.model.grad_norms(ids))
        self.model.clear_grads([a.id for a in stepping])
        values = torch.cat([per_adapter.detach(), norms.to(per_adapter.device)]).tolist()  # the one sync
        losses, norm_of = values[: len(running)], dict(zip((a.id for a in stepping), values[len(running):]))
        # Retire only now (all at once): a retirement re-packs the layers and moves the views stepped above.
        done = self.ending
        for adapter, loss in zip(running, losses):
            adapter.losses.append(loss)
            norm = norm_of.get(adapter.id)
            if not math.isfinite(loss):
                done.append((adapter, Status.FAILED, f"loss is {loss} at micro-step {adapter.micro_step}"))
            elif norm is not None and not math.isfinite(norm):
                done.append((adapter, Status.FAILED, f"gradient norm is {norm} at step {adapter.step}"))
            elif norm is not None:
                adapter.step += 1
                if adapter.step >= adapter.config.max_steps:
                    done.append((adapter, Status.FINISHED, None))
        if done and retire:
            self.retire(done)
        return {a.id: v for a, v in zip(running, losses)}
