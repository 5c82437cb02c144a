"""Admission by memory (`max_running: auto`): which queued adapters join a rank's co-located set.

Before training, a few probe steps of temporary adapters measure this device's peak memory at a
few token counts and adapter sizes (CUDA: the allocator's peak), and a PeakModel (alto.sched.memory)
is fitted to them (the fused LM head's chunks of logits, not linear in the tokens, apart: fit_probes).
On the CPU, where no allocator reports a step's peak, its slopes come from alto.sched.memory's
estimate at the base's element size. Queued adapters are then admitted largest
micro-batch first (like-sized together) while the predicted peak of the rank's set stays within
its capacity (the device's free memory, or memory_budget_gb, less a margin) and the predicted
token positions within max_tokens_per_step. A step that peaks above the prediction, or runs out of
memory, raises the model's per-token slope (PeakModel.raised_to).

A set's planned token positions per step, for its n sequences per step: packed, the sum of each
adapter's sequences times the mean sequence length of its task's training data + 2 standard
deviations of such a sum (for n sequences of one task, sqrt(n) x the lengths' spread: a step rarely
holds more); padded, n x the longest of the tasks' longest (every row is as long as the step's
longest).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import random
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from alto.base import model_bytes
from alto.loss import fused_head_available, fused_head_step_bytes, mean_losses
from alto.model import MultiLoraModel
from alto.objectives import SFT, Objective
from alto.registry import Adapter, AdapterConfig
from alto.sched.catalog import ModelShape
from alto.sched.memory import PeakModel, activation_bytes_per_token, adapter_params
from alto.step import colocated_losses

MARGIN = 0.1  # of the device's memory, never planned: fragmentation, workspaces, other processes
OPTIMIZER_BYTES = 8  # AdamW's two fp32 moments per parameter: a probe step does not allocate them
PROBE_TOKENS = (1024, 4096)  # token counts of the probe steps (fewer on a small GPU)
PROBE_ADAPTERS = (1, 4)
AMPLE = 2.0  # how far the estimate of a step of everything planned must fit for no probe to run (ample)


def admission_order(queued: Iterable[Adapter]) -> list[Adapter]:
    """Largest micro-batch first, like-sized together (then larger rank first; stable)."""
    return sorted(queued, key=lambda a: (-a.micro_batch_size, -a.config.rank))


def probe_config(configs: Iterable[AdapterConfig]) -> AdapterConfig:
    """The configuration the probe steps run: the one admission_order would take first."""
    return min(configs, key=lambda c: (-c.micro_batch_size, -c.rank))


def _free_bytes(device: torch.device) -> int:
    """Memory this process may still take: free device memory plus what torch's allocator caches
    (CUDA), or the host's available memory (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fits_whole(model: torch.nn.Module, device: torch.device, activation_bytes: float) -> bool:
    """Whether a base model (wherever it is now) fits `device` whole with a step's activations,
    within the memory this process may take there less MARGIN (shard_base: auto)."""
    return model_bytes(model) + activation_bytes <= _free_bytes(device) * (1 - MARGIN)


