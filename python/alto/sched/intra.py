"""Intra-task scheduling: which of a task's configs run together on one GPU, at which micro-batch
size, in which order.

1. Micro-batch sizes: while the whole set does not fit the GPU's memory (less the safety margin),
   the config with the largest activation footprint drops to the next smaller micro-batch size
   that divides its effective batch (micro_batch_size × grad_accum), grad_accum rising to match, so
   every optimizer step sees the same samples. Co-running beats waves: the step's fixed cost is shared.
2. Admission order: longest predicted work first (micro-steps × its own share of a step), so the
   long configs start at once and short ones fill memory that frees up (LPT keeps the tail short).
3. Timeline: configs are admitted in that order while they fit; when one finishes, the waiting ones
   that now fit are admitted (in order, skipping one that does not fit yet). The step time of each
   interval comes from the calibrated :class:`~alto.sched.estimate.StepTimeModel`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from alto.registry import AdapterConfig
from alto.sched.catalog import REFERENCE_GPU, GPUType, ModelShape, gpu_type
from alto.sched.estimate import StepTimeModel, default_model
from alto.sched.memory import DEFAULT_MARGIN, adapter_bytes, base_bytes, capacity_bytes


@dataclass(frozen=True)
class ConfigSlot:
    index: int  # position in the task's config list
    micro_batch_size: int
    grad_accum: int
    micro_steps: int  # max_steps × grad_accum at that micro-batch size
    bytes: int  # what the config adds to the GPU at that micro-batch size
    start_s: float
    end_s: float


@dataclass(frozen=True)
class TaskSchedule:
    gpu: GPUType
    entries: tuple[ConfigSlot, ...]  # in admission order
    base_bytes: int
    capacity_bytes: int
    peak_bytes: int

    @property
    def admission_order(self) -> list[int]:
        return [e.index for e in self.entries]

    def running_at(self, t: float) -> list[ConfigSlot]:
        return [e for e in self.entries if e.start_s <= t < e.end_s]


def _smaller_micro_batch(mbs: int, effective: int) -> int | None:
    return next((m for m in range(mbs - 1, 0, -1) if effective % m == 0), None)


def schedule_task(configs: Sequence[AdapterConfig], seq_len: int, shape: ModelShape,
                  gpu: str | GPUType = REFERENCE_GPU, model: StepTimeModel | None = None,
                  margin: float = DEFAULT_MARGIN, weight_bytes: int = 2) -> TaskSchedule:
    if not configs:
        raise ValueError("schedule_task: configs is empty")
    model = model or default_model()
    gpu = gpu_type(gpu)
    cap, base = capacity_bytes(gpu, margin), base_bytes(shape, weight_bytes)
    effective = [c.micro_batch_size * c.grad_accum for c in configs]
    mbs = [c.micro_batch_size for c in configs]

    def size(i: int) -> int:
        return adapter_bytes(configs[i], seq_len, shape, mbs[i])

    for i in range(len(configs)):  # each config must fit alone, at micro-batch 1 if need be
        while base + size(i) > cap and (m := _smaller_micro_batch(mbs[i], effective[i])):
            mbs[i] = m
        if base + size(i) > cap:
            raise ValueError(f"config {i} (rank {configs[i].rank}) does not fit on {gpu.name} even at "
                             f"micro_batch_size 1: {(base + size(i)) / 1e9:.1f} GB > {cap / 1e9:.1f} GB usable")
    while base + sum(size(i) for i in range(len(configs))) > cap:
        shrinkable = [i for i in range(len(configs)) if _smaller_micro_batch(mbs[i], effective[i])]
        if not shrinkable:
            break  # the rest runs in waves
        i = max(shrinkable, key=size)
        mbs[i] = _smaller_micro_batch(mbs[i], effective[i])

    sized = [c if m == c.micro_batch_size else
               AdapterConfig(**{**c.to_dict(), "micro_batch_size": m, "grad_accum": e // m})
               for c, m, e in zip(configs, mbs, effective)]
    steps = [c.max_steps * c.grad_accum for c in sized]
    solo = [s * model.step_seconds([c], seq_len, shape, gpu) for s, c in zip(steps, sized)]
    order = sorted(range(len(configs)), key=lambda i: (-solo[i], i))

    # Replay the admissions interval by interval.
    waiting, running = list(order), {}  # running: index -> micro-steps left
    start, end, t, used, peak = {}, {}, 0.0, base, base
    while waiting or running:
        for i in list(waiting):
            if used + size(i) <= cap:
                waiting.remove(i)
                running[i], start[i] = steps[i], t
                used += size(i)
        peak = max(peak, used)
        if not running:  # cannot happen: every config fits alone
            raise RuntimeError("schedule_task: nothing admissible")
        n = min(running.values())
        t += n * model.step_seconds([sized[i] for i in running], seq_len, shape, gpu)
        for i in list(running):
            running[i] -= n
            if running[i] == 0:
                del running[i]
                end[i] = t
                used -= size(i)
    entries = tuple(ConfigSlot(i, mbs[i], sized[i].grad_accum, steps[i], size(i), start[i], end[i]) for i in order)
    return TaskSchedule(gpu, entries, base, cap, peak)
