"""`alto cluster`: the queue's submitted sweeps (tuning tasks, to a user) run on a cluster's GPUs,
placed by the same policy objects `alto simulate` evaluates (alto.sched.inter: one implementation,
two drivers, the simulator's clock or this one's).

Each submission is one SweepRun over the GPUs the policy gives it, one rank per GPU (rank-local
adapter parallelism: the ranks form the torch.distributed group alto.parallel expects), run by a
backend (alto.backend: Ray's placement groups and actors today, alto.ray_backend). The driver here
owns the lifecycle and needs no Ray.

What the driver does every poll: reads new submissions and cancel requests, reads each running
task's progress (micro-steps, adapters left, seconds per step: the duration model's prediction of
the job is corrected by them, alto.sched.inter.Job.observe), asks the policy for the allocation of
every present task and applies the difference. A task whose GPU set changes (capacity reclaim when
early termination leaves fewer adapters than GPUs; a preemptive policy's preemption) is halted at
a checkpoint and resumed on its new GPUs; GPUs it gives back go to whoever the policy names.
A task whose process or node dies resumes from its last checkpoint on GPUs the policy gives it
(at most MAX_RESTARTS times); one that fails (bad input, an error) fails alone.

Tasks are exclusive on their GPUs (AltoPolicy(share=False)): two tasks here are two processes,
which would hold two copies of the base on a shared GPU; tenants of one base share its steps as
one multi-task sweep file (tasks:).

(Over 300 lines for a reason: the poll loop, the placement it applies and the submissions'
lifecycle (launch, start, halt, death, end) read and change the same records; what lives on disk
is alto.task_queue's, how ranks run is the backend's.)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from alto import task_queue
from alto.backend import Backend, RankArgs, RanksDied, RunFailed
from alto.base import model_config
from alto.checkpoint import CHECKPOINT
from alto.inputs import INPUT_ERRORS, first_line
from alto.runlog import append_rows
from alto.sched.catalog import ModelShape, gpu_type
from alto.sched.inter import POLICIES, AltoPolicy, Job, Policy, TraceTask, Workload
from alto.sched.sim import HoldLog, plot_holds
from alto.search import searcher_of
from alto.sweep import Sweep, parse_sweep
from alto.tune import HALTED

MAX_RESTARTS = 3  # a task whose processes die more often than this fails (a crash, not bad luck)
EVENT_COLUMNS = ("time_s", "task", "event", "gpus", "detail")
PREDICTION_COLUMNS = ("time_s", "task", "micro_steps", "adapters_left", "predicted_left_s")


@dataclass
class Submission:
    """A submitted sweep as the driver runs it."""

    name: str
    text: str  # the sweep file
    job: Job
    run_dir: Path
    planned_micro_steps: int
    predicted_total_s: float
    state: str = "queued"
    restarts: int = 0
    error: str | None = None
    launched: object = None  # the backend's handle of its ranks (None: not launched)
    resume: bool = False
    pids: list[int] = field(default_factory=list)  # the ranks' processes (alto status; a test kills one)
    halt_for: str | None = None  # why it is being halted: "move" (new GPUs), "cancel"
    first_start_s: float | None = None
    micro_steps: int = 0
    resumed_from: int = 0  # the micro-step its latest run started from (its checkpoint's)


def predicted_job(name: str, sweep: Sweep, gpus: int, arrival_s: float, gpu: str) -> tuple[Job, int]:
    """The task as the scheduler's model sees it (alto.sched.inter.Job.new, as the simulator builds
    its jobs): its configs, their micro-steps and sequence length, the base model's shape; the
    early-termination rungs of its monitor, if any. Returns the job and its planned micro-steps."""
    # what its searchers may propose (a search's largest configurations) and how many they will
    configs = [c for t in sweep.tasks.values() for c in searcher_of(t).bounds(t).values()]
    planned = sum(searcher_of(t).planned(t) for t in sweep.tasks.values())
    micro_steps = max(c.max_steps * c.grad_accum for c in configs)
    seq_len = max(t.data["max_length"] for t in sweep.tasks.values())
    monitors = [t.monitor for t in sweep.tasks.values() if t.monitor]
    # Rungs as the simulator's default workload; the first config stands for all (their measured
    # steps correct the rest).
    workload = Workload(gpu=gpu_type(gpu), seq_len=seq_len, config=configs[0],
                        rungs=Workload.rungs if monitors else (), keep=1 / monitors[0].eta if monitors else 1.0)
    shape = ModelShape.from_hf_config(model_config(sweep.model))
    spec = TraceTask(arrival_s, name, str(sweep.model), planned,
                     micro_steps * configs[0].micro_batch_size * seq_len, gpus)
    return Job.new(spec, shape, workload), micro_steps


class Driver:
    """backend: where ranks run (default: Ray, alto.ray_backend, of `resource` slots: GPUs, or
    `slots` CPU processes standing in for them; on the Ray cluster at `address`, or a local one)."""

    def __init__(self, queue: Path, policy: str = "alto", resource: str = "GPU", address: str | None = None,
                 slots: int | None = None, gpu: str = "H100", poll_s: float = 1.0, linger_s: float = 0.0,
                 log=print, backend: Backend | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"--policy={policy!r} is unknown; known: {', '.join(POLICIES)}")
        gpu_type(gpu)  # an unknown --gpu-type fails before Ray starts
        task_queue.check_address(address)
        if backend is None:
            from alto.ray_backend import RayBackend  # imports ray: only for the default backend

            backend = RayBackend(resource, address, slots)
        self.backend = backend
        self.queue, self.resource, self.address, self.gpu = queue, resource, address, gpu
        self.policy: Policy = AltoPolicy(share=False) if policy == "alto" else POLICIES[policy]()
        self.poll_s, self.linger_s, self.log = poll_s, linger_s, log
        self.tasks: dict[str, Submission] = {}
        self.holds = HoldLog()
        self.started = time.time()
        self.slots = self.threads = 0
        # Its lifecycle in status.json: starting, serving (a whole poll done: what alto submit waits
        # for), then ended or failed with a reason (alto status shows a driver that is gone by it).
        self.state, self.reason = "starting", None

    def now(self) -> float:
        return time.time() - self.started

    # ---- the backend ------------------------------------------------------------------------------
    def launch(self, t: Submission, resume: bool) -> None:
        """Asks the backend for len(job.alloc) GPUs and the submission's ranks on them; they start
        (poll) once it has the GPUs, which a submission being halted may still hold."""
        args = RankArgs(t.text, str(t.run_dir / "sweep.yaml"), str(t.run_dir), resume, self.threads)
        t.launched = self.backend.launch(t.name, len(t.job.alloc), args)
        t.resume, t.state, t.halt_for = resume, "starting", None

    def release(self, t: Submission) -> None:
        if t.launched is not None:
            self.backend.release(t.launched)
        t.launched, t.pids = None, []

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> int:
        lock = task_queue.DriverLock(self.queue)
        if not lock.acquire():
            raise ValueError(f"a driver serves {str(self.queue)!r} already (alto status shows it)")
        try:
            self.slots, self.threads = self.backend.connect()
            self.log(f"alto cluster: {self.slots} {self.resource} | {self.threads} CPU threads per rank | "
                     f"policy {self.policy.name} | queue {self.queue}")
            idle_since = self.now()
            while True:
                self.read_submissions()
                for t in self.present():
                    self.poll(t)
                self.place()
                self.state = "serving"
                self.write_status()
                if self.present():
                    idle_since = self.now()
                elif self.now() - idle_since >= self.linger_s:
                    break
                time.sleep(self.poll_s)
            self.state, self.reason = "ended", f"no task left to serve (--linger {self.linger_s:g} s)"
            return 1 if any(t.state == "failed" for t in self.tasks.values()) else 0
        except Exception as e:
            if self.state == "serving":  # alto status says why (one that never served: its error line, alto submit's)
                self.state = "failed"
                self.reason = first_line(e) if isinstance(e, INPUT_ERRORS) else f"{type(e).__name__}: {first_line(e)}"
            raise
        finally:
            for t in self.tasks.values():  # their ranks end; a new driver resumes them from their checkpoints
                self.release(t)
            self.backend.close()
            if self.state != "starting":
                self.write_status()
            lock.release()

    def present(self) -> list[Submission]:
        return [t for t in self.tasks.values() if t.state not in task_queue.ENDED]

    def read_submissions(self) -> None:
        """New task folders (and, when the driver starts, the unfinished tasks a former one left:
        they resume from their checkpoints)."""
        for record in task_queue.tasks(self.queue):
            name = record["name"]
            if name in self.tasks or record["state"] in task_queue.ENDED:
                continue
            folder = task_queue.task_dir(self.queue, name)
            text = (folder / "sweep.yaml").read_text()
            sweep = parse_sweep(text, str(folder / "sweep.yaml"))
            arrival = max(0.0, record["submitted"] - self.started)
            job, planned = predicted_job(name, sweep, min(record["gpus"], self.slots), arrival, self.gpu)
            t = Submission(name, text, job, folder / "run", planned, job.predicted_remaining(),
                           restarts=record["restarts"])
            (t.run_dir).mkdir(exist_ok=True)
            (t.run_dir / "sweep.yaml").write_text(text)
            self.tasks[name] = t
            self.event(t, "arrive", f"asks {record['gpus']} GPU(s); predicted {task_queue.seconds(t.predicted_total_s)} s alone")

    def poll(self, t: Submission) -> None:
        if task_queue.cancel_requested(self.queue, t.name) and t.halt_for != "cancel":
            if t.state in ("running", "halting"):
                self.halt(t, "cancel")
            else:
                self.release(t)
                self.end(t, "cancelled", None)
                return
        if t.launched is None:
            return
        try:
            now = self.backend.poll(t.launched)
        except RunFailed as e:  # an error inside the run: it fails alone
            self.release(t)
            self.end(t, "failed", str(e))
            return
        except RanksDied as e:  # a process or node died (killed, out of host memory)
            self.release(t)
            self.died(t, str(e))
            return
        if now.pids is not None:
            t.pids, t.state = now.pids, "running"
            t.first_start_s = t.first_start_s if t.first_start_s is not None else self.now()
            self.event(t, "resume" if t.resume else "start", f"{len(now.pids)} GPU(s)")
        self.observe(t, now.progress)
        if now.codes is None:
            return
        self.release(t)
        if now.codes[0] == 0:
            self.end(t, "done", None)
        elif now.codes[0] == HALTED:
            self.halted(t)
        else:
            self.end(t, "failed", f"exit code {now.codes[0]} (its error line is in the driver's output)")

    def observe(self, t: Submission, progress: dict) -> None:
        """Rank 0's last step: where the job is, how many adapters are left, the measured step."""
        if not progress or progress["micro_steps"] == t.micro_steps:
            return
        t.micro_steps, t.resumed_from = progress["micro_steps"], progress["from_micro_step"]
        active = progress["running"] + progress["queued"]
        t.job.observe(t.micro_steps, max(1, active), progress["seconds"])
        append_rows(self.queue / "predictions.csv", PREDICTION_COLUMNS,
                    [[f"{self.now():.2f}", t.name, t.micro_steps, active, f"{t.job.predicted_remaining():.2f}"]])

    def halt(self, t: Submission, why: str) -> None:
        t.halt_for = why
        t.state = "halting"
        self.backend.halt(t.launched)
        self.event(t, "halt", why)

    def halted(self, t: Submission) -> None:
        """At its checkpoint: cancelled, or resumed on the GPUs the policy left it (none: queued)."""
        if t.halt_for == "cancel":
            self.end(t, "cancelled", f"halted at micro-step {t.micro_steps}: alto tune --resume {t.run_dir}")
        elif t.job.alloc:
            self.launch(t, resume=True)
        else:
            t.state = "queued"

    def died(self, t: Submission, why: str) -> None:
        t.restarts += 1
        task_queue.update_task(self.queue, t.name, restarts=t.restarts)
        self.event(t, "died", f"{why}; restart {t.restarts} of {MAX_RESTARTS}")
        if t.restarts > MAX_RESTARTS:
            self.end(t, "failed", f"its processes died {t.restarts} times ({why})")
            return
        self.set_alloc(t, {})
        t.state = "queued"  # the policy places it again; it resumes from its checkpoint

    def end(self, t: Submission, state: str, error: str | None) -> None:
        self.set_alloc(t, {})
        t.state, t.error = state, error
        t.job.finished = self.now()
        task_queue.update_task(self.queue, t.name, state=state, error=error)
        self.event(t, state, error or "")

    def set_alloc(self, t: Submission, alloc: dict[int, int]) -> None:
        if self.holds.change(t.name, t.job.alloc, alloc, self.now()):
            plot_holds(self.holds.rows, self.slots, self.queue / "timeline.png",
                       f"{self.policy.name}: which task held which GPU", unit="s")
            task_queue.write_rows(self.queue / "holds.csv", ("gpu", "task", "from_s", "to_s"), self.holds.rows)
        t.job.alloc = dict(alloc)

    def place(self) -> None:
        """The policy's allocation of every present task, applied: launches, and halts of running
        tasks whose GPUs change (a halting task resumes on the GPUs it has once halted)."""
        present, now = self.present(), self.now()
        allocation = self.policy.allocate(now, [t.job for t in present], self.slots)
        for t in present:
            new = allocation.get(t.name, {})
            if set(new) == set(t.job.alloc):
                continue
            self.set_alloc(t, new)
            if t.state == "running":
                self.halt(t, "move")
            elif t.state == "starting":  # not started yet: start over on the new GPUs
                self.release(t)
                t.state = "queued"
            if t.state == "queued" and new:  # the policy's decision ("start" follows once Ray has the GPUs)
                self.event(t, "place", f"{len(new)} GPU(s)", at=now)
                self.launch(t, resume=(t.run_dir / CHECKPOINT).exists())

    # ---- what a person reads -----------------------------------------------------------------------
    def event(self, t: Submission, what: str, detail: str, at: float | None = None) -> None:
        append_rows(self.queue / "events.csv", EVENT_COLUMNS,
                    [[f"{self.now() if at is None else at:.3f}", t.name, what, " ".join(map(str, sorted(t.job.alloc))), detail]])
        self.log(f"[{self.now():7.1f}s] {t.name}: {what} {detail}".rstrip())

    def write_status(self) -> None:
        now = self.now()
        task_queue.write_json(self.queue / "status.json", {
            "queue": str(self.queue), "now_s": now,
            "driver": {"pid": os.getpid(), "state": self.state, "reason": self.reason, "policy": self.policy.name,
                       "slots": self.slots, "resource": self.resource, "address": self.address or "local"},
            "tasks": [{"name": t.name, "state": t.state, "gpus": sorted(t.job.alloc), "asked": t.job.spec.gpus,
                       "micro_steps": t.micro_steps, "resumed_from": t.resumed_from, "planned_micro_steps": t.planned_micro_steps,
                       "active": t.job.active,
                       "predicted_left_s": None if t.state in task_queue.ENDED else t.job.predicted_remaining(),
                       "predicted_total_s": t.predicted_total_s,
                       "actual_total_s": (t.job.finished - t.first_start_s
                                          if t.state == "done" and t.first_start_s is not None else None),
                       "restarts": t.restarts, "error": t.error, "run_dir": str(t.run_dir), "pids": t.pids}
                      for t in self.tasks.values()]})
