"""Inter-task scheduling: which tuning tasks run on which GPUs of a cluster.

A tuning task = N configs of one base model, each trained on the same number of tokens; early
termination (ASHA-like) keeps ``keep`` of the field at each rung, so a task's work is a list of
phases (active configs, micro-steps). A task on g GPUs spreads its active configs evenly; a GPU
steps its configs together (the calibrated :class:`StepTimeModel`), in waves if they exceed its
memory. Every policy sees the same cluster and the same task work (:class:`Workload`).

Policies (``allocate`` returns every running task's allocation, GPU -> configs there):

- ``fifo``: arrival order, each task holds its asked GPUs until it ends, no skipping.
- ``sjf``: shortest predicted duration first, non-preemptive, skips tasks that do not fit.
- ``tiresias``: 2D least-attained-service (GPU-seconds) in discretised queues, FIFO inside a queue,
  preemptive (Tiresias, NSDI'19, without its placement-profile part).
- ``alto``: shortest predicted remaining time first with backfilling; a running task gives back GPUs
  its surviving configs no longer need (capacity reclaim, re-planned at every rung); a task may
  join GPUs that already hold its base model (one backbone for several tasks' adapters) when memory
  allows and it is predicted to finish before the tasks there. Non-preemptive.
- ``cpsat``: the ALTO paper's inter-task placement, a constraint program minimizing the makespan
  (OR-Tools CP-SAT), re-solved when tasks arrive or finish. Exclusive, non-preemptive.

Two drivers run these policies: alto.sched.sim (a simulated clock) and alto.cluster (real tasks on
a Ray cluster). (Over 300 lines for a reason: the policies are one family, read and compared side
by side, over the one Job model they all see.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from alto.families import Llama
from alto.registry import AdapterConfig
from alto.sched.catalog import REFERENCE_GPU, GPUType, ModelShape, gpu_type
from alto.sched.estimate import JobEstimate, StepTimeModel, default_model
from alto.sched.memory import DEFAULT_MARGIN, adapter_bytes, base_bytes, capacity_bytes


@dataclass(frozen=True)
class TraceTask:
    """A tuning task as traces record it: the unit every policy places (alto.sched.trace reads them)."""

    arrival_s: float
    task: str
    base_model: str
    configs: int
    tokens: int  # per config
    gpus: int


@dataclass(frozen=True)
class Workload:
    """How trace tasks turn into LoRA work on one GPU type (the same for every policy)."""

    gpu: GPUType = field(default_factory=lambda: gpu_type(REFERENCE_GPU))
    seq_len: int = 512
    config: AdapterConfig = AdapterConfig(rank=16, micro_batch_size=2, target_modules=Llama.names)
    rungs: tuple[float, ...] = (0.25, 0.5)  # fractions of a config's micro-steps where the field shrinks
    keep: float = 0.5  # fraction of the active configs that survive a rung
    margin: float = DEFAULT_MARGIN
    share_slowdown: float = 0.05  # each extra task on a GPU slows its step by this (batch mixing, bookkeeping)
    model: StepTimeModel = field(default_factory=default_model)

    def micro_steps(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / (self.config.micro_batch_size * self.seq_len)))

    def phases(self, configs: int, tokens: int) -> list[tuple[int, int]]:
        """(active configs, micro-steps) from start to end, early termination at the rungs."""
        total, out, done, n = self.micro_steps(tokens), [], 0, configs
        for frac in self.rungs:
            at = round(total * frac)
            if at > done:
                out.append((n, at - done))
                done = at
            n = max(1, math.ceil(n * self.keep))
        out.append((n, total - done))
        return [p for p in out if p[1] > 0]

    def config_bytes(self, shape: ModelShape) -> int:
        return adapter_bytes(self.config, self.seq_len, shape)

    def max_configs(self, shape: ModelShape) -> int:
        """Configs of one base model that fit on one GPU at once."""
        room = capacity_bytes(self.gpu, self.margin) - base_bytes(shape)
        k = room // self.config_bytes(shape)
        if k < 1:
            raise ValueError(f"one config of a {shape} task does not fit on {self.gpu.name}")
        return int(k)

    def gpu_step_seconds(self, shape: ModelShape, configs: int, tasks: int = 1) -> float:
        """Predicted seconds for every config on one GPU to take one micro-step (waves if they do not fit)."""
        k = min(configs, self.max_configs(shape))
        waves = math.ceil(configs / k)
        step = self.model.step_seconds([self.config] * k, self.seq_len, shape, self.gpu)
        return waves * step * (1 + self.share_slowdown * (tasks - 1))

    def duration(self, shape: ModelShape, configs: int, tokens: int, gpus: int) -> float:
        """Predicted seconds of a task alone on `gpus` GPUs."""
        return sum(steps * self.gpu_step_seconds(shape, math.ceil(n / min(gpus, n)))
                   for n, steps in self.phases(configs, tokens))


@dataclass
class Job:
    """A task's state in the simulator (what policies read)."""

    spec: TraceTask
    shape: ModelShape
    workload: Workload  # how its work and step times are predicted
    phases: list[tuple[int, int]]
    estimate: JobEstimate
    true_ratio: float = 1.0  # actual / predicted step time (simulator only; policies learn it via estimate.observe)
    phase: int = 0
    done: float = 0.0  # micro-steps done in the current phase
    alloc: dict[int, int] = field(default_factory=dict)  # GPU -> configs of this job there (0 = held, idle)
    finished: float | None = None
    attained: float = 0.0  # GPU-seconds held
    queued: float = 0.0  # seconds arrived, unfinished and holding no GPU (preempted time included)
    stall_until: float = 0.0  # loading / migrating until then
    version: int = 0  # bumps invalidate stale simulator events

    @property
    def name(self) -> str:
        return self.spec.task

    @classmethod
    def new(cls, spec: TraceTask, shape: ModelShape, workload: Workload, true_ratio: float = 1.0) -> "Job":
        """A task's job before it runs: its work predicted by the workload (the simulator's and the
        real driver's alike)."""
        return cls(spec, shape, workload, workload.phases(spec.configs, spec.tokens),
                   JobEstimate(workload.gpu_step_seconds(shape, math.ceil(spec.configs / min(spec.gpus, spec.configs)))),
                   true_ratio)

    @property
    def active(self) -> int:
        return self.phases[self.phase][0]

    def observe(self, micro_steps: int, active: int, step_seconds: float) -> None:
        """A real run's progress (alto.cluster): its micro-steps place it among the predicted phases;
        its configs still training or queued replace the predicted ones from there on (never more);
        its measured step corrects the estimate of every step left."""
        start = 0
        for i, (_, steps) in enumerate(self.phases):
            if micro_steps < start + steps or i == len(self.phases) - 1:
                self.phase, self.done = i, min(micro_steps - start, steps)
                break
            start += steps
        self.phases = [(min(n, active) if i >= self.phase else n, s) for i, (n, s) in enumerate(self.phases)]
        if self.alloc and step_seconds > 0:
            per_gpu = math.ceil(self.active / min(len(self.alloc), self.active))
            self.estimate.set_prediction(self.workload.gpu_step_seconds(self.shape, per_gpu))
            self.estimate.observe(step_seconds)

    def predicted_remaining(self) -> float:
        """Seconds left alone on min(asked, active) GPUs, corrected by what this job measured so far."""
        left = [(n, steps - (self.done if i == self.phase else 0))
                for i, (n, steps) in enumerate(self.phases) if i >= self.phase]
        return self.estimate.ratio * sum(
            s * self.workload.gpu_step_seconds(self.shape, math.ceil(n / min(self.spec.gpus, n))) for n, s in left)


