"""SweepRun: one sweep on one rank, step by step: it trains (alto.train), evaluates (alto.evaluation),
decides after every step (the monitor's stops, the searchers' new configurations, capacity
reclaim, migrations between ranks: alto.decisions, alto.searchers) and applies the decisions,
merges the ranks' progress, logs and checkpoints.

Run folder: sweep.yaml (the sweep as given, written by alto.tune), losses.csv, decisions.csv,
steps.csv and evals.csv (written as the run goes, with its progress lines: alto.runlog),
checkpoint.pt (alto.checkpoint: every checkpoint_every micro-steps, where --stop-after stops, and
at the end while the end runs; removed once a completed run's results are written), leaderboard.csv and leaderboards/<task>.csv, losses.png,
timing.json (seconds of this process's wall in each of alto.timing.PHASES), study.db (a search's
Optuna study: alto.optuna_search),
adapters/<name>/ (PEFT format: each adapter's best or last weights; alto.results). Every task has
its own data, held-out sequences and monitor; all tasks' adapters share the steps. The base model
comes from alto.base; admission by memory from alto.admission.

Its parts, each a home of its own: the steps (alto.train), evaluation (alto.evaluation), decisions
(alto.decisions) and their application on each rank (alto.colocation), checkpoints
(alto.checkpoint.RunCheckpoints), the logs and progress (alto.runlog). SweepRun is the loop that
sequences them, the ranks' reports merged after every step, and the end (finish). (Over 300 lines
for a reason: that loop, its set-up and its end are one class of ~300 lines; the parts it
sequences own their state elsewhere.)
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from alto import attention, data as data_mod, results
from alto.checkpoint import RunCheckpoints, adapters_of, read as read_checkpoint
from alto.admission import Admission, fits_whole, probe_config
from alto.base import device_type, load_base
from alto.colocation import Colocation
from alto.decisions import Decisions
from alto.evaluation import Evaluation, Weights
from alto.export import AdapterExports, base_name
from alto.families import check_targets
from alto.loss_plot import LossPlot
from alto.model import MultiLoraModel
from alto.monitor import Decision, Monitor
from alto.objectives import OBJECTIVES
from alto.parallel import Group, idle_pass, shard
from alto.registry import Adapter, Registry, Status
from alto.runlog import Forecast, RunLog
from alto.timing import Timing
from alto.tracking import TRACKERS
from alto.search import Search, searcher_of
from alto.sched.catalog import ModelShape
from alto.sched.memory import activation_bytes_per_token, adapter_params
from alto.sched.placement import adapter_cost
from alto.sweep import Sweep
from alto.train import DataStream, StepOutOfMemory, Trainer


def run_device(asked: str) -> torch.device:
    """The device a rank runs on (sweep.device; on a GPU, its current one, with the allocator set up)."""
    if device_type(asked) != "cuda":
        return torch.device("cpu")
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        # Packed steps change shape every step: fixed-size cached blocks fragment near a full
        # GPU (measured: 64 co-located 1B configs at 73 GB ran no faster than 16); growable
        # segments do not. The env variable's setting, at run time (a user's own wins).
        settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.11
        (settings or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
    return torch.device("cuda", torch.cuda.current_device())


def quiet(*_) -> None:
    """The log of ranks other than 0."""


class SweepRun:
    """One sweep on one rank. With several ranks (rank-local adapter parallelism, alto.parallel)
    every rank loads the same base model and data and keeps the same registry (statuses, losses:
    merged from a gather after every step); each adapter is trained on the one rank that holds it;
    rank 0 takes the decisions (stops, admissions, migrations) and broadcasts them, and writes every
    file of the run folder."""

    def __init__(self, sweep: Sweep, run_dir: Path, group: Group | None = None, started: float | None = None,
                 resume: bool = False):
        """started: when the command began (time.time()), the start of timing.json's wall (default: now);
        resume: continue from the run folder's checkpoint (on any number of ranks: running adapters
        are placed anew), else the searchers propose the run's first adapters."""
        self.sweep, self.run_dir = sweep, run_dir
        self.timing = Timing(time.time() if started is None else started)
        self.group = group or Group()
        saved = read_checkpoint(run_dir, sweep.tasks) if resume else None  # a bad one: one line, before loading
        self.device = run_device(sweep.device)
        # A base that may be sharded waits on the CPU (a GPU may not hold it whole) until that is decided.
        may_shard = sweep.shard_base is True or (sweep.shard_base == "auto" and self.group.world > 1)
        with self.timing.phase("load"):
            self.base = load_base(sweep.model, sweep.base_dtype, self.device, sweep.base_quantize,
                                  torch.device("cpu") if may_shard else None)
        self.shape = ModelShape.from_hf_config(self.base.model.config)
        self.tasks = sweep.tasks
        self.objective = OBJECTIVES[next(iter(self.tasks.values())).objective]()  # every task's (alto.sweep)
        self.train_seqs: dict[str, list[list[int]]] = {}  # task -> its sequences
        self.task_tensors = {}  # ... as tensors, once: every adapter's stream shares them
        eval_seqs: dict[str, list[list[int]]] = {}
        for t in self.tasks.values():
            with self.timing.phase("tokenize"):
                try:
                    self.train_seqs[t.name], eval_seqs[t.name] = data_mod.task_sequences(
                        t.data, self.base.tokenizer, self.base.eos_id, pairs=t.objective == "dpo")
                except ValueError as e:
                    raise ValueError(f"{t.where}{e}") from None
                self.task_tensors[t.name] = DataStream(self.train_seqs[t.name], self.objective.per_sample).sequences
        self.model = MultiLoraModel(self.base.model)
        if sweep.packing:
            attention.check_packable(self.base.model.config)
        self.registry, self.streams = Registry(), {}  # both grow as the searchers propose (register)
        self.search = Search(self.tasks.values(), run_dir) if self.group.is_leader else None  # rank 0 asks and tells
        # what the searchers may propose, from the spec: the largest sizes a step and the memory model's probe
        self.bounds = {t.name: searcher_of(t).bounds(t) for t in self.tasks.values()}
        check_targets(self.model.family, {k: v for b in self.bounds.values() for k, v in b.items()})  # one line, now
        if saved:
            self.register(adapters_of(saved))
        # auto: sharded if any rank's device cannot hold the base (every rank must decide alike)
        self.sharded = may_shard and (sweep.shard_base is True or any(self.group.all_gather(not fits_whole(
            self.base.model, self.device, self.planned_activation_bytes()))))
        if self.sharded:
            with self.timing.phase("load"):
                shard(self.base.model, {p for layer in self.model.layers.values() for p in layer.packs()}, self.device)
        elif may_shard:  # kept on the CPU for nothing: it fits whole
            self.model.to(self.device)
        self.trainer = Trainer(self.model, self.registry, self.streams, self.base.pad_id, self.device, sweep.packing,
                               self.objective)
        # used on rank 0 only: each task's adapters compete among themselves
        self.monitors = {t.name: Monitor(t.monitor) for t in self.tasks.values() if t.monitor}
        self.evaluation = Evaluation(self.tasks, eval_seqs, self.model, self.base, self.device, self.lockstep,
                                     sweep.packing, self.objective)
        admission = None  # max_running: auto admits by memory (every rank fits one; rank 0 decides)
        if sweep.max_running is None:
            with self.timing.phase("calibrate"):
                admission = Admission.calibrate(
                    self.model, self.shape, {t: [len(s) for s in seqs] for t, seqs in self.train_seqs.items()},
                    sweep.packing, probe_config(c for configs in self.bounds.values() for c in configs.values()),
                    self.base.pad_id, self.device,
                    sweep.memory_budget_gb, sweep.max_tokens_per_step, self.objective,
                    # a sharded base's probe steps gather its layers on every rank: all probe, or none would
                    None if self.sharded else self.planned_everything())
        self.colocation = Colocation(self.group, self.registry, self.trainer, self.device, self.costs, admission,
                                     sweep.max_running)
        self.checkpoints = RunCheckpoints(run_dir, self.group, self.registry, self.trainer, self.evaluation,
                                          self.monitors, self.colocation, self.search)
        self.micro_steps = self.checkpoints.restore(saved) if saved else 0
        self.exports = AdapterExports(run_dir / "adapters", base_name(self.base, run_dir / "base"),
                                      self.base.tokenizer) if self.group.is_leader else None
        self.logs: RunLog | None = None  # rank 0's, while it runs
        self.loss_plot: LossPlot | None = None  # rank 0's, from run() to finish()

    def register(self, adapters: list[Adapter]) -> None:
        """Adapters the searchers proposed (or a checkpoint holds) join the run on this rank: queued
        in the registry, each with its data stream (its config's seed orders its task's samples)."""
        for a in adapters:
            self.registry.add(a.id, a.config, a.task)
            self.streams[a.id] = DataStream.shuffled(self.task_tensors[a.task], a.config.seed, self.objective.per_sample)

    def planned_activation_bytes(self) -> int:
        """A step's activations with the adapter whose micro-batch holds the most, of those the
        searchers may propose (the least a device must hold besides the base)."""
        act = next(self.base.model.parameters()).dtype.itemsize
        return max(activation_bytes_per_token(cfg, self.shape, act) * cfg.micro_batch_size
                   * statistics.fmean(len(s) for s in self.train_seqs[task])
                   for task, configs in self.bounds.items() for cfg in configs.values())

    def planned_everything(self) -> tuple[int, int]:
        """(token positions, LoRA parameters) of one step of every adapter the searchers plan, each at its
        own sizes where they are known (a grid's) or at the largest its task's may propose, every sequence
        as long as the longest max_length of any task: more than any step holds (reclaim: grow gives
        survivors the samples of stopped adapters, no more, and may give a short task's to a long one).
        (bench_sweep's grid of 32 at SmolLM2's widths: 15k positions and 0.5G parameters, not 33k and 1.3G:
        ample on an 80 GB GPU by the estimate, so no probe step, 1.8 s of its 14 s on an H100.)"""
        samples = params = longest = 0
        for t in self.tasks.values():
            searcher = searcher_of(t)
            sizes = [(c.micro_batch_size, adapter_params(c, self.shape)) for c in self.bounds[t.name].values()]
            if not searcher.proposes_bounds:  # planned() configurations, each at most the largest bound
                sizes = [tuple(map(max, zip(*sizes)))] * searcher.planned(t)
            samples += sum(m for m, _ in sizes)
            params += sum(n for _, n in sizes)
            longest = max(longest, t.data["max_length"])
        return samples * self.objective.per_sample * longest, params

    def lockstep(self, passes: int) -> int:
        """How many forward passes every rank runs, this one needing `passes`: with a sharded base,
        the most any rank needs (the rest run idle passes); else its own."""
        return max(self.group.all_gather(passes)) if self.sharded else passes

    # ---- checkpoints (alto.checkpoint.RunCheckpoints) -----------------------------------------------
    def save_checkpoint(self, final: bool = False) -> None:
        with self.timing.phase("checkpoint"):
            self.checkpoints.save(self.micro_steps, final)

    def wait_for_checkpoint(self) -> None:
        with self.timing.phase("checkpoint"):
            self.checkpoints.wait()

    # ---- decisions (rank 0) and their application (every rank) -----------------------------------
    def costs(self, adapters: list[Adapter]) -> dict[str, float]:
        return {a.id: adapter_cost(a, self.tasks[a.task].data["max_length"], self.shape) for a in adapters}

    def decide(self, after_step: bool) -> Decisions:
        """Rank 0's decisions (alto.decisions.decide): the searchers' proposals (the first ones as
        the steps begin; then for the slots that ended adapters free: alto.search.Search), and
        after a step the monitor's stops and the searchers' own (a search's pruner)."""
        stops = self.monitor_stops() if after_step else []
        if after_step:  # a search's pruner, beside the monitor
            stops += self.search.stops(self.registry, [d.adapter for d in stops])
        proposals = self.search.propose(self.registry, [d.adapter for d in stops])
        return self.colocation.decide(stops, self.sweep.reclaim, proposals)

    def say(self, line: str) -> None:
        if self.logs is not None:
            self.logs.say(line)

    def apply(self, decisions: Decisions) -> None:
        """The decisions on every rank (the proposals queued first; the rest: alto.colocation), the
        stops logged on rank 0."""
        self.register(decisions.proposals)
        for a in decisions.proposals:
            self.say(f"  queue {a.id}: proposed by task {a.task}'s searcher")
        for d in decisions.stops:
            if self.logs is not None:
                self.logs.decision(self.micro_steps, d.adapter, d.micro_step, d.rule, d.reason)
            self.say(f"  stop {d.adapter}: {d.reason}")
        stopped = [self.registry[d.adapter] for d in decisions.stops]
        self.colocation.apply(decisions, self.say, self.evaluation.copies_now(stopped))

    def monitor_stops(self) -> list[Decision]:
        """Each task's monitor's stops after this step, among the task's running adapters (with
        signal eval: only at the task's evaluation points)."""
        stops = []
        for name, mon in self.monitors.items():
            running = [a for a in self.registry.with_status(Status.RUNNING) if a.task == name]
            if running and (mon.config.signal != "eval" or self.evaluation.due(name, self.micro_steps)):
                stops += mon.decide(running)
        return stops

    # ---- the step's reports ----------------------------------------------------------------------
    def report(self, marks: dict[str, tuple[int, int]], oom: tuple[int, int, int] | None) -> tuple[dict[str, tuple], tuple | None]:
        """The progress this rank's adapters made in the step, (since, progress(since)) each (marks:
        taken before it), with their held-out losses at evaluation points and the last held-out loss
        of those the step finished (evaluated in the model, with the others, before they retire:
        none is put back for it at the end); and, if the step ran out of memory, what
        out_of_memory returned."""
        t = self.trainer
        ending = {a.id for a, _, _ in t.ending}
        ev = self.evaluation
        finished = {a.id for a, status, _ in t.ending if status == Status.FINISHED and ev.eval_seqs[a.task]}
        mine = {a.id for a in t.running()} - ending if oom is None else set()
        # in the registry's order, not the trainer's (a resumed run admits in another): the order sets
        # how the held-out sequences fall into passes, and so the float sums
        due = [a for a in self.registry if a.id in finished or (a.id in mine and ev.due(a.task, self.micro_steps))]
        meet = bool(due)
        if self.sharded:  # every rank's passes gather the layers together: all run them, or none
            meet = any(self.group.all_gather(meet))
        copies = {}
        if t.ending:  # copied out first: exports settled already are written while the held-out passes run
            with self.timing.phase("train"):
                copies = t.copy_out(t.ending)
            self.start_exports((a, status, copies[a.id].weights) for a, status, _ in t.ending)
        losses = []
        if meet:
            with self.timing.phase("evaluate"):
                losses = ev.losses(due)
        if t.ending:
            with self.timing.phase("train"):
                t.retire(t.ending, copies)
        ev.record(due, losses, finished, t.retired)
        return {aid: (since, self.registry[aid].progress(since)) for aid, since in marks.items()}, oom

    def start_exports(self, ended: Iterable[tuple[Adapter, Status, Weights]]) -> None:
        """Rank 0 writes, in the background, the weights of ended adapters (adapter, its status, its
        last weights) whose export is settled (Evaluation.settled_export): most of the end's export
        is done while the run goes on (alto.export.AdapterExports)."""
        if self.exports is None:
            return
        for a, status, last in ended:
            if not self.exports.started(a.id) and (settled := self.evaluation.settled_export(a, status, last)):
                self.exports.start(a, *settled)

    # ---- the loop --------------------------------------------------------------------------------
    def run(self, until: int | None = None, log=print, should_halt=None, on_step=None, bar: bool = False,
            on_evaluation=None) -> bool:
        """Trains until every adapter is done (True) or the run's micro-step `until` (False: a
        checkpoint is written there). On rank 0, should_halt() is asked after every step: when it
        says so, every rank writes the checkpoint and returns False (the run resumes from there, on
        any number of ranks); on_step(progress) is given each step's counts and seconds,
        on_evaluation(row) each held-out loss as evals.csv gets it (the end's too). Rank 0
        prints its progress through log (bar: as a progress bar, the output being a terminal).
        A run that ends (True) may still be writing its last periodic checkpoint: finish() waits for it."""
        leader, done = self.group.is_leader, False
        if leader and self.loss_plot is None:  # its matplotlib imported while the run trains
            with contextlib.suppress(OSError):  # (cannot start: finish() tries again and says why)
                self.loss_plot = LossPlot()
        trackers = [TRACKERS[name](self.run_dir, self.sweep.name) for name in self.sweep.report_to] if leader else []
        self.logs = RunLog(self.run_dir, self.registry, self.forecast(), log, bar, on_evaluation, trackers) \
            if leader else None
        try:
            done = self._run(until, should_halt, on_step)
        except BaseException:
            with contextlib.suppress(Exception):  # the run's own error is the one to report
                self.wait_for_checkpoint()
            raise
        finally:
            if self.logs is not None:
                self.logs.close()
            if not done:  # its end, when resumed, writes them again
                if self.exports is not None:
                    self.exports.close()
                if self.loss_plot is not None:
                    self.loss_plot.close()
                    self.loss_plot = None
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
                if self.checkpoints.checkpointed != self.micro_steps:
                    self.save_checkpoint()
                return False
            # the last evaluation's host copies done: a step's memory never depends on how far they got
            self.evaluation.settle_best()
            running = self.registry.with_status(Status.RUNNING)
            self.colocation.samples_budget = max(self.colocation.samples_budget, sum(a.micro_batch_size for a in running))
            marks = {a.id: a.marks() for a in self.trainer.running()}
            step_start, params = time.time(), self.running_params()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                with self.timing.phase("train"):
                    self.trainer.step(retire=False)  # report() retires the adapters it ends
                    if self.sharded and not marks:  # nothing of its own: its gathers still meet the others'
                        idle_pass(self.base.model, backward=True)
                oom = None
                self.evaluation.observe_step(self.trainer.last_positions, len(marks))
            except StepOutOfMemory as e:
                if self.sharded:  # the other ranks wait inside the step's gathers: it cannot be skipped alone
                    raise RuntimeError(f"out of memory in a step over the sharded base ({e.positions} token "
                                       f"positions on rank {self.group.rank}); lower max_running or "
                                       f"memory_budget_gb in {self.run_dir / 'sweep.yaml'} and resume from "
                                       "its checkpoint (alto tune --resume)") from None
                oom = self.colocation.out_of_memory(e.positions, params)
            step_seconds = time.time() - step_start
            self.micro_steps += 1
            if leader:
                self.log_step(len(marks), params, oom is not None, step_seconds)
            evaluating = self.timing.seconds["evaluate"]
            losses, split = self.colocation.merge(self.group.all_gather(self.report(marks, oom)))
            if leader:
                for a in split:
                    self.logs.decision(self.micro_steps, a.id, a.micro_step, "out-of-memory", a.failure)
                self.logs.losses(self.micro_steps, losses)
                if oom is None:
                    self.logs.forecast.observe_step(running, step_seconds)
                if self.timing.seconds["evaluate"] > evaluating:
                    self.logs.forecast.observe_evaluation(self.timing.seconds["evaluate"] - evaluating)
            decisions = self.decide(after_step=True) if leader else None
            if leader and should_halt is not None:
                decisions.halt = bool(should_halt())
            decisions = self.group.broadcast(decisions)
            self.apply(decisions)
            self.start_exports((a, a.status, self.trainer.retired[a.id].weights)
                               for a in self.registry if a.id in self.trainer.retired)
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
        self.save_checkpoint(final=True)
        # every rank past the last gathers before any ends (a gloo rank tearing its group down while
        # rank 0 still gathered aborted once in CI: "terminate called without an active exception")
        self.group.barrier()
        return True

    def forecast(self) -> Forecast:
        """The run's time-left model: each task's mean training sequence length and evaluation period."""
        return Forecast(self.shape, {t: statistics.fmean(map(len, seqs)) if seqs else 1
                                     for t, seqs in self.train_seqs.items()},
                        {name: t.eval.every if self.evaluation.eval_seqs[name] else None for name, t in self.tasks.items()})

    def running_params(self) -> int:
        return sum(adapter_params(a.config, self.shape) for a in self.trainer.running())

    def log_step(self, adapters: int, params: int, oom: bool, seconds: float) -> None:
        """A row of steps.csv (rank 0's step), with the memory model's prediction and, on a GPU,
        the measured peak (alto.colocation.Colocation.peaks)."""
        t = self.trainer
        predicted, measured = self.colocation.peaks(t.last_positions, params, measured=not oom)
        self.logs.step(self.micro_steps, adapters, t.last_positions, t.last_tokens, predicted, measured, oom, seconds)

    # ---- results ---------------------------------------------------------------------------------
    def final_weights(self, aid: str):
        if aid in self.trainer.retired:
            return self.trainer.retired[aid].weights
        return self.model.adapter_weights(aid)

    def finish(self, log=print) -> list[tuple[str, float]]:
        """At the end, on every rank: rank 0's evaluations (alto.evaluation), exports, leaderboards
        and losses.png (alto.results), the final checkpoint discarded once they are written
        (RunCheckpoints.discard), timing.json.
        With a sharded base every rank runs the same evaluations on rank 0's weights (their passes
        gather the layers together); only rank 0 writes."""
        ev = self.evaluation
        ev.settle_best()
        if self.sharded and self.group.world > 1:  # everything that shapes the passes, as rank 0 has it
            shared = self.group.broadcast((self.trainer.retired, ev.best_weights, ev.most_colocated,
                                           ev.largest_step) if self.group.is_leader else None)
            self.trainer.retired, ev.best_weights, ev.most_colocated, ev.largest_step = shared
        elif not self.group.is_leader:
            return []
        plot = (self.loss_plot or LossPlot()) if self.group.is_leader else None
        try:
            with ThreadPoolExecutor(1) as plotter:  # losses.png drawn while the final evaluations run
                plotted = plotter.submit(plot.draw, self.registry, self.run_dir / "losses.png") if plot else None
                with self.timing.phase("evaluate"):
                    outcomes, rows = ev.outcomes(self.registry, {a.id: self.final_weights(a.id) for a in self.registry},
                                                 self.trainer.retired)
                if self.sharded:  # the passes' last gathers done on every rank before one ends
                    self.group.barrier()
                if not self.group.is_leader:
                    return []
                if self.logs is not None:  # the end's evaluations, as rank 0 logs them
                    self.logs.final_evaluations(self.micro_steps, rows)
                with self.timing.phase("export"):
                    board = results.finish(self.registry, outcomes, self.base, self.run_dir, self.exports, log,
                                           next_token_loss=self.objective.next_token_loss)
                    plotted.result()
        except BaseException:
            with contextlib.suppress(Exception):  # this error reported; the checkpoint to redo the end from (--resume)
                self.wait_for_checkpoint()
            raise
        finally:
            if self.exports is not None:
                self.exports.close()
            if plot is not None:
                plot.close()
            self.loss_plot = None
        with self.timing.phase("checkpoint"):
            self.checkpoints.discard()
        if self.logs is not None:
            self.logs.close()  # the trackers' files, with the end's evaluations
        ev.host_copies.close()
        if self.trainer.graphs is not None and self.trainer.graphs.counts:
            counts = self.trainer.graphs.counts
            log(f"micro-steps as CUDA graphs: {counts['replayed']} replayed, {counts['captured']} captured, "
                f"{counts['eager']} eager (alto.step_graphs; of the steps a graph may take, a retry counted again)")
        self.timing.write(self.run_dir, log)
        return board
