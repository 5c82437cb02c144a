"""Optuna's samplers as a searcher (alto.searchers): a task's `search:` section (alto.search_spec)
becomes an Optuna study, asked for a trial for each configuration the run can start and told each
adapter's end: its best held-out loss (finished), pruned with its held-out losses as intermediate
values (stopped early by the monitor), or failed. With search.pruner, Optuna's pruner (median,
successive halving, hyperband) judges each trial at every evaluation point on those values, and the
trials it prunes stop beside the monitor's (decisions.csv: rule optuna-<pruner>).

Optuna (not a hand-written sampler): its TPE, CMA-ES, random and grid samplers are maintained and
its storage is what its visualization and optuna-dashboard read. The study lives in the run folder,
study.db (Optuna's RDB storage on SQLite; one study per task, named by the task):
`optuna-dashboard sqlite:///runs/<name>/study.db`. A checkpoint holds a snapshot of that file and
the pickled sampler (its random state: a seeded search resumes to the trials an uninterrupted run
asks); a resumed run puts both back, so trials asked or told after the checkpoint are forgotten
with the steps that are redone.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from alto.monitor import Decision
from alto.registry import Adapter, AdapterConfig, Status
from alto.search_spec import Dimension
from alto.searchers import Searcher
from alto.tasks import Task

STUDY_FILE = "study.db"
PRUNERS = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
           "halving": optuna.pruners.SuccessiveHalvingPruner, "hyperband": optuna.pruners.HyperbandPruner}


class AskedGrid(optuna.samplers.GridSampler):
    """Optuna's grid sampler as a run asks it: the run asks for as many trials as the grid has
    points, so the study is not stopped when it is done (Study.stop raises outside optimize())."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def _encoded(choice: Any) -> Any:
    """A choice as Optuna's categorical distributions hold it (None, bool, int, float or str):
    a list of target modules as one comma-joined string."""
    return ",".join(choice) if isinstance(choice, tuple) else choice


def _sampler(task: Task) -> optuna.samplers.BaseSampler:
    cfg = task.search
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if cfg.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=cfg.seed)
    return AskedGrid({d.field: [_encoded(c) for c in d.choices] for d in cfg.space}, seed=cfg.seed)