def spread(configs: int, gpus: list[int]) -> dict[int, int]:
    """Configs over GPUs as evenly as possible (GPUs left over hold 0)."""
    q, r = divmod(configs, len(gpus))
    return {g: q + (i < r) for i, g in enumerate(gpus)}


Allocation = dict[str, dict[int, int]]


class Policy:
    name: str
    exclusive: bool  # at most one task per GPU

    def allocate(self, now: float, jobs: list[Job], gpus: int) -> Allocation:
        raise NotImplementedError

    def wake_after(self, job: Job) -> float | None:
        """Seconds until a running job's priority changes on its own (None: never)."""
        return None


class ExclusivePolicy(Policy):
    """Today's tools: a task holds its asked GPUs alone until it ends (or is preempted)."""

    exclusive = True

    def __init__(self, name: str, key: Callable[[Job], tuple], preemptive: bool, backfill: bool) -> None:
        self.name, self.key, self.preemptive, self.backfill = name, key, preemptive, backfill

    def allocate(self, now: float, jobs: list[Job], gpus: int) -> Allocation:
        running = [j for j in jobs if j.alloc]
        selected = [] if self.preemptive else list(running)
        budget = gpus - sum(len(j.alloc) for j in selected)
        for j in sorted((j for j in jobs if self.preemptive or not j.alloc), key=self.key):
            if j.spec.gpus <= budget:
                selected.append(j)
                budget -= j.spec.gpus
            elif not self.backfill:
                break
        held = {g for j in selected if j.alloc for g in j.alloc}
        free = iter(g for g in range(gpus) if g not in held)
        return {j.name: spread(j.active, sorted(j.alloc) if j.alloc else [next(free) for _ in range(j.spec.gpus)])
                for j in selected}


