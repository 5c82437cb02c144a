"""Discrete-event simulator: replays a trace of tuning tasks on a cluster under a policy.

Events (a heap; stale ones are skipped by a per-job version): arrivals, the end of a job's current
phase (a rung where configs stop early, or the end), the end of a load/migration stall, and a
policy's own priority changes (Tiresias' queue demotions). After every event the policy re-plans;
a job whose GPUs change pays ``restart_s`` (loading the base model) when it gets a GPU it did not
hold, or ``migrate_s`` (moving surviving adapters) when it only gives GPUs back.

Actual step times are the predicted ones times a per-job factor drawn once (log-normal,
``noise``): policies see only predictions, corrected online by each job's measured steps
(:meth:`JobEstimate.observe`). Checked while running (SimulationError otherwise): time never goes
backwards, no GPU holds two tasks under an exclusive policy or two base models ever, no GPU's
planned memory exceeds its capacity, and every job finishes.
"""
from __future__ import annotations

import heapq
import zlib
from dataclasses import dataclass, field

import numpy as np

from alto.sched.catalog import base_shape
from alto.sched.inter import POLICIES, Allocation, Job, Policy, TraceTask, Workload
from alto.sched.memory import base_bytes, capacity_bytes

EPS = 1e-9


class SimulationError(AssertionError):
    """An invariant of the simulation broke (a bug in a policy or the simulator)."""


@dataclass
class SimResult:
    policy: str
    gpus: int
    jobs: list[Job]
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (time, GPUs training) from then on
    busy_gpu_s: float = 0.0
    holds: list[tuple[int, str, float, float]] = field(default_factory=list)  # (GPU, task, from, to): who held what when

    @property
    def jct(self) -> np.ndarray:
        return np.array([j.finished - j.spec.arrival_s for j in self.jobs])

    @property
    def queueing(self) -> np.ndarray:
        return np.array([j.queued for j in self.jobs])

    @property
    def makespan(self) -> float:
        return max(j.finished for j in self.jobs) - min(j.spec.arrival_s for j in self.jobs)

    @property
    def utilization(self) -> float:
        """GPU-seconds spent training (not idle, not loading) over gpus × makespan."""
        return self.busy_gpu_s / (self.gpus * self.makespan)


class HoldLog:
    """Which task held which GPU when, as (GPU, task, from, to) rows: what the simulator and the
    real driver (alto.cluster) record and plot_holds draws."""

    def __init__(self, rows: list[tuple[int, str, float, float]] | None = None) -> None:
        self.rows = [] if rows is None else rows
        self.since: dict[str, dict[int, float]] = {}  # task -> GPU -> since when it holds it

    def change(self, task: str, old: dict[int, int], new: dict[int, int], now: float) -> list[tuple]:
        """The task's GPUs go from `old` to `new` now; returns the holds that ended."""
        since = self.since.setdefault(task, {})
        ended = [(g, task, since.pop(g), now) for g in sorted(set(old) - set(new))]
        self.rows.extend(ended)
        for g in set(new) - set(old):
            since[g] = now
        return ended

    def open_until(self, now: float) -> list[tuple[int, str, float, float]]:
        """Every hold so far, the open ones as if they ended now."""
        return self.rows + [(g, t, a, now) for t, held in self.since.items() for g, a in held.items()]


