"""A run's searchers (alto.searchers): one per task, chosen from its spec (SEARCHERS), asked for
configurations as the steps begin and for each slot an ended adapter frees, told each result, and
their state for the run's checkpoint. Rank 0 holds the one Search of a run (alto.sweep_run)."""
from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from alto.monitor import Decision
from alto.registry import Adapter, Registry, Status
from alto.searchers import ENDED, Grid, Searcher, result
from alto.tasks import Task

# name -> searcher, or "module:class" of one imported when a task first names it (Optuna's import:
# 0.3 s with bytecode, 1.2 s without, for sweeps that search nothing)
SEARCHERS: dict[str, type[Searcher] | str] = {"grid": Grid, "optuna": "alto.optuna_search:OptunaSearch"}


def searcher_of(task: Task) -> type[Searcher]:
    """The searcher a task's spec names: Optuna's with a search section, else the grid."""
    name = "optuna" if task.search is not None else "grid"
    if isinstance(found := SEARCHERS[name], str):
        module, cls = found.split(":")
        found = SEARCHERS[name] = getattr(importlib.import_module(module), cls)
    return found


class Search:
    """A run's searchers, one per task (rank 0's), whether they were asked yet, and which ended
    adapters they were told of."""

    def __init__(self, tasks: Iterable[Task], run_dir: Path):
        self.searchers = {t.name: searcher_of(t)(t, run_dir) for t in tasks}
        self.started = False
        self.told: set[str] = set()

    def propose(self, registry: Registry, stopping: Iterable[str]) -> list[Adapter]:
        """The new adapters, before a step's decisions: the first time, what every searcher
        proposes as the steps begin; after that, each searcher told of its adapters that ended since
        it was last told (those the step finished or failed, and `stopping`: the monitor's stops, not
        yet applied), then asked for as many configurations as that freed."""
        if not self.started:
            self.started = True
            return self._proposals({task: None for task in self.searchers})
        stopping = set(stopping)
        freed: dict[str, int] = {}
        for a in registry:
            if a.id in self.told or not (a.status in ENDED or a.id in stopping):
                continue
            status = Status.STOPPED_EARLY if a.id in stopping else a.status
            self.searchers[a.task].tell(a, status, result(a))
            self.told.add(a.id)
            freed[a.task] = freed.get(a.task, 0) + 1
        return self._proposals(freed)

    def _proposals(self, free: dict[str, int | None]) -> list[Adapter]:
        return [Adapter(aid, cfg, task) for task, n in free.items() for aid, cfg in self.searchers[task].propose(n)]

    def stops(self, registry: Registry, stopping: Iterable[str]) -> list[Decision]:
        """The searchers' own stops after a step, among their running adapters (`stopping`: the
        monitor's, left out)."""
        stopping = set(stopping)
        return [d for task, searcher in self.searchers.items() for d in searcher.stops(
            [a for a in registry.with_status(Status.RUNNING) if a.task == task and a.id not in stopping])]

    def state(self) -> dict[str, Any]:
        """Each task's searcher's state, by task name."""
        return {task: s.state() for task, s in self.searchers.items()}

    def load_state(self, state: dict[str, Any], registry: Registry) -> None:
        """A checkpoint's searchers (state()), with every adapter the registry holds ended as told
        (a checkpoint is taken after a step's results were told)."""
        for task, s in self.searchers.items():
            s.load_state(state[task])
        self.started = True
        self.told = {a.id for a in registry if a.status in ENDED}
