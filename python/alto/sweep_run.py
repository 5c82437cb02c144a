"""SweepRun: one sweep on one rank, step by step: it trains (alto.train), decides after every step
(the monitor's stops, capacity reclaim, migrations between ranks: a Decisions value) and applies
the decisions, merges the ranks' progress, logs and checkpoints.

Run folder: sweep.yaml (the sweep as given, written by alto.tune), losses.csv, decisions.csv,
steps.csv and evals.csv (written as the run goes, with its progress lines: alto.runlog),
checkpoint.pt (alto.checkpoint: every checkpoint_every micro-steps, where --stop-after stops, and
at the end), leaderboard.csv and leaderboards/<task>.csv, losses.png,
timing.json (seconds of this process's wall in each of PHASES),
adapters/<name>/ (PEFT format: each adapter's best or last weights; alto.results). Every task has
its own data, held-out sequences (evaluated co-located at its evaluation points, where each
adapter's best weights are copied to host memory) and monitor; all tasks' adapters share the
steps. The base model comes from alto.base; admission by memory from alto.admission.

(Over 300 lines for a reason: the loop, its decisions, the out-of-memory split and the ranks'
reports all read and change the same run state: owners, holders, admission order; split, each
part would reach into the others'.)
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alto import checkpoint, data as data_mod, results
from alto.admission import Admission, admission_order, fits_whole
from alto.base import device_type, idle_pass, load_base, shard
from alto.generate import greedy_completions
from alto.metrics import metric_function
from alto.model import MultiLoraModel
from alto.monitor import Decision, Monitor
from alto.parallel import Group
from alto.registry import Adapter, Registry, Status
from alto.runlog import Forecast, RunLog
from alto.sched.catalog import ModelShape
from alto.sched.memory import activation_bytes_per_token, adapter_params
from alto.sched.placement import adapter_cost, place, rank_loads, rebalance
from alto.sweep import Sweep
from alto.state import AdapterState, HostCopies, move_states
from alto.train import DataStream, StepOutOfMemory, Trainer


# Where a run's time goes (timing.json), the whole wall of the command: start-up (the interpreter,
# imports, reading the sweep: from the process's start, or from the call, in a caller's process),
# loading the base, tokenizing, the memory model's calibration, training steps, held-out evaluations
# (and decoding for metrics), checkpoints, writing the results, and the rest (other).
PHASES = ("startup", "load", "tokenize", "calibrate", "train", "evaluate", "checkpoint", "export", "other")


def process_start_time() -> float:
    """When this process began (time.time()'s clock), read from Linux's /proc (its start in clock
    ticks after boot, against the boot clock now: /proc/stat's boot time is whole seconds); elsewhere now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


@contextlib.contextmanager
def timed(seconds: dict[str, float], phase: str):
    """Adds the seconds the block takes to seconds[phase]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


def quiet(*_) -> None:
    """The log of ranks other than 0."""


@dataclass
class Decisions:
    """What rank 0 decides after a step, and every rank applies."""

    stops: list[Decision] = field(default_factory=list)  # the monitor's
    admissions: dict[str, int] = field(default_factory=dict)  # queued adapter -> the rank it starts on
    growth: dict[str, int] = field(default_factory=dict)  # running adapter -> samples added to its micro-batch
    moves: list[tuple[str, int, int]] = field(default_factory=list)  # (adapter, from rank, to rank)
    halt: bool = False  # stop after this step at a checkpoint (asked by whoever runs the sweep: alto.cluster)


class SweepRun:
    """One sweep on one rank. With several ranks (rank-local adapter parallelism, alto.parallel)
    every rank loads the same base model and data and keeps the same registry (statuses, losses:
    merged from a gather after every step); each adapter is trained on the one rank that holds it;
    rank 0 takes the decisions (stops, admissions, migrations) and broadcasts them, and writes every
    file of the run folder."""

    def __init__(self, sweep: Sweep, run_dir: Path, group: Group | None = None, started: float | None = None):
        """started: when the command began (time.time()), the start of timing.json's wall (default: now)."""
        self.sweep, self.run_dir = sweep, run_dir
        self.started = time.time() if started is None else started
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.seconds["startup"] = time.time() - self.started
        self.group = group or Group()
        self.device = torch.device("cpu")
        if device_type(sweep.device) == "cuda":
            if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
                # Packed steps change shape every step: fixed-size cached blocks fragment near a full
                # GPU (measured: 64 co-located 1B configs at 73 GB ran no faster than 16); growable
                # segments do not. The env variable's setting, at run time (a user's own wins).
                settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.11
                (settings or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
            self.device = torch.device("cuda", torch.cuda.current_device())
        # A base that may be sharded waits on the CPU (a GPU may not hold it whole) until that is decided.
        may_shard = sweep.shard_base is True or (sweep.shard_base == "auto" and self.group.world > 1)
        with self.timed("load"):
            self.base = load_base(sweep.model, sweep.base_dtype, self.device, sweep.base_quantize,
                                  torch.device("cpu") if may_shard else None)
        self.shape = ModelShape.from_hf_config(self.base.model.config)
        self.tasks = sweep.tasks
        self.train_seqs: dict[str, list[list[int]]] = {}  # task -> its sequences
        self.eval_seqs: dict[str, list[list[int]]] = {}
        for t in self.tasks.values():
            try:
                with self.timed("tokenize"):
                    self.train_seqs[t.name], self.eval_seqs[t.name] = data_mod.task_sequences(
                        t.data, self.base.tokenizer, self.base.eos_id)
            except ValueError as e:
                raise ValueError(f"{t.where}{e}") from None
        self.model = MultiLoraModel(self.base.model)
        # auto: sharded if any rank's device cannot hold the base (every rank must decide alike)
        self.sharded = may_shard and (sweep.shard_base is True or any(self.group.all_gather(not fits_whole(
            self.base.model, self.device, self.planned_activation_bytes()))))
        if self.sharded:
            with self.timed("load"):
                shard(self.base.model, {p for layer in self.model.layers.values() for p in layer.packs()}, self.device)
        elif may_shard:  # kept on the CPU for nothing: it fits whole
            self.model.to(self.device)
        self.registry = Registry()
        streams = {}
        for t in self.tasks.values():
            with self.timed("tokenize"):  # as tensors once per task: every adapter's stream shares them
                tensors = DataStream(self.train_seqs[t.name]).sequences
            for aid, cfg in t.adapters.items():
                self.registry.add(aid, cfg, t.name)
                streams[aid] = DataStream.shuffled(tensors, cfg.seed)
        self.trainer = Trainer(self.model, self.registry, streams, self.base.pad_id, self.device, sweep.packing)
        # used on rank 0 only: each task's adapters compete among themselves
        self.monitors = {t.name: Monitor(t.monitor) for t in self.tasks.values() if t.monitor}
        # adapter -> (step, weights on the CPU) of its best held-out loss, for tasks exporting best
        # (on the rank that evaluated it; collected on rank 0 at checkpoints)
        self.best_weights: dict[str, tuple[int, dict | Future]] = {}  # a future: its copy still under way
        self.host_copies = HostCopies()
        self.largest_step = 0  # most token positions a step ran: what an evaluation's forward may hold
        self.most_colocated = 0  # most adapters a step ran: how many the final evaluation puts in together
        self.admission = None  # max_running: auto admits by memory (every rank fits one; rank 0 decides)
        self.slots = sweep.max_running  # adapters per rank (lowered after an out-of-memory step)
        if sweep.max_running is None:
            with self.timed("calibrate"):
                self.admission = Admission.calibrate(
                    self.model, self.shape, {t: [len(s) for s in seqs] for t, seqs in self.train_seqs.items()},
                    sweep.packing, admission_order(self.registry)[0].config, self.base.pad_id, self.device,
                    sweep.memory_budget_gb, sweep.max_tokens_per_step)
        self.owner: dict[str, int] = {}  # running adapter -> the rank training it (same on every rank)
        self.holder: dict[str, int] = {}  # queued adapter whose state a rank holds (sent back after OOM)
        self.admitted: dict[str, None] = {}  # adapters in the order they were last admitted (the latest go back first)
        self.micro_steps = 0
        self.checkpointed: int | None = None  # the micro-step of the last checkpoint this process wrote
        self.samples_budget = 0  # most samples per step seen: what reclaim "grow" refills to
        self.logs: RunLog | None = None  # rank 0's, while it runs
        self.writer = checkpoint.Writer(run_dir)  # rank 0's checkpoints, written in the background

    def timed(self, phase: str):
        return timed(self.seconds, phase)

    def planned_activation_bytes(self) -> int:
        """A step's activations with the adapter whose micro-batch holds the most (the least a
        device must hold besides the base)."""
        act = next(self.base.model.parameters()).dtype.itemsize
        return max(activation_bytes_per_token(cfg, self.shape, act) * cfg.micro_batch_size
                   * statistics.fmean(len(s) for s in self.train_seqs[t.name])
                   for t in self.tasks.values() for cfg in t.adapters.values())

    def lockstep(self, passes: int) -> int:
        """How many forward passes every rank runs, this one needing `passes`: with a sharded base,
        the most any rank needs (the rest run idle passes); else its own."""
        return max(self.group.all_gather(passes)) if self.sharded else passes

    # ---- checkpoints -----------------------------------------------------------------------------
    def _collect(self) -> None:
        """Moves the states of adapters retired on other ranks, and the best weights they copied,
        to rank 0 (collective; of two copies of an adapter's best, the later step's is the best)."""
        t = self.trainer
        self.settle_best()
        got = self.group.gather(({}, {}) if self.group.is_leader else (t.retired, self.best_weights))
        if self.group.is_leader:
            for retired, best in got[1:]:
                t.retired.update(retired)
                for aid, (step, weights) in best.items():
                    if aid not in self.best_weights or step >= self.best_weights[aid][0]:
                        self.best_weights[aid] = (step, weights)
        else:
            t.retired.clear()
            self.best_weights.clear()
        self.holder = dict.fromkeys(self.holder, 0)

    def save_checkpoint(self) -> None:
        """Starts writing the checkpoint (collective: every rank sends its adapters to rank 0, whose
        writer thread writes it while the run goes on: wait_for_checkpoint)."""
        with self.timed("checkpoint"):
            self._save_checkpoint()
        self.checkpointed = self.micro_steps

    def _save_checkpoint(self) -> None:
        t = self.trainer
        self._collect()
        running = self.group.gather(t.export_states([a.id for a in t.running()], "cpu"))  # host copies
        shapes = self.group.gather((self.largest_step, self.most_colocated))
        if not self.group.is_leader:
            return
        # Nothing handed to the writer may change after: the states and best weights are copies
        # never written to (only replaced), the dicts holding them and the monitors' records are copied.
        states = {**t.retired, **{k: v for part in running for k, v in part.items()}}
        adapters = {a.id: {**a.progress(), "state": states.get(a.id)} for a in self.registry}
        self.writer.write({
            "micro_steps": self.micro_steps, "adapters": adapters, "samples_budget": self.samples_budget,
            "step_shapes": shapes, "monitors": copy.deepcopy({name: (m.rungs, m.log) for name, m in self.monitors.items()}),
            "best": dict(self.best_weights)})

    def wait_for_checkpoint(self) -> None:
        """Returns once the checkpoint being written (if any) is on disk."""
        with self.timed("checkpoint"):
            self.writer.wait()

    def restore(self) -> None:
        """Continues from the checkpoint, on any number of ranks (running adapters are placed anew)."""
        state = checkpoint.read(self.run_dir, (a.id for a in self.registry))
        self.micro_steps = state["micro_steps"]
        self.samples_budget = state["samples_budget"]
        # Each rank's largest step and most co-located adapters shape its evaluations' passes (and so
        # their float sums): resumed on as many ranks, each evaluates as the uninterrupted run did; on
        # another count, as the busiest did (a checkpoint of an earlier release has none: 0, as before).
        shapes = state.get("step_shapes") or [(0, 0)]
        mine = shapes[self.group.rank] if len(shapes) == self.group.world else tuple(map(max, zip(*shapes)))
        self.largest_step, self.most_colocated = mine
        for name, m in self.monitors.items():
            m.rungs, m.log = state["monitors"][name]
        if self.group.is_leader:
            self.best_weights = state["best"]
        running = []
        for aid, entry in state["adapters"].items():
            a = self.registry[aid]
            a.apply_progress(entry)
            if a.status == Status.RUNNING:
                running.append(a)
                self.admitted[aid] = None
            elif entry["state"] is not None:
                if a.status == Status.QUEUED:  # sent back after an out-of-memory step: rank 0 holds it
                    self.holder[aid] = 0
                if self.group.is_leader:
                    self.trainer.retired[aid] = entry["state"]
        costs = self.costs(running)
        self.owner = place([a.id for a in running], costs, [0.0] * self.group.world)
        mine = [a for a in running if self.owner[a.id] == self.group.rank]
        self.trainer.admit(mine, move_states({a.id: state["adapters"][a.id]["state"] for a in mine}, self.device))
        if self.group.is_leader:
            checkpoint.truncate_logs(self.run_dir, self.micro_steps)

    # ---- decisions (rank 0) and their application (every rank) -----------------------------------
    def costs(self, adapters: list[Adapter]) -> dict[str, float]:
        return {a.id: adapter_cost(a, self.tasks[a.task].data["max_length"], self.shape) for a in adapters}

    def decide(self, after_step: bool) -> Decisions:
        """Rank 0's decisions (after_step: the monitor's stops too): capacity reclaim (queued
        adapters, largest micro-batch first, admitted where the memory model says they fit, or
        into free max_running slots on the least-loaded ranks; with reclaim "grow" and nobody
        queued, the survivors' micro-batches grow back to the most samples per step seen, as far
        as they fit), then migrations that even out the ranks' work."""
        sweep, world = self.sweep, self.group.world
        stops = self.monitor_stops() if after_step else []
        stopped = {d.adapter for d in stops}
        running = [a for a in self.registry.with_status(Status.RUNNING) if a.id not in stopped]
        queued = admission_order(self.registry.with_status(Status.QUEUED))
        owner = {aid: r for aid, r in self.owner.items() if aid not in stopped}
        placed: dict[str, int] | None = None
        if self.admission is not None:
            by_rank: dict[int, list[Adapter]] = {r: [] for r in range(world)}
            for a in running:
                by_rank[owner[a.id]].append(a)
            placed = self.admission.choose(by_rank, queued, self.holder)
            admit = [a for a in queued if a.id in placed]
        else:
            slots = self.slots * world - len(running)
            admit = queued[: max(0, slots)]
        growth: dict[str, int] = {}
        if sweep.reclaim == "grow" and running + admit and len(admit) == len(queued):
            members = running + admit
            for i in range(max(0, self.samples_budget - sum(a.micro_batch_size for a in members))):
                aid = members[i % len(members)].id
                growth[aid] = growth.get(aid, 0) + 1
            if self.admission is not None and growth and not self.admission.fits(members, growth):
                growth = {}  # the grown set would not fit: the samples stay freed
        if world == 1:  # nothing to place: no cost estimates on the single-rank step path
            return Decisions(stops, {a.id: 0 for a in admit}, growth)
        costs = self.costs(running + admit)
        for aid, n in growth.items():  # grown micro-batches cost more
            a = self.registry[aid]
            costs[aid] *= (a.micro_batch_size + n) / a.micro_batch_size
        if placed is None:
            pinned = {a.id: self.holder[a.id] for a in admit if a.id in self.holder}
            placed = {**place([a.id for a in admit if a.id not in pinned], costs, rank_loads(owner, costs, world)),
                      **pinned}
        return Decisions(stops, placed, growth, rebalance({**owner, **placed}, costs, world))

    def say(self, line: str) -> None:
        if self.logs is not None:
            self.logs.say(line)

    def apply(self, decisions: Decisions) -> None:
        rank, t = self.group.rank, self.trainer
        stopped = []  # this rank's, retired together
        for d in decisions.stops:
            a = self.registry[d.adapter]
            if self.owner.pop(a.id) == rank:
                stopped.append((a, Status.STOPPED_EARLY, d.reason))
            else:
                a.status, a.failure = Status.STOPPED_EARLY, d.reason
            if self.logs is not None:
                self.logs.decision(self.micro_steps, d.adapter, d.micro_step, d.rule, d.reason)
            self.say(f"  stop {d.adapter}: {d.reason}")
        if stopped:
            t.retire(stopped)
        for aid, n in decisions.growth.items():
            self.registry[aid].extra_batch += n
        admitted: list[Adapter] = []
        saved: dict[str, AdapterState] = {}
        for aid, r in decisions.admissions.items():
            a = self.registry[aid]
            self.owner[aid] = r
            self.holder.pop(aid, None)
            self.admitted.pop(aid, None)
            self.admitted[aid] = None
            if r == rank:
                admitted.append(a)
                if aid in t.retired:  # sent back to the queue after an out-of-memory step
                    saved[aid] = t.retired.pop(aid)
            else:
                a.status = Status.RUNNING
            self.say(f"  admit {aid} on rank {r}" if self.group.world > 1 else f"  admit {aid} into a freed slot")
        if admitted:  # all at once: each layer re-packed once
            t.admit(admitted, move_states(saved, self.device))
        for aid, src, dst in decisions.moves:
            a = self.registry[aid]
            if rank == src:
                self.group.send_state(t.release([aid])[aid], dst, self.device)
            elif rank == dst:
                t.admit([a])  # a fresh copy gives the shapes to receive into
                t.admit([a], {aid: self.group.recv_state(t.release([aid])[aid], src, self.device)})
            self.owner[aid] = dst
            self.say(f"  move {aid}: rank {src} -> rank {dst}")

    def monitor_stops(self) -> list[Decision]:
        """Each task's monitor's stops after this step, among the task's running adapters (with
        signal eval: only at the task's evaluation points)."""
        stops = []
        for name, mon in self.monitors.items():
            running = [a for a in self.registry.with_status(Status.RUNNING) if a.task == name]
            if running and (mon.config.signal != "eval" or self.evaluates(name)):
                stops += mon.decide(running)
        return stops

    def evaluates(self, task: str) -> bool:
        """Whether this step ends with the task's held-out losses."""
        every = self.tasks[task].eval.every
        return every is not None and self.micro_steps % every == 0 and bool(self.eval_seqs[task])

    def held_out(self, task: str) -> list[list[int]]:
        """The held-out sequences a task's evaluations read."""
        return self.eval_seqs[task][: self.tasks[task].eval.samples]

    def eval_positions(self) -> int:
        """Token positions an evaluation's forward may hold: as many as the largest training step
        ran (no activations are kept for a backward), at least one sequence of each task."""
        return max(self.largest_step, *(t.data["max_length"] for t in self.tasks.values()))

    def evaluate(self, adapters: list[Adapter]) -> list[float]:
        """Held-out losses of adapters in the model, each on its task's sequences, co-located."""
        return results.held_out_losses(self.model, {a.id: self.held_out(a.task) for a in adapters},
                                       self.base.pad_id, self.device, self.eval_positions(), self.lockstep)

    def keep_if_best(self, a: Adapter, loss: float, weights, live: bool = True) -> None:
        """Records a held-out loss of the adapter's weights at its current step; the best so far is
        kept where its task exports best: the weights in the model (live) copied to host memory in
        the background (HostCopies), a host copy nothing changes (a retired adapter's) as it is."""
        if math.isfinite(loss) and (a.best is None or loss < a.best[1]):
            a.best = (a.step, loss)
            if self.tasks[a.task].export == "best":
                self.best_weights[a.id] = (a.step, self.host_copies.weights(weights) if live else weights)

    def settle_best(self) -> None:
        """Waits for the best weights' host copies under way."""
        for aid, (step, weights) in self.best_weights.items():
            if isinstance(weights, Future):
                self.best_weights[aid] = (step, weights.result())

    # ---- the step's reports ----------------------------------------------------------------------
    def report(self, marks: dict[str, tuple[int, int]], oom: tuple[int, int, int] | None) -> tuple[dict[str, tuple], tuple | None]:
        """The progress this rank's adapters made in the step, (since, progress(since)) each (marks:
        taken before it), with their held-out losses at evaluation points; and, if the step ran out
        of memory, what out_of_memory returned."""
        mine = {a.id for a in self.trainer.running()} if oom is None else set()
        # in the registry's order, not the trainer's (a resumed run admits in another): the order sets
        # how the held-out sequences fall into passes, and so the float sums
        due = [a for a in self.registry if a.id in mine and self.evaluates(a.task)]
        if due or (self.sharded and any(map(self.evaluates, self.tasks))):  # sharded: every rank's passes meet
            with self.timed("evaluate"):
                losses = self.evaluate(due)
            for a, loss in zip(due, losses):
                a.record_eval(loss)
                self.keep_if_best(a, loss, self.model.adapter_weights(a.id, views=True))
        return {aid: (since, self.registry[aid].progress(since)) for aid, since in marks.items()}, oom

    def out_of_memory(self, positions: int, params: int) -> tuple[int, int, int]:
        """This rank's step ran out of memory (and was undone): the most recently admitted half of
        its adapters goes back to the queue, states kept (a lone adapter fails: it cannot run
        smaller; those sent back lose any samples reclaim "grow" gave them). Returns the failed
        step's (token positions: the larger of the step's and the planned ones, so the memory
        model never admits that set again; its adapter parameters, `params`) and how many adapters
        it kept."""
        t = self.trainer
        order = list(self.admitted)
        mine = sorted(t.running(), key=lambda a: order.index(a.id))
        if self.admission is not None:
            positions = max(positions, self.admission.load(mine)[0])
        if len(mine) == 1:
            t.retire([(mine[0], Status.FAILED, f"out of memory alone, in a step of {positions} token positions")])
        back = mine[(len(mine) + 1) // 2:]  # none of a lone one
        for a in back:
            a.extra_batch = 0
        if back:
            t.retire([(a, Status.QUEUED, f"out of memory: a step of {len(mine)} adapters and {positions} token "
                                         "positions did not fit; back to the queue") for a in back])
        return positions, params, (len(mine) + 1) // 2 if len(mine) > 1 else 0

    def merge(self, reports: list[tuple[dict, tuple | None]]) -> dict[str, float]:
        """Applies every rank's report to this rank's registry (adapters sent back to the queue are
        held by the rank that sent them; rank 0 logs why and corrects the memory model); returns
        the step's losses."""
        losses = {}
        for rank, (part, oom) in enumerate(reports):
            for aid, (since, progress) in part.items():
                a = self.registry[aid]
                if self.owner.get(aid) != self.group.rank:  # the owner updated its copy itself
                    a.apply_progress(progress, since)
                if progress["losses"]:
                    losses[aid] = a.losses[-1]
                if a.status == Status.QUEUED:
                    self.holder[aid] = rank
                if a.status != Status.RUNNING:
                    self.owner.pop(aid)
                if oom is not None and a.status != Status.RUNNING and self.logs is not None:
                    self.logs.decision(self.micro_steps, aid, a.micro_step, "out-of-memory", a.failure)
            if oom is not None:
                positions, params, kept = oom
                self.samples_budget = 0  # reclaim "grow" refills to what runs after the split
                if self.admission is not None:
                    self.admission.out_of_memory(positions, params)
                elif kept:
                    self.slots = min(self.slots, kept)
        return {a.id: losses[a.id] for a in self.registry if a.id in losses}  # registry order

    # ---- the loop --------------------------------------------------------------------------------
    def run(self, until: int | None = None, log=print, should_halt=None, on_step=None, bar: bool = False) -> bool:
        """Trains until every adapter is done (True) or the run's micro-step `until` (False: a
        checkpoint is written there). On rank 0, should_halt() is asked after every step: when it
        says so, every rank writes the checkpoint and returns False (the run resumes from there, on
        any number of ranks); on_step(progress) is given each step's counts and seconds. Rank 0
        prints its progress through log (bar: as a progress bar, the output being a terminal).
        A run that ends (True) may still be writing its last checkpoint: finish() waits for it."""
        leader = self.group.is_leader
        self.logs = RunLog(self.run_dir, self.registry, self.forecast(), log, bar) if leader else None
        try:
            done = self._run(until, should_halt, on_step)
        except BaseException:
            with contextlib.suppress(Exception):  # the run's own error is the one to report
                self.wait_for_checkpoint()
            raise
        finally:
            if self.logs is not None:
                self.logs.close()
        if not done:  # a run that stops here has its checkpoint on disk when this returns
            self.wait_for_checkpoint()
        return done

    def _run(self, until: int | None, should_halt, on_step) -> bool:
        leader = self.group.is_leader
        self.apply(self.group.broadcast(self.decide(after_step=False) if leader else None))
        if leader:
            self.logs.start(self.micro_steps)
        first_step = self.micro_steps
        while self.registry.with_status(Status.RUNNING):
            if until is not None and self.micro_steps >= until:
                if self.checkpointed != self.micro_steps:
                    self.save_checkpoint()
                return False
            # the last evaluation's host copies done: a step's memory never depends on how far they got
            self.settle_best()
            running = self.registry.with_status(Status.RUNNING)
            self.samples_budget = max(self.samples_budget, sum(a.micro_batch_size for a in running))
            marks = {a.id: a.marks() for a in self.trainer.running()}
            step_start, params = time.time(), self.running_params()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                with self.timed("train"):
                    self.trainer.step()
                    if self.sharded and not marks:  # nothing of its own: its gathers still meet the others'
                        idle_pass(self.base.model, backward=True)
                oom = None
                self.largest_step = max(self.largest_step, self.trainer.last_positions)
                self.most_colocated = max(self.most_colocated, len(marks))
            except StepOutOfMemory as e:
                if self.sharded:  # the other ranks wait inside the step's gathers: it cannot be skipped alone
                    raise RuntimeError(f"out of memory in a step over the sharded base ({e.positions} token "
                                       f"positions on rank {self.group.rank}); lower max_running or "
                                       f"memory_budget_gb in {self.run_dir / 'sweep.yaml'} and resume from "
                                       "its checkpoint (alto tune --resume)") from None
                oom = self.out_of_memory(e.positions, params)
            step_seconds = time.time() - step_start
            self.micro_steps += 1
            if leader:
                self.log_step(len(marks), params, oom is not None, step_seconds)
            evaluating = self.seconds["evaluate"]
            losses = self.merge(self.group.all_gather(self.report(marks, oom)))
            if leader:
                self.logs.losses(self.micro_steps, losses)
                if oom is None:
                    self.logs.forecast.observe_step(running, step_seconds)
                if self.seconds["evaluate"] > evaluating:
                    self.logs.forecast.observe_evaluation(self.seconds["evaluate"] - evaluating)
            decisions = self.decide(after_step=True) if leader else None
            if leader and should_halt is not None:
                decisions.halt = bool(should_halt())
            decisions = self.group.broadcast(decisions)
            self.apply(decisions)
            if leader:  # after the decisions: how many adapters are left counts this step's stops
                self.logs.evaluations(self.micro_steps)
                self.logs.progress(self.micro_steps, losses)
            if on_step is not None and leader:
                counts = {s: len(self.registry.with_status(s)) for s in Status}
                on_step({"micro_steps": self.micro_steps, "from_micro_step": first_step,
                         "seconds": time.time() - step_start, **{s.value: n for s, n in counts.items()}})
            if decisions.halt or self.micro_steps % self.sweep.checkpoint_every == 0:
                self.save_checkpoint()
            if decisions.halt:
                self.say(f"halted at micro-step {self.micro_steps}: checkpoint written")
                return False
        self.save_checkpoint()
        return True

    def forecast(self) -> Forecast:
        """The run's time-left model: each task's mean training sequence length and evaluation period."""
        return Forecast(self.shape, {t: statistics.fmean(map(len, seqs)) if seqs else 1
                                     for t, seqs in self.train_seqs.items()},
                        {name: t.eval.every if self.eval_seqs[name] else None for name, t in self.tasks.items()})

    def running_params(self) -> int:
        return sum(adapter_params(a.config, self.shape) for a in self.trainer.running())

    def log_step(self, adapters: int, params: int, oom: bool, seconds: float) -> None:
        """A row of steps.csv (rank 0's step): its size, the memory model's prediction and, on a
        GPU, the measured peak (which the model is corrected to, if higher)."""
        t = self.trainer
        predicted = measured = ""
        if self.admission is not None:
            predicted = f"{self.admission.peak.predict(t.last_positions, params) / 1e9:.3f}"
        if self.device.type == "cuda" and not oom:
            peak = torch.cuda.max_memory_allocated(self.device)
            measured = f"{peak / 1e9:.3f}"
            if self.admission is not None:
                self.admission.observe(t.last_positions, params, peak)
        padding = 1 - t.last_tokens / t.last_positions if t.last_positions else 0.0
        self.logs.step([self.micro_steps, adapters, t.last_positions, f"{padding:.4f}", predicted, measured,
                           int(oom), f"{seconds:.4f}"])

    # ---- results ---------------------------------------------------------------------------------
    def final_weights(self, aid: str):
        if aid in self.trainer.retired:
            return self.trainer.retired[aid].weights
        return self.model.adapter_weights(aid)

    def outcomes(self) -> dict[str, results.Outcome]:
        """Rank 0, at the end (every adapter retired): each adapter's last weights evaluated on its
        task's held-out sequences (co-located, as many together as the run co-located; not again
        where its last micro-step was an evaluation point), its best
        kept if better; the weights its task exports, and their greedy completions of the task's
        held-out prompts scored by the task's metric."""
        group = max(1, self.most_colocated or 16)
        adapters = list(self.registry)
        last = {a.id: self.final_weights(a.id) for a in adapters}
        # none for a failed adapter, or a task without held-out data; an adapter whose last weights
        # were evaluated (the monitor stopped it at an evaluation point) keeps that loss
        last_loss = {a.id: a.eval_losses[-1] for a in adapters
                     if a.status != Status.FAILED and a.eval_steps and a.eval_steps[-1] == a.micro_step}
        todo = [a for a in adapters if a.status != Status.FAILED and self.eval_seqs[a.task] and a.id not in last_loss]
        for i in range(0, len(todo), group):
            part = todo[i : i + group]
            with results.loaded(self.model, {a.id: (a.config, last[a.id]) for a in part}):
                for a, loss in zip(part, self.evaluate(part)):
                    last_loss[a.id] = loss
                    self.keep_if_best(a, loss, last[a.id], live=a.id not in self.trainer.retired)
        self.settle_best()
        out = {}
        for a in adapters:
            if self.tasks[a.task].export == "best" and a.id in self.best_weights:
                out[a.id] = results.Outcome(self.best_weights[a.id][1], "best", a.best[0], a.best[1])
            else:
                out[a.id] = results.Outcome(last[a.id], "last", a.step, last_loss.get(a.id, math.nan))
        scored = [a for a in adapters if self.tasks[a.task].eval.metric]
        for i in range(0, len(scored), group):
            part = scored[i : i + group]
            with results.loaded(self.model, {a.id: (a.config, out[a.id].weights) for a in part}):
                for aid, value in self.metric_values(part).items():
                    out[aid].metric = (self.tasks[self.registry[aid].task].eval.metric, value)
        if self.logs is not None:  # rank 0: the end's evaluations, and each metric beside the weights it scored
            rows = []
            for a in adapters:
                o = out[a.id]
                metric = [o.metric[0], f"{o.metric[1]:.6f}"] if o.metric else ["", ""]
                metric_of_last = o.export == "last" and a.id in last_loss
                if a.id in last_loss:
                    rows.append([a.task, a.id, a.step, "last", f"{last_loss[a.id]:.6f}",
                                 *(metric if metric_of_last else ["", ""])])
                if o.metric and not metric_of_last:
                    rows.append([a.task, a.id, o.step, o.export, f"{o.eval_loss:.6f}", *metric])
            self.logs.final_evaluations(self.micro_steps, rows)
        return out

    def metric_values(self, adapters: list[Adapter]) -> dict[str, float]:
        """Each adapter's task metric, averaged over its task's held-out prompts (sequences cut at
        max_length are left out: their reference is cut too), greedy completions decoded co-located."""
        tok = self.base.tokenizer
        pairs = {t: [pr for s in self.held_out(t) if len(s) < self.tasks[t].data["max_length"]
                     and (pr := data_mod.prompt_and_reply(s)) is not None] for t in {a.task for a in adapters}}
        stop = {*getattr(tok, "all_special_ids", ()), *([] if self.base.eos_id is None else [self.base.eos_id])}
        new_tokens = max(self.tasks[a.task].eval.max_new_tokens for a in adapters)
        with results.evaluating(self.model):
            done = greedy_completions(self.model, {a.id: [p for p, _ in pairs[a.task]] for a in adapters}, new_tokens,
                                      stop, self.base.pad_id, self.device, self.eval_positions())
        values = {}
        for a in adapters:
            cfg = self.tasks[a.task].eval
            fn = metric_function(cfg.metric)
            scores = [fn(tok.decode(c[: cfg.max_new_tokens], skip_special_tokens=True),
                         tok.decode(r, skip_special_tokens=True)) for c, (_, r) in zip(done[a.id], pairs[a.task])]
            values[a.id] = sum(scores) / len(scores) if scores else math.nan
        return values

    def finish(self, log=print) -> list[tuple[str, float]]:
        """At the end, on every rank: rank 0's evaluations, exports, leaderboards and losses.png
        (alto.results), the wait for the last checkpoint's write, timing.json. With a sharded base every rank runs the same evaluations on rank 0's weights
        (their passes gather the layers together); only rank 0 writes."""
        self.settle_best()
        if self.sharded and self.group.world > 1:  # everything that shapes the passes, as rank 0 has it
            shared = self.group.broadcast((self.trainer.retired, self.best_weights, self.most_colocated,
                                           self.largest_step) if self.group.is_leader else None)
            self.trainer.retired, self.best_weights, self.most_colocated, self.largest_step = shared
        elif not self.group.is_leader:
            return []
        try:
            with ThreadPoolExecutor(1) as plotter:  # losses.png drawn while the final evaluations run
                plotted = plotter.submit(results.plot_losses, self.registry, self.run_dir / "losses.png") \
                    if self.group.is_leader else None
                with self.timed("evaluate"):
                    outcomes = self.outcomes()
                if not self.group.is_leader:
                    return []
                with self.timed("export"):
                    board = results.finish(self.registry, outcomes, self.base, self.run_dir, log)
                    plotted.result()
        except BaseException:
            with contextlib.suppress(Exception):  # the last checkpoint still whole on disk; this error reported
                self.wait_for_checkpoint()
            raise
        self.wait_for_checkpoint()  # the last one, written while the above ran
        named = sum(v for phase, v in self.seconds.items() if phase != "other")
        self.seconds["other"] = max(0.0, time.time() - self.started - named)
        (self.run_dir / "timing.json").write_text(json.dumps({k: round(v, 3) for k, v in self.seconds.items()}))
        log("seconds: " + " | ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
        return board
