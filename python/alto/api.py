"""The Python API: `alto tune` as a call, for notebooks and other stacks.

```python
from alto.api import run

result = run({"name": "demo", "model": "smollm2", "data": {"source": "chatterbot", "topics": ["ai"]},
              "grid": {"lr": [3e-4, 1e-3]}}, on_evaluation=lambda e: print(e["adapter"], e["eval_loss"]))
best = result.leaderboard[0]                 # the leaderboard's rows, best first, values as numbers
print(best["adapter"], best["eval_loss"], result.adapters[best["adapter"]])   # its PEFT folder
```
The sweep is a path to a sweep file, the YAML text of one, or a dict of the same keys
(alto.sweep); the run is `alto tune`'s (alto.tune.tune: the same call), so its folder, files and
checkpoints are the command's. Bad input raises ValueError with the command's one line; nothing is
written before. on_step(progress) is called after every step (its micro-step, seconds and the
adapters in each state), on_evaluation(row) with each held-out loss as evals.csv gets it.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alto import results
from alto.inputs import read_text
from alto.sweep import parse_sweep
from alto.tune import run_folder, tune


@dataclass
class Result:
    """What a run left: its folder, the leaderboard's rows (best first; values as numbers, None
    where empty), each exported adapter's folder (PEFT format) by name, and timing.json's seconds
    per phase. completed: False when it stopped at stop_after (resume it with resume=run_dir)."""

    run_dir: Path
    completed: bool
    leaderboard: list[dict[str, Any]]
    adapters: dict[str, Path]
    timing: dict[str, float]


TEXT = {"task", "adapter", "status", "export", "weights", "metric", "config"}  # CSV columns that are words


def _row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row of leaderboard.csv or evals.csv with its numbers as numbers (int, else float) and None
    where a value is empty; names stay as written (an adapter may be named "3")."""
    out = {}
    for key, value in row.items():
        if value == "" or value is None:
            out[key] = None
        elif key in TEXT or not isinstance(value, str):
            out[key] = value
        else:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    return out


def _sweep_text(sweep: str | Path | Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(path, text): a Path or a one-line string without ':' is a sweep file; a mapping or YAML text is the sweep."""
    if isinstance(sweep, Mapping):
        return None, yaml.safe_dump(dict(sweep), sort_keys=False)
    if isinstance(sweep, Path) or (isinstance(sweep, str) and "\n" not in sweep and ":" not in sweep):
        return str(sweep), None
    if isinstance(sweep, str):
        return None, sweep
    raise ValueError(f"sweep: {type(sweep).__name__} must be a path, YAML text or a dict")


def run(sweep: str | Path | Mapping[str, Any] | None = None, *, resume: str | Path | None = None,
        stop_after: int | None = None, on_step: Callable[[dict], None] | None = None,
        on_evaluation: Callable[[dict], None] | None = None, log: Callable[[str], None] = print) -> Result:
    """Runs a sweep, or resumes a run folder (resume=RUN_DIR), and returns its Result."""
    if (sweep is None) == (resume is None):
        raise ValueError("give a sweep or resume=RUN_DIR (one of them)")
    if resume is not None:
        path, text, run_dir = None, None, Path(resume)
    else:
        path, text = _sweep_text(sweep)
        if path is not None:
            text = read_text(path, "sweep file")
        run_dir = run_folder(parse_sweep(text, path or "sweep"))
    code = tune(path, None if resume is None else str(resume), stop_after, log, text=text, on_step=on_step,
                on_evaluation=on_evaluation and (lambda row: on_evaluation(_row(row))))
    if code != 0:  # bad input was raised; one process's run ends with 0
        raise RuntimeError(f"alto tune ended with exit code {code}")
    board_path = run_dir / results.LEADERBOARD
    board: list[dict[str, Any]] = []
    if board_path.is_file():
        with open(board_path, newline="") as f:
            board = [_row(row) for row in csv.DictReader(f)]
    adapters = {row["adapter"]: run_dir / "adapters" / row["adapter"] for row in board
                if (run_dir / "adapters" / row["adapter"]).is_dir()}
    timing = json.loads((run_dir / "timing.json").read_text()) if (run_dir / "timing.json").is_file() else {}
    return Result(run_dir, board_path.is_file(), board, adapters, timing)