class OptunaSearch(Searcher):
    """One task's Optuna study (see the module docstring)."""

    name = "optuna"

    def __init__(self, task: Task, run_dir: Path):
        self.task, self.config, self.path = task, task.search, run_dir / STUDY_FILE
        self.sampler, self.pruner = _sampler(task), PRUNERS[task.search.pruner]()
        self.trials: dict[str, int] = {}  # adapter -> its trial's number, in the order asked
        self.reported: dict[str, int] = {}  # adapter -> its held-out losses the study has (the pruner's)
        self._storage: optuna.storages.RDBStorage | None = None
        self._study: optuna.Study | None = None

    # ---- from the spec (every rank) ---------------------------------------------------------------
    @classmethod
    def bounds(cls, task: Task) -> dict[str, AdapterConfig]:
        """The largest of every numeric field, with each choice of target modules."""
        largest = {d.field: max(d.extremes()) for d in task.search.space
                   if d.field != "target_modules" and all(isinstance(v, (int, float)) for v in d.extremes())}
        where = f"{task.where}search.space"
        targets = next((d.choices for d in task.search.space if d.field == "target_modules"), None)
        if targets is None:
            return {where: cls.config_of(task, largest, 0)}
        return {f"{where}.target_modules[{i}]": cls.config_of(task, {**largest, "target_modules": t}, 0)
                for i, t in enumerate(targets)}

    @classmethod
    def planned(cls, task: Task) -> int:
        return task.search.trials

    @classmethod
    def foreign(cls, task: Task, adapter_ids: Iterable[str]) -> str | None:
        return next((aid for aid in adapter_ids if not (aid.startswith(f"{task.prefix}trial")
                                                         and aid[len(task.prefix) + 5:].isdigit())), None)

    @staticmethod
    def config_of(task: Task, params: dict[str, Any], number: int) -> AdapterConfig:
        """The configuration of a trial's parameters over the task's defaults; its seed the trial's
        number unless the defaults set one."""
        values = {"seed": number, **task.search.defaults, **params}
        if isinstance(values.get("target_modules"), str):  # as a categorical choice holds it (_encoded)
            values["target_modules"] = values["target_modules"].split(",")
        return AdapterConfig(**values)

    # ---- the study (rank 0) -----------------------------------------------------------------------
    def storage(self) -> optuna.storages.RDBStorage:
        if self._storage is None:
            # its INFO line per trial would cut into the run's progress lines; its warnings still show
            optuna.logging.set_verbosity(logging.WARNING)
            self._storage = optuna.storages.RDBStorage(f"sqlite:///{self.path}")
        return self._storage

    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = optuna.create_study(storage=self.storage(), study_name=self.task.name, sampler=self.sampler,
                                              pruner=self.pruner, direction="minimize",
                                              load_if_exists=True)
        return self._study

    def propose(self, free: int | None) -> list[tuple[str, AdapterConfig]]:
        if free is None:  # a fresh run: a study of this name here is of a run that never checkpointed
            try:
                optuna.delete_study(study_name=self.task.name, storage=self.storage())
            except KeyError:
                pass
        n = min(self.config.parallel if free is None else free, self.config.trials - len(self.trials))
        distributions = {d.field: self._distribution(d) for d in self.config.space}
        out = []
        for _ in range(n):
            trial = self.study().ask(distributions)
            aid = f"{self.task.prefix}trial{trial.number}"
            self.trials[aid] = trial.number
            out.append((aid, self.config_of(self.task, trial.params, trial.number)))
        return out

    @staticmethod
    def _distribution(d: Dimension) -> BaseDistribution:
        if d.choices is not None:
            return CategoricalDistribution([_encoded(c) for c in d.choices])
        if d.is_int:
            return IntDistribution(d.low, d.high, log=d.log, step=d.step or 1)
        return FloatDistribution(d.low, d.high, log=d.log, step=d.step)

    def _report(self, adapter: Adapter) -> int:
        """Its held-out losses not yet in the study, as its trial's intermediate values (at its
        micro-steps); returns the trial's id."""
        storage = self.storage()
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(self.task.name),
                                                                   self.trials[adapter.id])
        done = self.reported.get(adapter.id, 0)
        for loss, step in zip(adapter.eval_losses[done:], adapter.eval_steps[done:]):
            storage.set_trial_intermediate_value(trial_id, step, loss)
        self.reported[adapter.id] = len(adapter.eval_losses)
        return trial_id

    def stops(self, running: list[Adapter]) -> list[Decision]:
        """Each running trial's new held-out losses into the study (optuna-dashboard shows them as they
        come), then the study's pruner (search.pruner) on them."""
        out = []
        for a in running:
            if len(a.eval_losses) > self.reported.get(a.id, 0):
                trial = self.storage().get_trial(self._report(a))
                if self.config.pruner != "none" and self.study().pruner.prune(self.study(), trial):
                    out.append(Decision(a.id, a.micro_step, f"optuna-{self.config.pruner}",
                                        f"Optuna's {self.config.pruner} pruner at held-out loss {a.eval_losses[-1]:.4f}"))
        return out

    def tell(self, adapter: Adapter, status: Status, result: float | None) -> None:
        study, number = self.study(), self.trials[adapter.id]
        self._report(adapter)
        if status == Status.FINISHED and result is not None:
            study.tell(number, result)
        else:
            study.tell(number, state=TrialState.PRUNED if status == Status.STOPPED_EARLY else TrialState.FAIL)

    # ---- the checkpoint ---------------------------------------------------------------------------
    def state(self) -> Any:
        with contextlib.closing(sqlite3.connect(self.path)) as db:  # a consistent copy of the file, as bytes
            snapshot = db.serialize()
        # the sampler's random state and the pruner's (Hyperband sizes its brackets when it first prunes)
        return {"trials": dict(self.trials), "reported": dict(self.reported), "sampler": pickle.dumps(self.sampler),
                "pruner": pickle.dumps(self.pruner), "study": snapshot}

    def load_state(self, state: Any) -> None:
        self.trials, self.reported = dict(state["trials"]), dict(state["reported"])
        self.sampler, self.pruner = pickle.loads(state["sampler"]), pickle.loads(state["pruner"])
        self._storage = self._study = None  # opened again on the file put back
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(state["study"])
        for suffix in ("-journal", "-wal", "-shm"):  # a killed write's, which SQLite would replay onto the snapshot
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, self.path)  # whole, or as it was
