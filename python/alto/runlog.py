"""What a run writes and prints as it goes (rank 0 only).

Files of the run folder, appended to as the run goes (every row starts with the run's micro-step, so
a resume cuts them back to its checkpoint: alto.checkpoint.LOGS):
  losses.csv     every adapter's training loss at every micro-step
  decisions.csv  early stops and adapters sent back to the queue by an out-of-memory step, and why
  steps.csv      every step's adapters, token positions, padding, predicted and measured peak memory, seconds
  evals.csv      every held-out evaluation of every adapter as it happens, and at the end its task's
                 metric of the weights it exports

Printed: a line per step (or, on a terminal, a progress bar) with each task's best and median training
loss of the step, how many adapters run / wait / were stopped, and the time left (Forecast); a line per
evaluation point with each evaluated task's best adapter so far; what the run decides (stops,
admissions, moves), above the bar.

At the end, timing.json (alto.timing).
"""
from __future__ import annotations

import csv
import itertools
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from alto.registry import Adapter, Registry, Status
from alto.tracking import Tracker
from alto.sched.catalog import ModelShape
from alto.sched.estimate import JobEstimate, Work, default_model, forecast

LOSS_COLUMNS = ["micro_step", "adapter", "step", "loss"]
DECISION_COLUMNS = ["micro_step", "adapter", "adapter_micro_step", "rule", "reason"]
STEP_COLUMNS = ["micro_step", "adapters", "token_positions", "padding_fraction", "predicted_peak_gb",
                "measured_peak_gb", "out_of_memory", "seconds"]
# weights: current (an evaluation during the run), last or best (the end's: the final weights, and the
# exported best ones where the task's metric scored those)
EVAL_COLUMNS = ["micro_step", "task", "adapter", "adapter_step", "weights", "eval_loss", "metric", "metric_value"]


