"""What a finished sweep leaves: each adapter's outcome (the weights it exports, their held-out loss
and metric: alto.evaluation), the leaderboards (overall and per task), the PEFT exports and the
loss plot."""
from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from alto.base import Base
from alto.export import AdapterExports, save_base
from alto.model import LayerTensors
from alto.registry import Adapter, Registry

LEADERBOARD = "leaderboard.csv"  # a run folder's mark of a completed run


@dataclass
class Outcome:
    """What a finished sweep keeps of an adapter: the exported weights and what they are worth."""

    weights: dict[str, LayerTensors]
    export: str  # best | last
    step: int  # the optimizer step the exported weights are from
    eval_loss: float  # on the task's evaluated held-out sequences (nan: none, or a failed adapter)
    metric: tuple[str, float] | None = None  # (metric, mean over the held-out prompts)

    def record(self) -> dict:
        """What alto_adapter.json records of it."""
        return {"export": self.export, "export_step": self.step, "eval_loss": self.eval_loss,
                "metric": list(self.metric) if self.metric else None}

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.eval_loss, 700.0)) if math.isfinite(self.eval_loss) else math.nan


COLUMNS = ["rank", "task", "task_rank", "adapter", "status", "steps", "export", "export_step", "eval_loss",
           "perplexity", "metric", "metric_value", "train_loss_last", "config"]


def ranking(o: Outcome, next_token_loss: bool) -> tuple[bool, bool, float, float]:
    """An adapter's place on a leaderboard (lowest first): one with no finite held-out loss (failed,
    or never evaluated) last; then, where the loss is a next-token loss, the loss; else (a DPO loss,
    whose scale is each adapter's beta and loss_type) the task's metric, higher first (reward
    accuracy, say: reward_margin scales with beta too), then the loss."""
    score = 0.0 if next_token_loss else o.metric[1] if o.metric else math.nan
    return not math.isfinite(o.eval_loss), math.isnan(score), 0.0 if math.isnan(score) else -score, o.eval_loss


def _rows(board: list[tuple[Adapter, Outcome]], task_rank: dict[str, int], next_token_loss: bool) -> list[list]:
    return [[i, a.task, task_rank[a.id], a.id, a.status.value, a.step, o.export, o.step, f"{o.eval_loss:.6f}",
             f"{o.perplexity:.4f}" if next_token_loss else "", o.metric[0] if o.metric else "", f"{o.metric[1]:.4f}" if o.metric else "",
             a.losses[-1] if a.losses else "", a.config.to_dict()] for i, (a, o) in enumerate(board, 1)]


def _write(path: Path, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *rows])


def finish(registry: Registry, outcomes: Mapping[str, Outcome], base: Base, run_dir: Path, exports: AdapterExports,
           log=print, next_token_loss: bool = True) -> list[tuple[str, float]]:
    """Exports every adapter's chosen weights in PEFT format (adapters/<name>, by `exports`, which
    may have written their weights already; their base in HF format to base/ where it is not a
    model folder already: alto.export.save_base), writes leaderboard.csv (every adapter, best
    first) and leaderboards/<task>.csv, and prints each task's leaderboard (a next-token loss with
    its perplexity); returns (adapter, held-out loss) best first (ranking). (losses.png:
    alto.loss_plot.)"""
    def order(a: Adapter) -> tuple:
        return ranking(outcomes[a.id], next_token_loss)

    tasks: dict[str, list[Adapter]] = {}
    for a in registry:  # the weights written while the base is
        o = outcomes[a.id]
        exports.finish(a, o.weights, o.step, o.record())
    save_base(base, run_dir / "base")
    exports.wait()
    for a in registry:
        tasks.setdefault(a.task, []).append(a)
    task_rank = {a.id: i for members in tasks.values() for i, a in enumerate(sorted(members, key=order), 1)}
    overall = sorted(registry, key=order)
    _write(run_dir / LEADERBOARD, _rows([(a, outcomes[a.id]) for a in overall], task_rank, next_token_loss))
    for task, members in tasks.items():
        board = [(a, outcomes[a.id]) for a in sorted(members, key=order)]
        _write(run_dir / "leaderboards" / f"{task}.csv", _rows(board, task_rank, next_token_loss))
        metric = next((o.metric[0] for _, o in board if o.metric), None)
        log(f"\ntask {task}\n{'#':>3}  {'adapter':<34}{'status':<15}{'steps':>6}{'export':>12}{'eval loss':>11}"
            + (f"{'ppl':>10}" if next_token_loss else "") + (f"{metric:>13}" if metric else ""))
        for i, (a, o) in enumerate(board, 1):
            log(f"{i:>3}  {a.id:<34}{a.status.value:<15}{a.step:>6}{f'{o.export}@{o.step}':>12}{o.eval_loss:>11.4f}"
                + (f"{o.perplexity:>10.4g}" if next_token_loss else "") + (f"{o.metric[1]:>13.3f}" if o.metric else ""))
    their_base = "" if base.loads_alone else ", base/ (their base, HF format)"
    log(f"\nrun folder: {run_dir} (adapters/ in PEFT format{their_base}, losses.csv, leaderboard.csv, leaderboards/, "
        "losses.png)")
    return [(a.id, outcomes[a.id].eval_loss) for a in overall]
