"""A run's checkpoint: what it holds, gathered on rank 0 and restored on any number of ranks
(RunCheckpoints), checkpoint.pt written atomically (a kill never leaves half a file), in the
background (Writer), read back with errors that name it, and the run's logs cut back to it on resume."""
from __future__ import annotations

import copy
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alto.inputs import first_line
from alto.registry import Adapter, AdapterConfig, Registry, Status
from alto.runlog import rewrite_rows
from alto.search import searcher_of
from alto.tasks import Task

if TYPE_CHECKING:
    from alto.colocation import Colocation
    from alto.evaluation import Evaluation
    from alto.monitor import Monitor
    from alto.parallel import Group
    from alto.search import Search
    from alto.train import Trainer

CHECKPOINT = "checkpoint.pt"
LOGS = ("losses.csv", "decisions.csv", "steps.csv", "evals.csv")  # rows start with the run's micro-step (alto.runlog)
# Bumped when what a checkpoint holds, or what resuming it rebuilds, changes (2: adapter progress
# records, named tensors; 3: queued adapters may hold a state, bf16 bases on GPUs, random bases drawn
# on their device; 4: records rendered by chat template, completion-only loss by default, so a
# run's sequences and held-out losses differ; 5: tasks (a monitor each), best held-out weights;
# 6: each evaluation's micro-step, monitor rungs named by rule; 7: each adapter's config and task,
# the searchers' state: a run's adapters are proposed while it goes).
FORMAT = 7


class Stopped(Exception):
    """A stoppable write was stopped (Writer.stop): the checkpoint was no longer wanted."""


class _Stoppable:
    """A file whose writes raise Stopped once `stop` is set."""

    def __init__(self, f, stop: threading.Event):
        self.f, self.stop = f, stop

    def write(self, data) -> int:
        if self.stop.is_set():
            raise Stopped
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write(run_dir: Path, state: dict[str, Any], stop: threading.Event | None = None) -> None:
    """checkpoint.pt replaced whole (through a .tmp and a rename); stop: set, the write ends
    mid-way (Stopped raised, the .tmp removed, the last whole checkpoint left as it was)."""
    tmp = run_dir / f"{CHECKPOINT}.tmp"
    try:
        if stop is None:
            torch.save({**state, "format": FORMAT}, tmp)
        else:
            with open(tmp, "wb") as f:
                torch.save({**state, "format": FORMAT}, _Stoppable(f, stop))
    except BaseException:
        if stop is not None and stop.is_set():  # torch reports the file's error as its own
            tmp.unlink(missing_ok=True)
            raise Stopped from None
        raise
    os.replace(tmp, run_dir / CHECKPOINT)


def remove(run_dir: Path) -> None:
    """A completed run's checkpoints gone: its results are its record (resuming it would redo steps)."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.tmp"):
        (run_dir / name).unlink(missing_ok=True)


class Writer:
    """Writes a run's checkpoints in a background thread, so that the steps (or the final evaluation
    and exports) go on while one is written: a 32-adapter checkpoint on 1B widths is ~4.5 GB. The
    state handed over must be a host copy nothing changes later. One write at a time (the next waits
    for the last); a kill during one leaves the last whole checkpoint (write()'s rename). The thread
    is not a daemon: a process that ends normally finishes its write. wait() returns once nothing is
    pending, raising what a write raised."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()

    def write(self, state: dict[str, Any], stoppable: bool = False) -> None:
        """stoppable: stop() may end it mid-way."""
        self.wait()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, args=(state, self._stop if stoppable else None),
                                        name="alto-checkpoint")
        self._thread.start()

    def _write(self, state: dict[str, Any], stop: threading.Event | None) -> None:
        try:
            write(self.run_dir, state, stop)
        except Stopped:
            pass
        except BaseException as e:  # raised in the run's thread by wait()
            self._error = e

    def stop(self) -> None:
        """Ends a stoppable write under way (a finished one stays written) and waits for it."""
        self._stop.set()
        self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def read(run_dir: Path, tasks: Mapping[str, Task]) -> dict[str, Any]:
    """The state write() saved; ValueError naming the file if it is damaged, of another program or
    format, or holds an adapter that no searcher of `tasks` (the run's sweep) could have proposed."""
    path = run_dir / CHECKPOINT
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        written = state.get("format", 1)
        by_task: dict[str, list[str]] = {}  # the checkpoint's adapters of each task
        searched = set(tasks)  # the tasks its searchers' state is of
        if written == FORMAT:
            for aid, entry in state["adapters"].items():
                by_task.setdefault(entry["task"], []).append(aid)
            searched = set(state["search"])
    except Exception as e:  # truncated, not a torch file, another structure
        raise ValueError(f"{path}: not a checkpoint of alto tune ({type(e).__name__}: {first_line(e)})") from None
    if written != FORMAT:
        raise ValueError(f"{path} has checkpoint format {written}, this alto tune reads {FORMAT}: resume it "
                         "with the release that wrote it")
    for task, ids in by_task.items():
        stranger = ids[0] if task not in tasks else searcher_of(tasks[task]).foreign(tasks[task], ids)
        if stranger is not None:
            raise ValueError(f"{path} holds adapter {stranger!r}, which the run's sweep.yaml does not define")
    if searched != set(tasks):
        raise ValueError(f"{path} is of a sweep with tasks {sorted(searched)}, not {sorted(tasks)} (the run's sweep.yaml)")
    return state


def adapters_of(state: dict[str, Any]) -> list[Adapter]:
    """A checkpoint's adapters, in the run's order, as their searchers proposed them (progress
    not yet applied: RunCheckpoints.restore)."""
    return [Adapter(aid, AdapterConfig(**e["config"]), e["task"]) for aid, e in state["adapters"].items()]