class Simulator:
    """tasks: trace tasks (their work predicted by `workload`), or jobs made already (Job.new: each
    with its own workload and shape; the real driver's tasks, replayed)."""

    def __init__(self, tasks: list[TraceTask] | list[Job], policy: Policy, gpus: int, workload: Workload | None = None,
                 restart_s: float = 60.0, migrate_s: float = 5.0, noise: float = 0.2, seed: int = 0) -> None:
        if gpus < 1:
            raise ValueError(f"gpus={gpus!r} must be >= 1")
        self.policy, self.gpus, self.workload = policy, gpus, workload or Workload()
        self.restart_s, self.migrate_s = restart_s, migrate_s
        specs = [t.spec if isinstance(t, Job) else t for t in tasks]
        too_big = [t.task for t in specs if t.gpus > gpus]
        if too_big:
            raise ValueError(f"tasks {too_big[:3]} ask for more than the cluster's {gpus} GPUs")
        self.jobs = []
        for t in tasks:
            if isinstance(t, Job):
                self.jobs.append(t)
                continue
            rng = np.random.default_rng([seed, zlib.crc32(t.task.encode())])  # same factor under every policy
            self.jobs.append(Job.new(t, base_shape(t.base_model), self.workload, float(np.exp(rng.normal(0.0, noise)))))
        self.by_name = {j.name: j for j in self.jobs}
        self.now = 0.0
        self.heap: list[tuple[float, int, str, str, int]] = []
        self.seq = 0
        self.result = SimResult(policy.name, gpus, self.jobs)
        self.holds = HoldLog(self.result.holds)

    def push(self, t: float, kind: str, job: Job) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, job.name, job.version))

    def step_times(self) -> dict[str, float]:
        """Actual seconds per micro-step of every running job (its slowest GPU)."""
        on_gpu: dict[int, list[Job]] = {}
        for j in self.jobs:
            for g, k in j.alloc.items():
                if k:
                    on_gpu.setdefault(g, []).append(j)
        gpu_s = {g: js[0].workload.gpu_step_seconds(js[0].shape, sum(j.alloc[g] for j in js), len(js))
                 for g, js in on_gpu.items()}
        return {j.name: max(gpu_s[g] for g, k in j.alloc.items() if k) for j in self.jobs if j.alloc}

    def advance(self, t: float) -> None:
        if t < self.now - EPS:
            raise SimulationError(f"time went backwards: {t} < {self.now}")
        predicted = self.step_times()
        training: set[int] = set()  # GPUs training in [now, t): stalls end only at events
        for j in self.jobs:
            if not j.alloc:
                if j.finished is None and j.spec.arrival_s <= self.now:
                    j.queued += t - self.now
                continue
            j.attained += len(j.alloc) * (t - self.now)
            if self.now >= j.stall_until:
                actual = predicted[j.name] * j.true_ratio
                j.done += (t - self.now) / actual
                j.estimate.set_prediction(predicted[j.name])
                j.estimate.observe(actual)
                training.update(g for g, k in j.alloc.items() if k)
        self.result.busy_gpu_s += len(training) * (t - self.now)
        self.result.timeline.append((self.now, len(training)))
        self.now = t

    def apply(self, allocation: Allocation) -> None:
        unknown = set(allocation) - {j.name for j in self.jobs if j.finished is None and j.spec.arrival_s <= self.now}
        if unknown:
            raise SimulationError(f"{self.policy.name} placed tasks that are not waiting or running: {unknown}")
        for j in self.jobs:
            new = allocation.get(j.name, {})
            if new == j.alloc:
                continue
            if new and set(new) <= set(j.alloc):  # only gives GPUs back: its survivors move
                j.stall_until = max(j.stall_until, self.now + self.migrate_s)
            elif new:  # a GPU it did not hold loads the base model
                j.stall_until = self.now + self.restart_s
            self.holds.change(j.name, j.alloc, new, self.now)
            j.alloc = dict(new)
            j.version += 1
        self.check_placement()

    def check_placement(self) -> None:
        per_gpu: dict[int, list[Job]] = {}
        for j in self.jobs:
            for g in j.alloc:
                if not 0 <= g < self.gpus:
                    raise SimulationError(f"{j.name} placed on GPU {g} of {self.gpus}")
                per_gpu.setdefault(g, []).append(j)
        cap = capacity_bytes(self.workload.gpu, self.workload.margin)
        for g, js in per_gpu.items():
            if len(js) > 1 and self.policy.exclusive:
                raise SimulationError(f"GPU {g} double-booked by {[j.name for j in js]} under {self.policy.name}")
            if len({j.spec.base_model for j in js}) > 1:
                raise SimulationError(f"GPU {g} holds two base models: {[j.name for j in js]}")
            configs = sum(j.alloc[g] for j in js)
            if len(js) > 1:  # only a single task may run in waves
                configs_at_once = configs
            else:
                configs_at_once = min(configs, js[0].workload.max_configs(js[0].shape))
            used = base_bytes(js[0].shape) + configs_at_once * js[0].workload.config_bytes(js[0].shape)
            if used > cap:
                raise SimulationError(f"GPU {g} over memory: {used / 1e9:.1f} GB > {cap / 1e9:.1f} GB")

    def schedule_events(self) -> None:
        times = self.step_times()
        for j in self.jobs:
            if not j.alloc:
                continue
            start = max(self.now, j.stall_until)
            left = j.phases[j.phase][1] - j.done
            self.push(start + max(0.0, left) * times[j.name] * j.true_ratio, "phase", j)
            if j.stall_until > self.now:
                self.push(j.stall_until, "stall", j)
            wake = self.policy.wake_after(j)
            if wake is not None:
                self.push(self.now + wake + EPS, "wake", j)

    def run(self) -> SimResult:
        for j in self.jobs:
            self.push(j.spec.arrival_s, "arrive", j)
        while self.heap:
            t, _, kind, name, version = heapq.heappop(self.heap)
            j = self.by_name[name]
            if kind != "arrive" and version != j.version:
                continue
            self.advance(t)
            if kind == "phase":
                if j.done < j.phases[j.phase][1] * (1 - 1e-9) - 1e-6:
                    raise SimulationError(f"{name}: phase event before its work was done")
                j.phase, j.done = j.phase + 1, 0.0
                if j.phase == len(j.phases):
                    self.holds.change(j.name, j.alloc, {}, self.now)
                    j.finished, j.alloc = self.now, {}
            present = [x for x in self.jobs if x.finished is None and x.spec.arrival_s <= self.now]
            self.apply(self.policy.allocate(self.now, present, self.gpus))
            for x in self.jobs:  # every rate may have changed (or the job ended): invalidate, re-push
                x.version += 1
            self.schedule_events()
            if not self.heap and any(x.finished is None for x in self.jobs):
                waiting = [x.name for x in self.jobs if x.finished is None]
                raise SimulationError(f"{self.policy.name}: nothing left to happen but {waiting[:5]} never finished")
        self.result.timeline.append((self.now, 0))
        return self.result


