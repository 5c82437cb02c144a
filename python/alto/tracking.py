"""Experiment tracking (`report_to:` in a sweep, as HF TrainingArguments' report_to): every adapter
a run of its own, with its hyperparameters, training loss and learning rate at each of its
micro-steps and its held-out losses; the sweep's own run with each step's seconds, adapters, token
positions and measured peak memory. Rank 0 reports (alto.runlog.RunLog feeds the trackers).

- tensorboard: event files under RUN_DIR/tensorboard/adapters/<adapter>/ and RUN_DIR/tensorboard/sweep/
  (`tensorboard --logdir RUN_DIR/tensorboard`), written by torch's SummaryWriter; each adapter's
  hyperparameters as text.
- mlflow: RUN_DIR/mlflow.db (MLflow's SQLite store: `mlflow ui --backend-store-uri
  sqlite:///RUN_DIR/mlflow.db`), an experiment named by the sweep, its parent run and one nested run
  per adapter, found again by a resumed run (its redone steps are logged again at the same steps).

Both are optional extras (pip install tensorboard / mlflow-skinny), imported only when a sweep asks
for them. To add a tracker: one class here (params, scalars, close), listed in TRACKERS.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

SWEEP = None  # scalars(None, ...): the sweep's own run


class Tracker:
    """The interface (see the module docstring)."""

    name: ClassVar[str]
    package: ClassVar[str]  # what pip installs for it

    def __init__(self, run_dir: Path, sweep_name: str):
        raise NotImplementedError

    def params(self, adapter: str, params: Mapping[str, Any]) -> None:
        """An adapter's hyperparameters, as it starts (once per adapter and process)."""
        raise NotImplementedError

    def scalars(self, adapter: str | None, values: Mapping[str, float], step: int) -> None:
        """Values at a step of an adapter (its micro-step) or of the sweep (None: the run's micro-step)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    name, package = "tensorboard", "tensorboard"

    def __init__(self, run_dir: Path, sweep_name: str):
        self.root, self.writers = run_dir / "tensorboard", {}

    def _writer(self, adapter: str | None):
        from torch.utils.tensorboard import SummaryWriter

        if adapter not in self.writers:  # adapters in a folder of their own: one may be named "sweep"
            self.writers[adapter] = SummaryWriter(str(self.root / ("sweep" if adapter is None else f"adapters/{adapter}")))
        return self.writers[adapter]

    def params(self, adapter: str, params: Mapping[str, Any]) -> None:
        self._writer(adapter).add_text("hyperparameters", "  \n".join(f"{k}: {v}" for k, v in params.items()))

    def scalars(self, adapter: str | None, values: Mapping[str, float], step: int) -> None:
        writer = self._writer(adapter)
        for key, value in values.items():
            writer.add_scalar(key, value, step)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers = {}


class MLflow(Tracker):
    name, package = "mlflow", "mlflow-skinny"

    def __init__(self, run_dir: Path, sweep_name: str):
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # its store's INFO lines would cut into the run's progress
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
        found = self.client.get_experiment_by_name(sweep_name)
        self.experiment = found.experiment_id if found else self.client.create_experiment(sweep_name)
        self.runs: dict[str | None, str] = {}
        self.parent = self._run(None)

    def _run(self, adapter: str | None) -> str:
        """The MLflow run of an adapter (or of the sweep): an earlier process's (resumed), or a new one."""
        if adapter not in self.runs:
            name = "sweep" if adapter is None else adapter
            key = "sweep" if adapter is None else f"adapter:{adapter}"  # never equal: an adapter may be named "sweep"
            old = self.client.search_runs([self.experiment], filter_string=f"tags.alto_run = '{key}'")
            tags = {"alto_run": key, "mlflow.runName": name}
            if adapter is not None:
                tags["mlflow.parentRunId"] = self.parent
            self.runs[adapter] = old[0].info.run_id if old else self.client.create_run(self.experiment, tags=tags).info.run_id
        return self.runs[adapter]

    def params(self, adapter: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        run = self._run(adapter)
        logged = self.client.get_run(run).data.params
        self.client.log_batch(run, params=[Param(k, str(v)) for k, v in params.items() if k not in logged])

    def scalars(self, adapter: str | None, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self._run(adapter), metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def close(self) -> None:
        for run in self.runs.values():
            self.client.set_terminated(run)


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoard, MLflow)}