def truncate_logs(run_dir: Path, micro_steps: int) -> None:
    """A killed run may have logged micro-steps after its last checkpoint (the last line perhaps cut
    short): they are redone, so their rows go. The kept rows replace each file atomically."""
    for name in LOGS:
        path = run_dir / name
        if path.exists():
            rewrite_rows(path, lambda header, r: len(r) == len(header) and r[0].isdigit() and int(r[0]) <= micro_steps)


class RunCheckpoints:
    """What a run's checkpoint holds: every adapter's config, task, progress and state (running
    ones copied from the model, ended ones from the trainer's host copies), the searchers' state,
    the monitors' records, the evaluations' best weights and step shapes, the samples reclaim
    refills to; gathered on rank 0 from every rank (collective), written in the background,
    restored on any number of ranks."""

    def __init__(self, run_dir: Path, group: Group, registry: Registry, trainer: Trainer, evaluation: Evaluation,
                 monitors: Mapping[str, Monitor], colocation: Colocation, search: Search | None):
        self.run_dir, self.group, self.registry, self.trainer = run_dir, group, registry, trainer
        self.evaluation, self.monitors, self.colocation = evaluation, monitors, colocation
        self.search = search  # rank 0's searchers (None on the other ranks)
        self.writer = Writer(run_dir)  # rank 0's
        self.checkpointed: int | None = None  # the micro-step of the last checkpoint this process wrote

    def save(self, micro_steps: int, final: bool = False) -> None:
        """Starts writing the checkpoint (collective: every rank sends its adapters to rank 0, whose
        writer thread writes it while the run goes on: wait). final, at the end of a completed run:
        written while the end runs, so that a kill or an error there leaves the end to redo
        (--resume), and stopped by discard() if the end's results are written first (a 32-adapter
        checkpoint on 1B widths is ~4.5 GB: the wall waited 3.3 s for it on the H200)."""
        state = self._gathered(micro_steps)
        if state is not None:
            self.writer.write(state, stoppable=final)
        self.checkpointed = micro_steps

    def wait(self) -> None:
        """Returns once the checkpoint being written (if any) is on disk."""
        self.writer.wait()

    def discard(self) -> None:
        """A completed run's results are written: its checkpoints are not needed (a final one still
        being written is stopped), and removed."""
        self.writer.stop()
        remove(self.run_dir)

    def collect(self) -> None:
        """Moves the states of adapters retired on other ranks, and the best weights they copied,
        to rank 0 (collective; of two copies of an adapter's best, the later step's is the best)."""
        t, kept = self.trainer, self.evaluation.best_weights
        self.evaluation.settle_best()
        got = self.group.gather(({}, {}) if self.group.is_leader else (t.retired, kept))
        if self.group.is_leader:
            for retired, best in got[1:]:
                t.retired.update(retired)
                for aid, (step, weights) in best.items():
                    if aid not in kept or step >= kept[aid][0]:
                        kept[aid] = (step, weights)
        else:
            t.retired.clear()
            kept.clear()
        self.colocation.gathered()

    def _gathered(self, micro_steps: int) -> dict | None:
        t, ev = self.trainer, self.evaluation
        self.collect()
        running = self.group.gather(t.export_states([a.id for a in t.running()], "cpu"))  # host copies
        shapes = self.group.gather((ev.largest_step, ev.most_colocated))
        if not self.group.is_leader:
            return None
        # Nothing handed to the writer may change after: the states and best weights are copies
        # never written to (only replaced), the dicts holding them and the monitors' records are copied.
        states = {**t.retired, **{k: v for part in running for k, v in part.items()}}
        adapters = {a.id: {**a.progress(), "task": a.task, "config": a.config.to_dict(), "state": states.get(a.id)}
                    for a in self.registry}
        return {"micro_steps": micro_steps, "adapters": adapters, "samples_budget": self.colocation.samples_budget,
                "search": copy.deepcopy(self.search.state()),
                "step_shapes": shapes, "monitors": copy.deepcopy({name: (m.rungs, m.log) for name, m in self.monitors.items()}),
                "best": dict(ev.best_weights)}

    def restore(self, state: dict[str, Any]) -> int:
        """Continues from the checkpoint read() returned, whose adapters the registry holds
        (adapters_of), on any number of ranks (running adapters are placed anew); returns its micro-step."""
        self.colocation.samples_budget = state["samples_budget"]
        # Each rank's largest step and most co-located adapters shape its evaluations' passes (and so
        # their float sums): resumed on as many ranks, each evaluates as the uninterrupted run did; on
        # another count, as the busiest did (a checkpoint of an earlier release has none: 0, as before).
        shapes = state.get("step_shapes") or [(0, 0)]
        mine = shapes[self.group.rank] if len(shapes) == self.group.world else tuple(map(max, zip(*shapes)))
        self.evaluation.largest_step, self.evaluation.most_colocated = mine
        for name, m in self.monitors.items():
            m.rungs, m.log = state["monitors"][name]
        if self.group.is_leader:
            self.evaluation.best_weights = state["best"]
        running, held = [], []
        for aid, entry in state["adapters"].items():
            a = self.registry[aid]
            a.apply_progress(entry)
            if a.status == Status.RUNNING:
                running.append(a)
            elif entry["state"] is not None:
                if a.status == Status.QUEUED:  # sent back after an out-of-memory step: rank 0 holds it
                    held.append(aid)
                if self.group.is_leader:
                    self.trainer.retired[aid] = entry["state"]
        if self.search is not None:
            self.search.load_state(state["search"], self.registry)
        self.colocation.resume(running, held, {a.id: state["adapters"][a.id]["state"] for a in running})
        if self.group.is_leader:
            truncate_logs(self.run_dir, state["micro_steps"])
        return state["micro_steps"]
