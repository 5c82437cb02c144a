"""A run's checkpoint: checkpoint.pt written atomically (a kill never leaves half a file), in the
background (Writer), read back with errors that name it, and the run's logs cut back to it on resume."""
from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from alto.inputs import first_line
from alto.runlog import rewrite_rows

CHECKPOINT = "checkpoint.pt"
LOGS = ("losses.csv", "decisions.csv", "steps.csv", "evals.csv")  # rows start with the run's micro-step (alto.runlog)
# Bumped when what a checkpoint holds, or what resuming it rebuilds, changes (2: adapter progress
# records, named tensors; 3: queued adapters may hold a state, bf16 bases on GPUs, random bases drawn
# on their device; 4: records rendered by chat template, completion-only loss by default, so a
# run's sequences and held-out losses differ; 5: tasks (a monitor each), best held-out weights;
# 6: each evaluation's micro-step, monitor rungs named by rule).
FORMAT = 6


def write(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / f"{CHECKPOINT}.tmp"
    torch.save({**state, "format": FORMAT}, tmp)
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

    def write(self, state: dict[str, Any]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(state,), name="alto-checkpoint")
        self._thread.start()

    def _write(self, state: dict[str, Any]) -> None:
        try:
            write(self.run_dir, state)
        except BaseException as e:  # raised in the run's thread by wait()
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def read(run_dir: Path, adapter_ids: Iterable[str]) -> dict[str, Any]:
    """The state write() saved; ValueError naming the file if it is damaged, of another program or
    format, or holds an adapter that adapter_ids (the run's sweep) lacks."""
    path = run_dir / CHECKPOINT
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        unknown = set(state["adapters"]) - set(adapter_ids)
        written = state.get("format", 1)
    except Exception as e:  # truncated, not a torch file, another structure
        raise ValueError(f"{path}: not a checkpoint of alto tune ({type(e).__name__}: {first_line(e)})") from None
    if written != FORMAT:
        raise ValueError(f"{path} has checkpoint format {written}, this alto tune reads {FORMAT}: resume it "
                         "with the release that wrote it")
    if unknown:
        raise ValueError(f"{path} holds adapter {sorted(unknown)[0]!r}, which the run's sweep.yaml does not define")
    return state


def truncate_logs(run_dir: Path, micro_steps: int) -> None:
    """A killed run may have logged micro-steps after its last checkpoint (the last line perhaps cut
    short): they are redone, so their rows go. The kept rows replace each file atomically."""
    for name in LOGS:
        path = run_dir / name
        if path.exists():
            rewrite_rows(path, lambda header, r: len(r) == len(header) and r[0].isdigit() and int(r[0]) <= micro_steps)