def _held_bytes(model: MultiLoraModel, device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return model_bytes(model)  # NF4 and sharded weights: what this rank holds


class Admission:
    """The memory model of one rank and the admissions it allows."""

    def __init__(self, peak: PeakModel, capacity: float, shape: ModelShape, lengths: Mapping[str, tuple[float, float]],
                 packed: bool = True, max_tokens: int | None = None, per_sample: int = 1):
        self.peak, self.capacity, self.shape = peak, capacity, shape
        self.lengths = dict(lengths)  # task -> planned tokens per sequence (padded: the longest), their deviation
        self.packed, self.max_tokens = packed, max_tokens
        self.per_sample = per_sample  # sequences per sample of the objective (a micro-batch counts samples)

    @classmethod
    def calibrate(cls, model: MultiLoraModel, shape: ModelShape, lengths: Mapping[str, Sequence[int]], packed: bool,
                  probe_config: AdapterConfig, pad_id: int, device: torch.device, budget_gb: float | None = None,
                  max_tokens: int | None = None, objective: Objective = SFT(),
                  everything: tuple[int, int] | None = None) -> "Admission":
        """Measures (CUDA) or estimates (CPU) the peak model, before any adapter is in the model.
        lengths: each task's training sequence lengths; everything: (token positions, LoRA
        parameters) of one step of every adapter the run plans, at their largest (ample)."""
        planned = {task: (statistics.fmean(lens), statistics.pstdev(lens)) if packed else (max(lens), 0.0)
                   for task, lens in lengths.items()}
        held = _held_bytes(model, device)
        capacity = held + _free_bytes(device) * (1 - MARGIN)
        if budget_gb is not None:
            capacity = min(capacity, budget_gb * 1e9)
        master = 8 if model.adapter_dtype == torch.float64 else 4
        act = next(model.parameters()).dtype.itemsize  # the activations' dtype (an NF4 weight reports it too)
        estimate = activation_bytes_per_token(probe_config, shape, act)  # per token, logits included
        analytic = PeakModel(held, estimate, 4 * master)  # per parameter: weights, gradients, two moments
        if device.type == "cuda" and not (everything is not None and ample(analytic, everything, capacity)):
            # Probes of at most a quarter of the capacity by the estimate (a small GPU probes small).
            largest = max(64, min(PROBE_TOKENS[-1], int(0.25 * (capacity - held) / estimate)))
            tokens = (max(32, largest // 4), largest)
            peak = fit_probes(_probe(model, shape, probe_config, pad_id, device, packed, tokens, objective),
                              fused_head_bytes(model, shape, device))
        else:
            peak = analytic
        return cls(peak, capacity, shape, planned, packed, max_tokens, objective.per_sample)

    def load(self, adapters: Iterable[Adapter], extra: dict[str, int] | None = None) -> tuple[int, int]:
        """(planned token positions per step, LoRA parameters) of a set of adapters."""
        adapters = list(adapters)
        per_task: dict[str, int] = {}
        for a in adapters:
            samples = a.micro_batch_size + (extra or {}).get(a.id, 0)
            per_task[a.task] = per_task.get(a.task, 0) + samples * self.per_sample
        if self.packed:
            mean = sum(n * self.lengths[t][0] for t, n in per_task.items())
            positions = math.ceil(mean + 2 * math.sqrt(sum(n * self.lengths[t][1] ** 2 for t, n in per_task.items())))
        else:
            positions = sum(per_task.values()) * max((self.lengths[t][0] for t in per_task), default=0)
        return positions, sum(adapter_params(a.config, self.shape) for a in adapters)

    def predict(self, adapters: Iterable[Adapter]) -> float:
        return self.peak.predict(*self.load(adapters))

    def fits(self, adapters: Sequence[Adapter], extra: dict[str, int] | None = None) -> bool:
        """Whether the set's planned step fits (extra: samples added to some adapters' micro-batches)."""
        positions, params = self.load(adapters, extra)
        if self.max_tokens is not None and positions > self.max_tokens:
            return False
        return self.peak.predict(positions, params) <= self.capacity

    def choose(self, running: dict[int, list[Adapter]], queued: Sequence[Adapter],
               holder: dict[str, int]) -> dict[str, int]:
        """Queued adapters to admit -> their rank: in admission order, each onto the rank with the
        lowest predicted peak where it fits (an adapter whose state a rank holds: that rank). A
        rank with nothing running takes its first candidate even if it does not fit: it then
        runs alone (or fails alone, out of memory), never waits forever."""
        sets = {r: list(v) for r, v in running.items()}
        out: dict[str, int] = {}
        for a in admission_order(queued):
            ranks = [holder[a.id]] if a.id in holder else sorted(sets, key=lambda r: self.predict(sets[r]))
            for r in ranks:
                if self.fits(sets[r] + [a]) or not sets[r]:
                    sets[r].append(a)
                    out[a.id] = r
                    break
        return out

    def observe(self, positions: int, params: int, peak: float) -> None:
        """A step's measured peak: the model never stays below it."""
        self.peak = self.peak.raised_to(positions, params, peak)

    def out_of_memory(self, positions: int, params: int) -> None:
        """A step of this size did not fit: from now on it predicts more than the capacity."""
        self.peak = self.peak.raised_to(positions, params, self.capacity * 1.05)


def ample(analytic: PeakModel, everything: tuple[int, int], capacity: float) -> bool:
    """Whether a step of every planned adapter at once fits with twice its estimated bytes above what
    is held: then no admission can depend on how the peak is measured (all fit at once), so no probe
    step runs (4 steps and their adapters: 2.4 s of a 27 s SmolLM2 sweep on the H200, first uses of
    the kernels included, which the first step then makes) and the first real steps raise the
    estimate where they peak higher (Admission.observe)."""
    return analytic.fixed + AMPLE * (analytic.predict(*everything) - analytic.fixed) <= capacity


def fused_head_bytes(model: MultiLoraModel, shape: ModelShape, device: torch.device) -> Callable[[int], int] | None:
    """A training step's fused-head chunks by target rows (alto.loss.fused_head_step_bytes), where this
    model's steps run the fused head (alto.step: a plain head, alto.loss: on CUDA, frozen); else None."""
    if model.plain_head is None or not fused_head_available(device):
        return None
    act = next(model.parameters()).dtype.itemsize  # the hidden states' dtype, the head's logits'
    return functools.partial(fused_head_step_bytes, hidden=shape.hidden, vocab=shape.vocab, itemsize=act)


def fit_probes(points: Sequence[tuple[int, int, int, float]], head: Callable[[int], float] | None) -> PeakModel:
    """The peak model of probe steps (token positions, target rows, LoRA parameters, peak bytes). head
    (fused_head_bytes; None: no fused head): taken off each peak before the linear fit and added back by
    positions (PeakModel.head; positions are at least the rows with a target, and the chunks never
    shrink as rows grow: an over-estimate). The chunk holds every row up to alto.loss.HEAD_CHUNK_ROWS,
    then that many: fitted as a slope between a small GPU's probes (256 and 1,024 tokens) they
    would predict gigabytes a 20k-token step never holds."""
    if head is None:
        return PeakModel.fit([(t, p, peak) for t, _, p, peak in points], OPTIMIZER_BYTES)
    fitted = PeakModel.fit([(t, p, peak - head(rows)) for t, rows, p, peak in points], OPTIMIZER_BYTES)
    return dataclasses.replace(fitted, head=head)


def _probe(model: MultiLoraModel, shape: ModelShape, config: AdapterConfig, pad_id: int, device: torch.device,
           packed: bool, token_counts: Sequence[int], objective: Objective) -> list[tuple[int, int, int, float]]:
    """(token positions, target rows, adapter parameters, peak bytes) of training steps of temporary
    adapters (of zeros: the peak does not depend on their values) on random tokens, 4 samples of the
    objective per adapter (removed again, gradients dropped, whatever happens; the run's adapters are
    not in the model yet)."""
    rng = random.Random(0)
    points = []
    rows = 4 * objective.per_sample  # sequences per adapter
    try:
        for n in PROBE_ADAPTERS:
            for tokens in token_counts:
                ids = [f"__probe{i}" for i in range(n)]
                model.add_adapters(dict.fromkeys(ids, config), dict.fromkeys(ids, model.zero_weights(config)))
                length = max(2, tokens // (rows * n))
                batches = {aid: [[rng.randrange(shape.vocab) for _ in range(length)] for _ in range(rows)] for aid in ids}
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                mean_losses(colocated_losses(model, batches, pad_id, device, training=True, packed=packed,
                                             objective=objective)).sum().backward()
                torch.cuda.synchronize(device)
                points.append((rows * n * length, rows * n * (length - 1), n * adapter_params(config, shape),
                               float(torch.cuda.max_memory_allocated(device))))
                model.remove_adapters(ids)
    finally:
        model.remove_adapters([a for a in model.configs if a.startswith("__probe")])
        for layer in model.layers.values():
            for pack in layer.packs():
                pack.grad = None
        torch.cuda.empty_cache()
    return points