class Tiresias(ExclusivePolicy):
    def __init__(self, thresholds: tuple[float, ...] = (3600.0, 8 * 3600.0)) -> None:
        self.thresholds = thresholds
        super().__init__("tiresias", lambda j: (self.queue(j), j.spec.arrival_s, j.name),
                         preemptive=True, backfill=True)

    def queue(self, job: Job) -> int:
        return sum(job.attained >= t for t in self.thresholds)

    def wake_after(self, job: Job) -> float | None:
        nxt = [t for t in self.thresholds if t > job.attained]
        return (nxt[0] - job.attained) / len(job.alloc) if nxt and job.alloc else None


class AltoPolicy(Policy):
    name = "alto"

    def __init__(self, share: bool = True) -> None:
        # share=False: never two tasks on one GPU (the real driver: a task is its own processes, so two
        # tasks on a GPU would hold two copies of the base; tasks meant to share one are one sweep file)
        self.share, self.exclusive = share, not share

    def allocate(self, now: float, jobs: list[Job], gpus: int) -> Allocation:
        allocation: Allocation = {}
        load: dict[int, list[Job]] = {}  # GPU -> jobs with configs there
        for j in (j for j in jobs if j.alloc):
            # Capacity reclaim: keep only the GPUs the surviving configs need (the fullest ones).
            keep = sorted(j.alloc, key=lambda g: (-j.alloc[g], g))[:min(len(j.alloc), j.active)]
            allocation[j.name] = spread(j.active, sorted(keep))
            for g in keep:
                load.setdefault(g, []).append(j)
        remaining = {j.name: j.predicted_remaining() for j in jobs}
        for j in sorted((j for j in jobs if not j.alloc), key=lambda j: (remaining[j.name], j.spec.arrival_s)):
            want = min(j.spec.gpus, j.active)
            per = math.ceil(j.active / want)
            free = [g for g in range(gpus) if g not in load]
            shared = sorted((g for g, hosts in load.items()
                             if self.share and all(h.spec.base_model == j.spec.base_model and remaining[h.name] > remaining[j.name]
                                    for h in hosts)
                             and sum(allocation[h.name][g] for h in hosts) + per <= j.workload.max_configs(j.shape)),
                            key=lambda g: (sum(allocation[h.name][g] for h in load[g]), g))
            chosen = (free + shared)[:want]
            if len(chosen) < want:
                continue  # backfilling: later (longer) tasks may still fit
            allocation[j.name] = spread(j.active, sorted(chosen))
            for g in chosen:
                load.setdefault(g, []).append(j)
        return allocation


