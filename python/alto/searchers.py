"""The searcher seam: which configurations a task trains, proposed while the run goes.

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

Here: the interface, what a searcher is told an adapter reached (`result`), and the first
implementation, `Grid` (a task's grid points and explicit adapters). The run's side, one searcher
per task chosen from the spec (SEARCHERS), is alto.search.Search; Optuna's samplers are
alto.optuna_search.OptunaSearch. Neither imports torch or the model: tests/test_searchers.py
drives them alone.

To add a searcher: one class in a file of its own (propose, tell, state, load_state and the class
methods), its name listed in alto.search.SEARCHERS and chosen by alto.search.searcher_of.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from alto.monitor import Decision
from alto.registry import Adapter, AdapterConfig, Status
from alto.tasks import Task

ENDED = (Status.FINISHED, Status.STOPPED_EARLY, Status.FAILED)


class Searcher:
    """The interface (see the module docstring). Built on rank 0 with its task and the run folder
    (where it may keep files of its own, e.g. Optuna's study)."""

    name: ClassVar[str]
    # bounds() are the very configurations it proposes, one each (the grid's): a run then plans the memory of
    # their own sizes (alto.sweep_run.SweepRun.planned_everything), not planned() copies of the largest
    proposes_bounds: ClassVar[bool] = False

    def __init__(self, task: Task, run_dir: Path):
        raise NotImplementedError

    @classmethod
    def bounds(cls, task: Task) -> dict[str, AdapterConfig]:
        """Configurations at least as large (rank, micro-batch, target modules) as any it may propose,
        each named by where the sweep file gives it (an error about one names it)."""
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

    def stops(self, running: list[Adapter]) -> list[Decision]:
        """After a step, adapters of its task to stop early (a pruner of its own, beside the task's
        monitor): running are those it proposed that run."""
        return []

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
    proposes_bounds = True

    def __init__(self, task: Task, run_dir: Path):
        self.configs = task.adapters
        self.proposed = False

    @classmethod
    def bounds(cls, task: Task) -> dict[str, AdapterConfig]:
        return dict(task.adapters)

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


def result(a: Adapter) -> float | None:
    """What a searcher is told an adapter reached: its best held-out loss, else the held-out loss of
    its last weights (or its last evaluation); None without either."""
    if a.best is not None:
        return a.best[1]
    if a.last_loss is not None:
        return a.last_loss
    return a.eval_losses[-1] if a.eval_losses else None