def simulate(tasks: list[TraceTask], policy: str | Policy, gpus: int, **kwargs) -> SimResult:
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is unknown; known: {', '.join(POLICIES)}")
        policy = POLICIES[policy]()
    return Simulator(tasks, policy, gpus, **kwargs).run()


def compare(tasks: list[TraceTask], gpus: int, policies: tuple[str, ...] = ("alto", "cpsat", "fifo", "sjf", "tiresias"),
            **kwargs) -> list[SimResult]:
    return [simulate(tasks, p, gpus, **kwargs) for p in policies]


def format_table(results: list[SimResult]) -> str:
    lines = ["policy | avg JCT h | makespan h | GPU util | avg queueing h",
             "--- | --- | --- | --- | ---"]
    lines += [f"{r.policy} | {r.jct.mean() / 3600:.2f} | {r.makespan / 3600:.2f} | {r.utilization:.1%} | "
              f"{r.queueing.mean() / 3600:.2f}" for r in results]
    return "\n".join(lines)


def plot(results: list[SimResult], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        x = np.sort(r.jct) / 3600
        a.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=r.policy)
        t, busy = zip(*r.timeline)
        b.step(np.array(t) / 3600, np.array(busy) / r.gpus, where="post", label=r.policy, alpha=0.8)
    a.set(xlabel="job completion time (h)", ylabel="fraction of tasks", title="JCT CDF", xscale="log")
    b.set(xlabel="time (h)", ylabel="GPUs training / GPUs", title="GPU utilization", ylim=(0, 1.05))
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TIME_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}


def plot_holds(holds: list[tuple[int, str, float, float]], gpus: int, path, title: str, unit: str = "h") -> None:
    """A timeline of which task held which GPU when (one row per GPU, one colour per task, the task's
    name on bars wide enough): what `alto simulate` writes per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for _, t, _, _ in holds})
    colours = plt.get_cmap("tab20")
    scale = TIME_UNITS[unit]
    end = max((b for _, _, _, b in holds), default=1.0) / scale
    fig, ax = plt.subplots(figsize=(12, 0.45 * gpus + 1.5))
    for g, task, a, b in holds:
        colour = colours(tasks.index(task) % 20)
        ax.barh(g, (b - a) / scale, left=a / scale, height=0.8, color=colour, edgecolor="white", linewidth=0.5)
        if (b - a) / scale > end / 25:
            ax.text((a + b) / 2 / scale, g, task, ha="center", va="center", fontsize=6, clip_on=True)
    ax.set(xlabel=f"time ({unit})", ylabel="GPU", title=title, yticks=range(gpus), ylim=(-0.6, gpus - 0.4), xlim=(0, end))
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