class CpSatPolicy(Policy):
    """Each task an interval of its predicted remaining seconds on its asked GPUs; the running ones
    fixed from now, the queued ones placed by CP-SAT under one cumulative constraint (the cluster's
    GPUs) to minimize the makespan, then the sum of finish times. Solved again whenever the set of
    present tasks changes (an arrival or an end), with a deterministic work limit (the same plan on
    any machine); tasks whose planned start has come start, in planned order, on free GPUs."""

    name = "cpsat"
    exclusive = True
    WORK_LIMIT = 2.0  # CP-SAT deterministic time per solve (about seconds of one core)

    def __init__(self) -> None:
        self.present: frozenset[str] = frozenset()
        self.start: dict[str, int] = {}  # planned start, seconds after solved_at
        self.solved_at = 0.0

    def solve(self, now: float, jobs: list[Job], gpus: int) -> None:
        from ortools.sat.python import cp_model

        self.present, self.solved_at, self.start = frozenset(j.name for j in jobs), now, {}
        if not any(not j.alloc and j.spec.gpus <= gpus for j in jobs):
            return  # nothing to place
        model = cp_model.CpModel()
        seconds = {j.name: max(1, math.ceil(j.predicted_remaining())) for j in jobs}
        queued = [j for j in jobs if not j.alloc and j.spec.gpus <= gpus]  # a task asking too many never starts
        horizon = sum(seconds.values())
        intervals, demands, ends, starts = [], [], [], {}
        for j in jobs:
            if j.alloc:  # running: fixed from now
                intervals.append(model.NewFixedSizeIntervalVar(0, seconds[j.name], j.name))
                demands.append(len(j.alloc))
                ends.append(seconds[j.name])
            elif j in queued:
                starts[j.name] = model.NewIntVar(0, horizon, f"{j.name}.start")
                intervals.append(model.NewFixedSizeIntervalVar(starts[j.name], seconds[j.name], j.name))
                demands.append(j.spec.gpus)
                ends.append(starts[j.name] + seconds[j.name])
        makespan = model.NewIntVar(0, horizon, "makespan")
        model.AddMaxEquality(makespan, ends)
        model.AddCumulative(intervals, demands, gpus)
        weight = len(ends) * horizon + 1  # > any sum of ends: the makespan first, then the sum of ends
        model.Minimize(makespan * weight + sum(ends) if weight * horizon < 2**62 else makespan)
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1
        solver.parameters.max_deterministic_time = self.WORK_LIMIT
        status = solver.Solve(model)
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            self.start = {name: solver.Value(var) for name, var in starts.items()}
        else:  # no plan within the work limit (a very long queue): arrival order, as soon as GPUs free up
            self.start = dict.fromkeys(starts, 0)

    def allocate(self, now: float, jobs: list[Job], gpus: int) -> Allocation:
        if frozenset(j.name for j in jobs) != self.present:
            self.solve(now, jobs, gpus)
        allocation = {j.name: spread(j.active, sorted(j.alloc)) for j in jobs if j.alloc}
        free = [g for g in range(gpus) if not any(g in j.alloc for j in jobs)]
        due = [j for j in jobs if not j.alloc and j.name in self.start and self.start[j.name] <= now - self.solved_at]
        if not allocation:  # nothing running: no event would come to start a task planned later
            due = [j for j in jobs if j.name in self.start]
        for j in sorted(due, key=lambda j: (self.start[j.name], j.spec.arrival_s, j.name)):
            if j.spec.gpus <= len(free):
                allocation[j.name] = spread(j.active, free[: j.spec.gpus])
                free = free[j.spec.gpus :]
        return allocation


POLICIES: dict[str, Callable[[], Policy]] = {
    "alto": AltoPolicy,
    "fifo": lambda: ExclusivePolicy("fifo", lambda j: (j.spec.arrival_s, j.name), preemptive=False, backfill=False),
    "sjf": lambda: ExclusivePolicy("sjf", lambda j: (j.predicted_remaining(), j.spec.arrival_s, j.name),
                                   preemptive=False, backfill=True),
    "tiresias": Tiresias,
    "cpsat": CpSatPolicy,
}