def append_rows(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Rows at the end of a CSV (its header first, if new or empty), the file closed after: a person
    (or a killed run's resume) reads every row written so far."""
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if f.tell() == 0:
            writer.writerow(header)
        writer.writerows(rows)


def rewrite_rows(path: Path, keep: Callable[[list[str], list[str]], bool]) -> None:
    """Keeps the header and the rows of a CSV that keep(header, row) accepts; the file is replaced
    whole (a kill leaves the old or the new one, never half of one)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(rows[:1] + [r for r in rows[1:] if keep(rows[0], r)])
    os.replace(tmp, path)


def duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Forecast:
    """Time left of a run: its steps predicted by the step-time model the scheduler fits
    (alto.sched.estimate, calibrated on H100 steps) for the adapters that will run together,
    corrected by this run's own measured steps (JobEstimate's ratio: the device, the data), plus its
    evaluation points left at their measured mean."""

    def __init__(self, shape: ModelShape, seq_lens: Mapping[str, float], eval_every: Mapping[str, int | None]):
        self.shape, self.model = shape, default_model()
        self.seq_lens = {t: max(1, round(n)) for t, n in seq_lens.items()}  # task -> its mean sequence length
        self.eval_every = {t: n for t, n in eval_every.items() if n}
        self.estimate: JobEstimate | None = None
        self.eval_points, self.eval_seconds = 0, 0.0
        self.slots = 1  # the most adapters a step ran: how many the queue refills to

    def predict(self, step: Sequence[Work]) -> float:
        return self.model.step_seconds([w.config for w in step], [w.seq_len for w in step], self.shape)

    def work(self, a: Adapter) -> Work:
        left = a.config.max_steps * a.config.grad_accum - a.micro_step
        return Work(a.config, self.seq_lens[a.task], left)

    def observe_step(self, adapters: Sequence[Adapter], seconds: float) -> None:
        if not adapters or seconds <= 0:
            return
        self.slots = max(self.slots, len(adapters))
        predicted = self.predict([self.work(a) for a in adapters])
        if self.estimate is None:
            self.estimate = JobEstimate(predicted)
            self.estimate.ratio = seconds / predicted  # the first step sets the device's scale
        else:
            self.estimate.set_prediction(predicted)
            self.estimate.observe(seconds)

    def observe_evaluation(self, seconds: float) -> None:
        self.eval_points, self.eval_seconds = self.eval_points + 1, self.eval_seconds + seconds

    def left(self, registry: Registry, micro_steps: int) -> tuple[int, float | None]:
        """(micro-steps, seconds) left if no adapter stops early (seconds: None before a step was measured)."""
        running = [self.work(a) for a in registry.with_status(Status.RUNNING)]
        queued = [self.work(a) for a in registry.with_status(Status.QUEUED)]
        ratio = self.estimate.ratio if self.estimate is not None else math.nan
        slots = max(self.slots, len(running))
        steps, seconds = forecast(running, queued, slots, lambda step: ratio * self.predict(step))
        if self.estimate is None:
            return steps, None
        if self.eval_points:
            tasks_left = {a.task for a in registry.with_status(Status.RUNNING, Status.QUEUED)}
            periods = {every for task, every in self.eval_every.items() if task in tasks_left}
            points = multiples(periods, micro_steps, micro_steps + steps)
            seconds += points * self.eval_seconds / self.eval_points
        return steps, seconds


def multiples(periods: Iterable[int], low: int, high: int) -> int:
    """How many of low+1..high are a multiple of some period (the evaluation points there, several
    tasks evaluating in one step counted once): inclusion-exclusion over the periods' least common
    multiples (a sweep's tasks have few distinct periods; beyond 8, each is counted alone: an upper bound)."""
    periods = sorted(set(periods))
    if len(periods) > 8:
        return sum(high // p - low // p for p in periods)
    total = 0
    for k in range(1, len(periods) + 1):
        for group in itertools.combinations(periods, k):
            lcm = math.lcm(*group)
            total += (-1) ** (k + 1) * (high // lcm - low // lcm)
    return total


class RunLog:
    """The run's logs and progress (see the module docstring). bar: a progress bar (tqdm: the
    output is a terminal) instead of a line per step."""

    STATES = (("running", Status.RUNNING), ("queued", Status.QUEUED), ("stopped", Status.STOPPED_EARLY),
              ("finished", Status.FINISHED), ("failed", Status.FAILED))

    def __init__(self, run_dir: Path, registry: Registry, forecast: Forecast, log: Callable[[str], None] = print,
                 bar: bool = False, on_evaluation: Callable[[dict], None] | None = None, trackers: Sequence[Tracker] = ()):
        """on_evaluation: given each row of evals.csv as it is written, a dict by EVAL_COLUMNS;
        trackers: the sweep's report_to (alto.tracking), given the same figures."""
        self.run_dir, self.registry, self.forecast, self.log = run_dir, registry, forecast, log
        self.on_evaluation, self.trackers, self.tracked = on_evaluation, list(trackers), set()
        self.started = time.time()
        # held-out losses already in evals.csv (a resumed run's: those its checkpoint holds)
        self.evals_written = {a.id: len(a.eval_losses) for a in registry}
        self.want_bar, self.bar = bar, None  # the bar starts with the first step (start)

    def say(self, line: str) -> None:
        """A line of its own (above the bar, if any)."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            self.log(line)

    def append(self, name: str, header: Sequence[str], rows: Iterable[Sequence]) -> None:
        append_rows(self.run_dir / name, header, rows)

    def decision(self, micro_step: int, adapter: str, adapter_micro_step: int, rule: str, reason: str | None) -> None:
        self.append("decisions.csv", DECISION_COLUMNS, [[micro_step, adapter, adapter_micro_step, rule, reason]])

    def step(self, micro_step: int, adapters: int, positions: int, tokens: int, predicted: float | None,
             measured: float | None, oom: bool, seconds: float) -> None:
        """A row of steps.csv: peaks in bytes (None: not known), shown in GB."""
        gb = ["" if b is None else f"{b / 1e9:.3f}" for b in (predicted, measured)]
        padding = 1 - tokens / positions if positions else 0.0
        self.append("steps.csv", STEP_COLUMNS, [[micro_step, adapters, positions, f"{padding:.4f}", *gb, int(oom),
                                                f"{seconds:.4f}"]])
        self._track(None, {"step/seconds": seconds, "step/adapters": adapters, "step/token_positions": positions,
                           **({} if measured is None else {"step/peak_memory_gb": measured / 1e9})}, micro_step)

    def losses(self, micro_step: int, losses: Mapping[str, float]) -> None:
        self.append("losses.csv", LOSS_COLUMNS,
                    [[micro_step, aid, self.registry[aid].step, f"{loss:.6f}"] for aid, loss in losses.items()])
        for aid, loss in losses.items() if self.trackers else ():
            a = self.registry[aid]
            if aid not in self.tracked:  # its hyperparameters as it first reports
                self.tracked.add(aid)
                for tracker in self.trackers:
                    tracker.params(aid, {"task": a.task, **a.config.to_dict()})
            lr = a.config.lr_at((a.micro_step - 1) // a.config.grad_accum)  # of the optimizer step it went into
            self._track(aid, {"train/loss": loss, "train/learning_rate": lr}, a.micro_step)

    def evaluations(self, micro_step: int) -> None:
        """The held-out losses the adapters got since the last call: rows of evals.csv, and a line
        naming, for each task evaluated, its best adapter so far and how many of its adapters are left."""
        rows, tasks = [], []
        for a in self.registry:
            written = self.evals_written.get(a.id, 0)  # 0: proposed since the run started
            for loss, at in zip(a.eval_losses[written:], a.eval_steps[written:]):
                rows.append([micro_step, a.task, a.id, at // a.config.grad_accum, "current", f"{loss:.6f}", "", ""])
                self._track(a.id, {"eval/loss": loss}, at)
                tasks += [a.task] if a.task not in tasks else []
            self.evals_written[a.id] = len(a.eval_losses)
        if not rows:
            return
        self._evaluated(rows)
        parts = []
        for task in tasks:
            members = [a for a in self.registry if a.task == task]
            scored = [a for a in members if a.best is not None]
            left = sum(a.status in (Status.RUNNING, Status.QUEUED) for a in members)
            if scored:
                best = min(scored, key=lambda a: a.best[1])
                parts.append(f"{task}: best {best.id} {best.best[1]:.4f} (its step {best.best[0]}), {left} of "
                             f"{len(members)} left")
        self.say(f"eval at step {micro_step} | " + " | ".join(parts))

    def final_evaluations(self, micro_step: int, rows: Iterable[Sequence]) -> None:
        """The end's evaluations (alto.sweep_run.SweepRun.outcomes: task, adapter, its step, weights,
        loss, metric, value): rows of evals.csv, replacing those of an end that was cut short (a
        run killed while it exported, then resumed)."""
        path = self.run_dir / "evals.csv"
        if path.exists():
            rewrite_rows(path, lambda header, row: len(row) == len(header) and row[4] not in ("last", "best"))
        self._evaluated([[micro_step, *row] for row in rows])
        for task, aid, _, weights, loss, *_ in rows:  # the end's: the last weights', and the exported best's
            self._track(aid, {f"eval/{weights}_loss": float(loss)}, self.registry[aid].micro_step)

    def _track(self, adapter: str | None, values: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.scalars(adapter, values, step)

    def _evaluated(self, rows: list[list]) -> None:
        self.append("evals.csv", EVAL_COLUMNS, rows)
        for row in rows if self.on_evaluation is not None else ():
            self.on_evaluation(dict(zip(EVAL_COLUMNS, row)))

    def progress(self, micro_step: int, losses: Mapping[str, float]) -> None:
        """The step's line (or the bar's state)."""
        counts = {s: len(self.registry.with_status(s)) for s in Status}
        by_task: dict[str, list[float]] = {}
        for aid, loss in losses.items():
            if math.isfinite(loss):
                by_task.setdefault(self.registry[aid].task, []).append(loss)
        tasks = " | ".join(f"{t}: best {min(v):.4f} median {statistics.median(v):.4f}" for t, v in by_task.items())
        steps_left, seconds_left = self.forecast.left(self.registry, micro_step)
        when = duration(time.time() - self.started) + ("" if seconds_left is None else f", ~{duration(seconds_left)} left")
        if self.bar is None:
            states = " | ".join(f"{name} {counts[s]}" for name, s in self.STATES)
            self.log(f"step {micro_step:4d} | {states} | {tasks or 'no loss'} | {when}")
            return
        # the bar's line is cut at the terminal's width: what matters most first
        self.bar.total, self.bar.n = micro_step + steps_left, micro_step
        states = ", ".join(f"{counts[s]} {name}" for name, s in self.STATES if counts[s] or s == Status.RUNNING)
        self.bar.set_postfix_str(f"{when} | {tasks} | {states}", refresh=False)
        self.bar.refresh()

    def start(self, micro_step: int) -> None:
        """Before the first step: the bar, as long as planned."""
        if self.want_bar:
            from tqdm import tqdm

            # the terminal's size, or 120 x 24 where it reports none (tqdm would then draw nothing)
            size = shutil.get_terminal_size((120, 24))
            self.bar = tqdm(file=sys.stdout, ncols=size.columns, nrows=size.lines, initial=micro_step,
                            total=micro_step + self.forecast.left(self.registry, micro_step)[0],
                            bar_format="{l_bar}{bar:30}| {n}/{total}{postfix}")

    def close(self) -> None:
        """The bar ended, the trackers' files written (a later report opens them again)."""
        for tracker in self.trackers:
            tracker.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
