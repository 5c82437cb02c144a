"""`alto cluster`: the queue's tuning tasks run on the GPUs of a Ray cluster, placed by the same
policy objects `alto simulate` evaluates (alto.sched.inter: one implementation, two drivers, the
simulator's clock or this one's).

Each task is one SweepRun over the GPUs the policy gives it: a Ray placement group of one bundle
per GPU, one actor per bundle (a rank of rank-local adapter parallelism: the actors form the
torch.distributed group alto.parallel expects). Ray rather than a scheduler of our own: it is the
cluster engine ML teams already run (Ray Train/Tune, KubeRay), and its placement groups reserve
a task's GPUs atomically, on one node or several, and hand them over as others free them.

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

(Over 300 lines for a reason: the poll loop, the placement it applies and the tasks' lifecycle
(launch, start, halt, death, end) read and change the same task records; what lives on disk is
alto.task_queue's.)
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from alto import task_queue
from alto.base import model_config
from alto.checkpoint import CHECKPOINT
from alto.inputs import INPUT_ERRORS, first_line
from alto.parallel import free_port, rank_threads
from alto.runlog import append_rows
from alto.sched.catalog import ModelShape, gpu_type
from alto.sched.inter import POLICIES, AltoPolicy, Job, Policy, TraceTask, Workload
from alto.sched.sim import HoldLog, plot_holds
from alto.sweep import Sweep, parse_sweep
from alto.tune import HALTED, run_rank

MAX_RESTARTS = 3  # a task whose processes die more often than this fails (a crash, not bad luck)
EVENT_COLUMNS = ("time_s", "task", "event", "gpus", "detail")
PREDICTION_COLUMNS = ("time_s", "task", "micro_steps", "adapters_left", "predicted_left_s")


@ray.remote(max_concurrency=4)  # run() holds one thread; progress/halt answer meanwhile
class Rank:
    """One rank of one task, on the GPU (or custom-resource slot) of its placement-group bundle."""

    def __init__(self) -> None:
        self.halting = threading.Event()
        self.progress_now: dict = {}

    def where(self) -> tuple[str, int, int]:
        """(this node's address, a free port there, this process's pid): rank 0's are the task's
        rendezvous."""
        return ray.util.get_node_ip_address(), free_port(), os.getpid()

    def run(self, text: str, source: str, run_dir: str, resume: bool, rank: int, world: int,
            address: str, port: int, threads: int) -> int:
        # Ray shows each actor only its own GPUs (CUDA_VISIBLE_DEVICES): its device is cuda:0.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=address,
                          MASTER_PORT=str(port))
        torch.set_num_threads(threads)  # the driver's count (Ray sets OMP_NUM_THREADS=1 where it is unset)
        return run_rank(text, source, run_dir, resume, None, should_halt=self.halting.is_set,
                        on_step=self.progress_now.update)

    def progress(self) -> dict:
        return dict(self.progress_now)

    def halt(self) -> None:
        self.halting.set()


@dataclass
class Task:
    """A submitted task as the driver runs it."""

    name: str
    text: str  # the sweep file
    job: Job
    run_dir: Path
    planned_micro_steps: int
    predicted_total_s: float
    state: str = "queued"
    restarts: int = 0
    error: str | None = None
    ranks: list = field(default_factory=list)
    group: object = None  # its placement group (None: not launched)
    rendezvous: object = None  # rank 0's where() ref while the group waits for its GPUs
    resume: bool = False
    runs: list = field(default_factory=list)  # the ranks' run() refs
    pids: list[int] = field(default_factory=list)  # the ranks' processes (alto status; a test kills one)
    halt_for: str | None = None  # why it is being halted: "move" (new GPUs), "cancel"
    first_start_s: float | None = None
    micro_steps: int = 0
    resumed_from: int = 0  # the micro-step its latest run started from (its checkpoint's)


def predicted_job(name: str, sweep: Sweep, gpus: int, arrival_s: float, gpu: str) -> tuple[Job, int]:
    """The task as the scheduler's model sees it (alto.sched.inter.Job.new, as the simulator builds
    its jobs): its configs, their micro-steps and sequence length, the base model's shape; the
    early-termination rungs of its monitor, if any. Returns the job and its planned micro-steps."""
    configs = list(sweep.adapters.values())
    micro_steps = max(c.max_steps * c.grad_accum for c in configs)
    seq_len = max(t.data["max_length"] for t in sweep.tasks.values())
    monitors = [t.monitor for t in sweep.tasks.values() if t.monitor]
    # Rungs as the simulator's default workload; the first config stands for all (their measured
    # steps correct the rest).
    workload = Workload(gpu=gpu_type(gpu), seq_len=seq_len, config=configs[0],
                        rungs=Workload.rungs if monitors else (), keep=1 / monitors[0].eta if monitors else 1.0)
    shape = ModelShape.from_hf_config(model_config(sweep.model))
    spec = TraceTask(arrival_s, name, str(sweep.model), len(configs),
                     micro_steps * configs[0].micro_batch_size * seq_len, gpus)
    return Job.new(spec, shape, workload), micro_steps


class Driver:
    def __init__(self, queue: Path, policy: str = "alto", resource: str = "GPU", address: str | None = None,
                 slots: int | None = None, gpu: str = "H100", poll_s: float = 1.0, linger_s: float = 0.0,
                 log=print) -> None:
        if policy not in POLICIES:
            raise ValueError(f"--policy={policy!r} is unknown; known: {', '.join(POLICIES)}")
        gpu_type(gpu)  # an unknown --gpu-type fails before Ray starts
        task_queue.check_address(address)
        self.queue, self.resource, self.address, self.gpu = queue, resource, address, gpu
        self.policy: Policy = AltoPolicy(share=False) if policy == "alto" else POLICIES[policy]()
        self.slots_asked, self.poll_s, self.linger_s, self.log = slots, poll_s, linger_s, log
        self.tasks: dict[str, Task] = {}
        self.holds = HoldLog()
        self.started = time.time()
        self.slots = self.threads = 0
        # Its lifecycle in status.json: starting, serving (a whole poll done: what alto submit waits
        # for), then ended or failed with a reason (alto status shows a driver that is gone by it).
        self.state, self.reason = "starting", None

    def now(self) -> float:
        return time.time() - self.started

    # ---- Ray -------------------------------------------------------------------------------------
    def connect(self) -> None:
        """Joins --address, or starts a Ray on this machine (stopped when the driver ends)."""
        if self.address:
            ray.init(address=self.address, log_to_driver=True)
        elif self.resource == "GPU":
            ray.init(num_gpus=self.slots_asked, include_dashboard=False)
        else:  # CPU processes stand in for GPUs: a custom resource of that many slots
            ray.init(resources={self.resource: self.slots_asked or 1}, include_dashboard=False)
        self.slots = int(ray.cluster_resources().get(self.resource, 0))
        if self.slots < 1:
            ray.shutdown()
            raise ValueError(f"the Ray cluster has no {self.resource!r} resource (on a machine without GPUs: "
                             "--resource slot --cluster-gpus N runs tasks as CPU processes)")
        # Every rank gets this process's CPU threads shared among the slots of the fullest node: the same
        # count whatever a task holds, moved or resumed; on a node of one slot, what alto tune gets here.
        self.threads = rank_threads(int(max(n["Resources"].get(self.resource, 0) for n in ray.nodes() if n["Alive"])))

    def launch(self, t: Task, resume: bool) -> None:
        """Asks Ray for a placement group of len(job.alloc) GPUs and the task's ranks on it; they
        start (poll: start) once Ray has the GPUs, which a task being halted may still hold."""
        world = len(t.job.alloc)
        bundle = {self.resource: 1}
        t.group = placement_group([bundle] * world, strategy="PACK", name=f"alto-{t.name}")
        gpu = 1 if self.resource == "GPU" else 0
        t.ranks = [Rank.options(num_cpus=0, num_gpus=gpu, resources={} if gpu else bundle,
                                scheduling_strategy=PlacementGroupSchedulingStrategy(t.group, i)).remote()
                   for i in range(world)]
        t.rendezvous, t.resume, t.state, t.halt_for = t.ranks[0].where.remote(), resume, "starting", None

    def start(self, t: Task) -> None:
        address, port, _ = ray.get(t.rendezvous)
        t.pids = [pid for _, _, pid in ray.get([r.where.remote() for r in t.ranks])]
        world = len(t.ranks)
        t.runs = [r.run.remote(t.text, str(t.run_dir / "sweep.yaml"), str(t.run_dir), t.resume, i, world, address, port,
                               self.threads) for i, r in enumerate(t.ranks)]
        t.rendezvous, t.state = None, "running"
        t.first_start_s = t.first_start_s if t.first_start_s is not None else self.now()
        self.event(t, "resume" if t.resume else "start", f"{world} GPU(s)")

    def release(self, t: Task) -> None:
        for r in t.ranks:
            ray.kill(r)
        if t.group is not None:
            remove_placement_group(t.group)
        t.ranks, t.runs, t.group, t.rendezvous, t.pids = [], [], None, None, []

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> int:
        lock = task_queue.DriverLock(self.queue)
        if not lock.acquire():
            raise ValueError(f"a driver serves {str(self.queue)!r} already (alto status shows it)")
        try:
            self.connect()
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
            for t in self.tasks.values():
                if t.group is not None:  # its ranks end; a new driver resumes it from its checkpoint
                    self.release(t)
            if ray.is_initialized():
                ray.shutdown()
            if self.state != "starting":
                self.write_status()
            lock.release()

    def present(self) -> list[Task]:
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
            t = Task(name, text, job, folder / "run", planned, job.predicted_remaining(),
                     restarts=record["restarts"])
            (t.run_dir).mkdir(exist_ok=True)
            (t.run_dir / "sweep.yaml").write_text(text)
            self.tasks[name] = t
            self.event(t, "arrive", f"asks {record['gpus']} GPU(s); predicted {task_queue.seconds(t.predicted_total_s)} s alone")

    def poll(self, t: Task) -> None:
        if task_queue.cancel_requested(self.queue, t.name) and t.halt_for != "cancel":
            if t.runs:
                self.halt(t, "cancel")
            else:
                self.release(t)
                self.end(t, "cancelled", None)
                return
        try:
            if t.rendezvous is not None and ray.wait([t.rendezvous], timeout=0)[0]:
                self.start(t)
            if not t.runs:
                return
            self.observe(t, ray.get(t.ranks[0].progress.remote()))
            done, _ = ray.wait(t.runs, num_returns=len(t.runs), timeout=0)
            for ref in done:  # a rank that ended in an error raises it now (the others may wait for it forever)
                ray.get(ref)
            if len(done) < len(t.runs):
                return
            codes = ray.get(t.runs)
        except ray.exceptions.RayTaskError as e:  # an error inside the run: it fails alone
            self.release(t)
            self.end(t, "failed", str(e).strip().splitlines()[-1])
            return
        except ray.exceptions.RayError as e:  # a process or node died (killed, out of host memory)
            self.release(t)
            self.died(t, type(e).__name__)
            return
        self.release(t)
        if codes[0] == 0:
            self.end(t, "done", None)
        elif codes[0] == HALTED:
            self.halted(t)
        else:
            self.end(t, "failed", f"exit code {codes[0]} (its error line is in the driver's output)")

    def observe(self, t: Task, progress: dict) -> None:
        """Rank 0's last step: where the job is, how many adapters are left, the measured step."""
        if not progress or progress["micro_steps"] == t.micro_steps:
            return
        t.micro_steps, t.resumed_from = progress["micro_steps"], progress["from_micro_step"]
        active = progress["running"] + progress["queued"]
        t.job.observe(t.micro_steps, max(1, active), progress["seconds"])
        append_rows(self.queue / "predictions.csv", PREDICTION_COLUMNS,
                    [[f"{self.now():.2f}", t.name, t.micro_steps, active, f"{t.job.predicted_remaining():.2f}"]])

    def halt(self, t: Task, why: str) -> None:
        t.halt_for = why
        t.state = "halting"
        t.ranks[0].halt.remote()
        self.event(t, "halt", why)

    def halted(self, t: Task) -> None:
        """At its checkpoint: cancelled, or resumed on the GPUs the policy left it (none: queued)."""
        if t.halt_for == "cancel":
            self.end(t, "cancelled", f"halted at micro-step {t.micro_steps}: alto tune --resume {t.run_dir}")
        elif t.job.alloc:
            self.launch(t, resume=True)
        else:
            t.state = "queued"

    def died(self, t: Task, why: str) -> None:
        t.restarts += 1
        task_queue.update_task(self.queue, t.name, restarts=t.restarts)
        self.event(t, "died", f"{why}; restart {t.restarts} of {MAX_RESTARTS}")
        if t.restarts > MAX_RESTARTS:
            self.end(t, "failed", f"its processes died {t.restarts} times ({why})")
            return
        self.set_alloc(t, {})
        t.state = "queued"  # the policy places it again; it resumes from its checkpoint

    def end(self, t: Task, state: str, error: str | None) -> None:
        self.set_alloc(t, {})
        t.state, t.error = state, error
        t.job.finished = self.now()
        task_queue.update_task(self.queue, t.name, state=state, error=error)
        self.event(t, state, error or "")

    def set_alloc(self, t: Task, alloc: dict[int, int]) -> None:
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
    def event(self, t: Task, what: str, detail: str, at: float | None = None) -> None:
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
