"""Searchers: which configurations a task trains, proposed while the run goes.

Each task of a sweep has a searcher. The run asks it for configurations as its steps begin and
again whenever adapters of its task end (each one ended frees a slot): `propose(free)` returns new
(name, AdapterConfig) pairs, which join the run's queue at once (registered on every rank, each with
its own data stream; admitted by memory like any queued adapter, alto.decisions). Each adapter
that ends (finished, stopped early, failed) is told to its searcher with its result (`tell`).
A searcher's state is plain data (`state` / `load_state`): the run's checkpoint holds it with
every proposed adapter's config, and a resumed run continues both. Rank 0 owns the searchers;
what every rank needs before the steps begin comes from the spec alone (class methods: `bounds`,
the configurations that bound the memory of any it proposes, sizes the memory model's probe and
whether a base must be sharded; `planned`; `foreign`).

The run's side is `Search`: one searcher per task, the adapters told so far, each ended adapter's
result (`result`: its best held-out loss, else its last). It imports neither torch nor the model,
so it is driven alone (tests/test_searchers.py).

To add a searcher: one class here (propose, tell, state, load_state), listed in SEARCHERS.
Optuna is next (issue 31): a study asked for a trial per free slot, told each trial's result.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from alto.registry import Adapter, AdapterConfig, Registry, Status
from alto.tasks import Task

ENDED = (Status.FINISHED, Status.STOPPED_EARLY, Status.FAILED)


class Searcher:
    """The interface (see the module docstring)."""

    name: ClassVar[str]

    @classmethod
    def bounds(cls, task: Task) -> list[AdapterConfig]:
        """Configurations at least as large (rank, micro-batch, target modules) as any it may propose."""
        raise NotImplementedError

    @classmethod
    def planned(cls, task: Task) -> int:
        """How many configurations it proposes in all."""
        raise NotImplementedError

    def propose(self, free: int | None) -> list[tuple[str, AdapterConfig]]:
        """New configurations, named run-wide (<task>/<id> in a multi-task sweep); free: how many of
        the task's adapters just ended (None: the run's steps begin). [] when there is nothing to
        propose now; the run ends when nothing runs or waits and every searcher proposed nothing."""
        raise NotImplementedError

    def tell(self, adapter: Adapter, status: Status, result: float | None) -> None:
        """An adapter it proposed ended: finished, stopped early (by the monitor) or failed; result:
        its held-out loss (lower is better; None without held-out data, or failed before any). The
        adapter holds its config and every held-out loss it had (eval_losses at eval_steps)."""

    def state(self) -> Any:
        """What resuming it needs, as plain data (pickled into the run's checkpoint)."""
        raise NotImplementedError

    @classmethod
    def foreign(cls, task: Task, adapter_ids: Iterable[str]) -> str | None:
        """One of these adapters of `task` (a checkpoint's) that no searcher of it could have
        proposed, if any: the checkpoint is of another sweep (every rank asks, before loading)."""
        return None

    def load_state(self, state: Any) -> None:
        raise NotImplementedError


class Grid(Searcher):
    """The task's grid points and explicit adapters (alto.tasks), all proposed when the run starts:
    they do not depend on any result, and proposing them together lets admission choose their
    order (largest micro-batch first) and co-locate as many as fit."""

    name = "grid"

    def __init__(self, task: Task):
        self.configs = task.adapters
        self.proposed = False

    @classmethod
    def bounds(cls, task: Task) -> list[AdapterConfig]:
        return list(task.adapters.values())

    @classmethod
    def planned(cls, task: Task) -> int:
        return len(task.adapters)

    def propose(self, free: int | None) -> list[tuple[str, AdapterConfig]]:
        if self.proposed:
            return []
        self.proposed = True
        return list(self.configs.items())

    def state(self) -> Any:
        return {"proposed": self.proposed}

    def load_state(self, state: Any) -> None:
        self.proposed = state["proposed"]

    @classmethod
    def foreign(cls, task: Task, adapter_ids: Iterable[str]) -> str | None:
        return next((aid for aid in adapter_ids if aid not in task.adapters), None)


SEARCHERS: dict[str, type[Searcher]] = {s.name: s for s in (Grid,)}


def searcher_of(task: Task) -> type[Searcher]:
    """The searcher a task's spec names (the grid, until the spec names others)."""
    return SEARCHERS["grid"]


def result(a: Adapter) -> float | None:
    """What a searcher is told an adapter reached: its best held-out loss, else the held-out loss of
    its last weights (or its last evaluation); None without either."""
    if a.best is not None:
        return a.best[1]
    if a.last_loss is not None:
        return a.last_loss
    return a.eval_losses[-1] if a.eval_losses else None


class Search:
    """A run's searchers, one per task (rank 0's), whether they were asked yet, and which ended
    adapters they were told of."""

    def __init__(self, tasks: Iterable[Task]):
        self.searchers = {t.name: searcher_of(t)(t) for t in tasks}
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
