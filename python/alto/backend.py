"""The seam between `alto cluster`'s driver and the machines its ranks run on. The driver
(alto.cluster) owns every submission's lifecycle (placed by the policy, launched, started,
halted and resumed elsewhere, dead and restarted, ended) and what a person reads (events.csv,
status.json); a backend only runs ranks: it launches a submission's ranks on `world` GPUs, says
when they started and how they are doing (poll), halts them at a checkpoint, and releases them.

A new backend (Kubernetes, Slurm, ...) is one class in one file implementing Backend, as
alto.ray_backend does for Ray; the driver's lifecycle tests run on one of their own, without Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class RankArgs:
    """What each rank of a submission runs: alto.tune.run_rank of this sweep in this run folder."""

    text: str  # the sweep file
    source: str  # its path, named in error lines
    run_dir: str
    resume: bool  # from the run folder's checkpoint
    threads: int  # CPU threads per rank (the same wherever it runs: results do not depend on it)


@dataclass
class Poll:
    """A launched submission, now."""

    pids: list[int] | None = None  # its ranks' processes, in the poll they started (None: not in this one)
    progress: dict = field(default_factory=dict)  # rank 0's last step (SweepRun.run's on_step), if any
    codes: list[int] | None = None  # every rank's exit code, once all have ended


class RunFailed(Exception):
    """A rank's run ended in an error (bad input, a bug): the submission fails alone."""


class RanksDied(Exception):
    """A rank's process or node died: the driver restarts the submission from its checkpoint."""


class Backend(Protocol):
    def connect(self) -> tuple[int, int]:
        """Starts or joins the cluster: (its GPU slots, the CPU threads each rank gets)."""

    def launch(self, name: str, world: int, args: RankArgs) -> object:
        """Asks for `world` GPUs and starts the ranks there once it has them (a handle the other
        calls take); the GPUs may still be held by a submission being halted."""

    def poll(self, launched: object) -> Poll:
        """Where the ranks are, without waiting; raises RunFailed or RanksDied."""

    def halt(self, launched: object) -> None:
        """Asks the ranks to stop at their next step's checkpoint (their codes: alto.tune.HALTED)."""

    def release(self, launched: object) -> None:
        """Ends the ranks and gives their GPUs back."""

    def close(self) -> None:
        """Leaves the cluster (stops one it started)."""
